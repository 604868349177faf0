"""Placement with odometry: each window joins the global pose graph beside the odometry.

Every prior stays in the odometry frame, and ``map -> odom`` is the drift the graph estimates.
The scale comes from the odometry, for metric and non-metric models alike: a model that is 5 %
too large in every window would otherwise stretch the path against the odometry (see
:mod:`.scale`). The window is checked against the odometry in a local problem first (see
:meth:`.pose_graph.PoseGraph.check_window`): views that disagree are dropped, a window further
from the odometry than ``max_residual_m`` is rejected (its keyframes keep their odometry
estimates), and odometry steps the window's geometry contradicts are reported as slips.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from mapany_ros.core.alignment import rigidify
from mapany_ros.core.backends.base import WindowPrediction
from mapany_ros.core.frames import Frame
from mapany_ros.core.geometry import invert
from mapany_ros.core.placement.config import PlacementConfig
from mapany_ros.core.placement.keyframe_index import KeyframeIndex
from mapany_ros.core.placement.placed import PlacedWindow, PlacementStatus, moved, rejected
from mapany_ros.core.placement.pose_graph import Observation, PoseGraph
from mapany_ros.core.placement.scale import OdometryCalibration, ScaleFilter, ScaleMeasurement
from mapany_ros.core.placement.stage_clock import StageClock

#: Consecutive views closer than this (by odometry) say nothing about the window's scale.
MIN_STEP_M = 0.05
#: Least spread assumed for one step's log scale ratio (views carry a few centimetres of noise).
MIN_STEP_LOG_SIGMA = 0.05
#: The steps' spread is pooled over the windows placed so far; the floor above counts as this many steps.
STEP_SPREAD_PRIOR_STEPS = 10
#: ... and the pool forgets beyond this many steps, so that it follows a model whose noise changes.
STEP_SPREAD_MEMORY_STEPS = 500
#: A metric window whose scale, measured against the odometry, is off the model's usual scale by more
#: than this factor (at three sigmas of the measurement) is wrong, not a scale to adopt.
MAX_METRIC_SCALE_ERROR = 1.25
#: Windows whose scale was measured before the model's scale against the odometry's is reported.
MIN_SCALE_WINDOWS = 5
#: Two cameras of a rig closer than this say too little about the window's scale (a few
#: centimetres of noise per view against the distance between them).
MIN_RIG_BASELINE_M = 0.1


class PooledSpread:
    """A window's scale from a handful of log ratios (steps, or rig baselines), with their spread
    pooled over the windows placed so far.

    The spread of a handful of ratios is itself a guess, often far too small (2 cm of noise per view
    spreads 15 cm steps by ~15 %, yet 6 of them can show 3 %): the window's own spread counts only
    where it exceeds what the windows so far showed, else the scale filter would take one window's
    noise for the model's bias.
    """

    def __init__(self, floor_sigma: float) -> None:
        self.floor_var = floor_sigma**2
        #: Spread (variance) of one log ratio, pooled over placed windows, and its weight in ratios.
        self.var = self.floor_var
        self.weight = float(STEP_SPREAD_PRIOR_STEPS)
        #: The newest window's own (variance, count), pooled once the window is placed.
        self._window: tuple[float, int] | None = None

    def measure(self, logs: list[float], least: int = 3) -> ScaleMeasurement | None:
        """The median of ``logs`` (one odd ratio - a slipped step, a bad view - does not stretch the
        window) and its variance; None from fewer than ``least``."""
        self._window = None
        if len(logs) < least:
            return None
        x = np.asarray(logs)
        median = float(np.median(x))
        spread = 1.4826 * float(np.median(np.abs(x - median)))
        self._window = (spread**2, len(x))
        # The median of n samples is about sqrt(pi / 2) times noisier than their mean.
        return ScaleMeasurement(median, (np.pi / 2) * max(spread**2, self.var) / len(x))

    def pool(self) -> None:
        """Take the placed window's own spread into the pool (weighted by its count)."""
        if self._window is None:
            return
        var, n = self._window
        self.var = max((self.weight * self.var + n * var) / (self.weight + n), self.floor_var)
        self.weight = min(self.weight + n, STEP_SPREAD_MEMORY_STEPS)


class OdometryGraphPlacement:
    """Windows into the pose graph with the odometry."""

    def __init__(self, config: PlacementConfig, graph: PoseGraph, index: KeyframeIndex,
                 clock: StageClock | None = None) -> None:
        self.config = config
        self.clock = clock if clock is not None else StageClock()
        self.graph = graph
        self.index = index
        self._scale = ScaleFilter(config.metric_scale_sigma)
        self._measurement: ScaleMeasurement | None = None
        self._rig_measurement: ScaleMeasurement | None = None
        self._steps = PooledSpread(MIN_STEP_LOG_SIGMA)
        self._rig = PooledSpread(MIN_STEP_LOG_SIGMA)
        #: Scale of the newest window (window units -> metres).
        self.scale = 1.0

    def model_scale(self) -> tuple[float, float] | None:
        """The metric model's scale over the odometry's so far, and its relative one-sigma; None
        until ``MIN_SCALE_WINDOWS`` windows measured it (the bias the scale filter learned)."""
        f = self._scale
        if f.learned < MIN_SCALE_WINDOWS:
            return None
        return float(np.exp(-f.bias)), float(np.sqrt(f.bias_var))

    def register(self, groups: list[list[Frame]]) -> None:
        """Enter the window's new keyframe groups into the graph with their odometry (and its
        covariance, when the odometry gave one); groups already indexed while relocalising too."""
        for g in groups:
            if g[0].T_world_base is None:
                raise ValueError("placement with odometry needs T_world_base on every frame")
            kf = self.index.get(g)
            if kf is None:
                newest = self.index.newest
                if newest is not None and g[0].stamp_ns <= newest.stamp_ns:
                    continue  # an old group placement never saw (it cannot enter a graph that only grows forward)
                kf = self.index.add(g)
            known = self.graph.keyframes
            if not self.graph.has(kf.kid) and (not known or kf.kid > known[-1]):
                self.graph.add_keyframe(kf.kid, g[0].T_world_base, g[0].odometry_covariance)

    def scale_guess(self, groups: list[list[Frame]], frames: list[Frame], prediction: WindowPrediction,
                    usable: list[int]) -> float:
        """The window's scale (window units -> the map's metres) from its camera centres against the
        odometry's steps and, on a rig, against the calibrated distances between its cameras."""
        self._measurement = self._steps.measure(self._step_logs(frames, prediction, usable))
        self._rig_measurement = self._rig.measure(self._rig_logs(groups, frames, prediction, usable), least=2) \
            if self.config.rig_scale else None
        self.scale = self._scale.estimate(self._measurement, prediction.metric, self._rig_measurement)
        return self.scale

    def rescale_refined(self, frames: list[Frame], prediction: WindowPrediction, usable: list[int]) -> float:
        """The window's scale again, its steps measured on the refined poses: a model's poses that
        lean towards the odometry share its scale error, the depth they were refined on does not.
        The rig's measurement stays the one before refinement, which held the rig's views to the
        calibrated baseline at the first guess's scale."""
        self._measurement = self._steps.measure(self._step_logs(frames, prediction, usable))
        self.scale = self._scale.estimate(self._measurement, prediction.metric, self._rig_measurement)
        return self.scale

    @property
    def calibration(self) -> OdometryCalibration | None:
        """The odometry's scale as a rig measured it (None before one did): the robot's, kept across maps."""
        return self._scale.calibration()

    def take_calibration(self, calibration: OdometryCalibration) -> None:
        """Apply an earlier measurement of the odometry's scale from the first window on."""
        self._scale.take_calibration(calibration)
        self.graph.odometry_scale = float(np.exp(self._scale.odometry_log_scale))

    def odometry_scale(self) -> tuple[float, float] | None:
        """The odometry's distances over the rig's (true) ones, and the relative one-sigma; None
        without a rig of cameras a calibrated baseline apart (see :mod:`.scale`)."""
        return self._scale.odometry_scale()

    @staticmethod
    def _step_logs(frames: list[Frame], prediction: WindowPrediction, idx: list[int]) -> list[float]:
        """log(scale) of consecutive steps of each camera: the odometry's step over the window's.

        The window's step is taken along the odometry's step (the window's frame turned onto the
        odometry's by the mean of the views' rotations), not as its length: a step's length grows
        with any noise across it (2 cm per view made 15 cm steps 2-3 % longer, so every window was
        shrunk by that much), while its component along the true step is as often short as long.
        """
        order = sorted(idx, key=lambda i: (frames[i].camera, frames[i].stamp_ns))
        if len(order) < 2:
            return []
        R_align = Rotation.from_matrix(np.stack([
            frames[i].T_world_camera[:3, :3] @ prediction.views[i].T_world_camera[:3, :3].T for i in order])).mean()
        odo = {i: frames[i].T_world_camera[:3, 3] for i in order}
        win = {i: R_align.apply(prediction.views[i].T_world_camera[:3, 3]) for i in order}
        logs: list[float] = []
        for a, b in zip(order, order[1:], strict=False):
            if frames[a].camera != frames[b].camera:
                continue
            step = odo[b] - odo[a]
            d_odo = float(np.linalg.norm(step))
            if d_odo < MIN_STEP_M:
                continue
            along = float(np.dot(win[b] - win[a], step / d_odo))
            if along > 0:
                logs.append(np.log(d_odo / along))
        return logs

    @staticmethod
    def _rig_logs(groups: list[list[Frame]], frames: list[Frame], prediction: WindowPrediction,
                  idx: list[int]) -> list[float]:
        """log(scale) of each pair of cameras of one group at least ``MIN_RIG_BASELINE_M`` apart:
        the calibrated distance between them (their extrinsics, and the little the base moved
        between their stamps) over the window's, taken along the calibrated one, in the first
        camera's frame (so no alignment of the window is needed)."""
        usable = set(idx)
        logs: list[float] = []
        start = 0
        for g in groups:
            members = [i for i in range(start, start + len(g)) if i in usable]
            start += len(g)
            for n, a in enumerate(members):
                for b in members[n + 1:]:
                    if frames[a].camera == frames[b].camera:
                        continue
                    Ta, Tb = frames[a].T_world_camera, frames[b].T_world_camera
                    known = Ta[:3, :3].T @ (Tb[:3, 3] - Ta[:3, 3])
                    length = float(np.linalg.norm(known))
                    if length < MIN_RIG_BASELINE_M:
                        continue
                    Wa, Wb = prediction.views[a].T_world_camera, prediction.views[b].T_world_camera
                    seen = rigidify(Wa)[:3, :3].T @ (Wb[:3, 3] - Wa[:3, 3])
                    along = float(np.dot(seen, known / length))
                    if along > 0:
                        logs.append(np.log(length / along))
        return logs

    def place(self, j: int, groups: list[list[Frame]], frames: list[Frame], prediction: WindowPrediction,
              accepted: list[bool], owed: dict[int, np.ndarray] | None = None) -> PlacedWindow:
        """Place window ``j``; ``accepted`` is narrowed to the views the graph keeps. ``owed``: view
        index -> the transform its points still owe (refinement's, see :func:`.placed.settle`)."""
        graph, cfg = self.graph, self.config
        group_of = [g for g, grp in enumerate(groups) for _ in grp]
        kf = [self.index.get(groups[group_of[i]]) for i in range(len(frames))]
        idx = [i for i in range(len(frames)) if accepted[i] and kf[i] is not None and frames[i].key in kf[i].cameras
               and graph.has(kf[i].kid)]
        if not idx:
            return rejected(prediction, "no view of the window is usable", graph.T_map_odom)
        scale = self.scale
        m = self._measurement
        if prediction.metric and m is not None:
            off = abs(m.log_scale - self._scale.bias) - 3.0 * np.sqrt(m.variance)
            if off > np.log(MAX_METRIC_SCALE_ERROR):
                return rejected(prediction, f"the window's scale disagrees with odometry by a factor "
                                f"{np.exp(abs(m.log_scale - self._scale.bias)):.2f}", graph.T_map_odom)
        obs = []
        for i in idx:
            T = rigidify(prediction.views[i].T_world_camera)
            T[:3, 3] *= scale
            obs.append(Observation(kf[i].kid, T @ invert(kf[i].cameras[frames[i].key])))
        with self.clock.stage("local check"):
            check = graph.check_window(obs)
        limit = cfg.max_residual_m
        if limit > 0 and check.residual_m > limit:
            with self.clock.stage("graph commit"):
                graph.commit_odometry()  # its keyframes keep their odometry estimates
            return rejected(prediction, f"window disagrees with odometry by {check.residual_m:.3f} m RMS "
                            f"(placement.max_residual_m = {limit})", graph.T_map_odom)
        for i, ok in zip(idx, check.accepted, strict=True):
            accepted[i] = accepted[i] and ok
        with self.clock.stage("graph commit"):
            graph.commit_window(j, [o for o, ok in zip(obs, check.accepted, strict=True) if ok], check.T_map_window,
                                check.poses)
            self._scale.update(self._measurement, prediction.metric, scale, self._rig_measurement)
            self._steps.pool()
            self._rig.pool()
            graph.odometry_scale = float(np.exp(self._scale.odometry_log_scale))
            poses: list[np.ndarray | None] = [None] * len(frames)
            for i in idx:
                if accepted[i]:
                    poses[i] = graph.T_map_base(kf[i].kid) @ kf[i].cameras[frames[i].key]
        placed = [poses[i] is not None for i in range(len(frames))]
        slips = [(self.index.by_kid[a].stamp_ns, self.index.by_kid[b].stamp_ns, m) for a, b, m in check.slips]
        with self.clock.stage("views out"):
            out = moved(prediction, placed, poses, scale, owed)
        return PlacedWindow(out, placed, PlacementStatus.PLACED, scale, check.residual_m, graph.T_map_odom,
                            slips=slips)
