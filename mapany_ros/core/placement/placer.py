"""The placement stage: every window, whatever backend predicted it, goes into the map here, once.

A backend answers in a frame of its own (see :class:`~mapany_ros.core.backends.base.ViewPrediction`).
:class:`WindowPlacer` turns that into map-frame poses, depth and points:

1. views that disagree with their neighbours' geometry are dropped (:mod:`.view_check`);
2. the remaining views' poses are refined so that their depth maps agree (:mod:`.refine`);
3. with odometry, the window joins a pose graph with the odometry (:mod:`.odometry_graph`);
   without, it is chained to the map through the frames it shares with placed windows
   (:mod:`.overlap_chain`).

The map frame follows REP 103/105: with odometry it is the odometry frame at the first keyframe;
without, the first keyframe's base_frame pose (through the static extrinsic), or the first camera
turned into x forward, z up.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import torch

from mapany_ros.core.alignment import Sim3, rigidify
from mapany_ros.core.backends.base import ViewPrediction, WindowPrediction
from mapany_ros.core.frames import Frame
from mapany_ros.core.geometry import invert, is_rigid, rotation_angle
from mapany_ros.core.placement.config import PlacementConfig
from mapany_ros.core.placement.keyframe_index import KeyframeIndex
from mapany_ros.core.placement.loops.closer import LoopCloser, LoopJob, LoopMeasurement
from mapany_ros.core.placement.loops.memory import SavedKeyframes
from mapany_ros.core.placement.multiview import ViewStack, by_size, grid_stride
from mapany_ros.core.placement.odometry_graph import OdometryGraphPlacement
from mapany_ros.core.placement.overlap import Anchor, depth_ratio, make_anchors
from mapany_ros.core.placement.overlap_chain import OverlapChainPlacement
from mapany_ros.core.placement.placed import PlacedWindow, PlacementStats, PlacementStatus, rejected, settle
from mapany_ros.core.placement.pose_graph import PoseGraph
from mapany_ros.core.placement.refine import refine_window_poses, rig_links
from mapany_ros.core.placement.scale import OdometryCalibration
from mapany_ros.core.placement.stage_clock import StageClock
from mapany_ros.core.placement.view_check import inconsistent_views, pose_outliers

#: A view whose refinement moved it beyond this (chi-square of the model's pose noise, 6 dof,
#: 99.9 %) disagrees with its neighbours and is rejected.
REJECT_CHI2 = 22.46
#: Points sampled per view for the view checks and the refinement.
STACK_SAMPLES = 1000
#: Placed views kept as anchors for later windows (context is a few groups of a few cameras).
MAX_ANCHORS = 64
#: Two windows' depths of the frames they share may differ by this factor at most (a unit slip, a
#: collapsed prediction); beyond, the newer window is rejected.
MAX_LINK_SCALE = 1.25
#: How much more loosely refinement holds views to poses that leant towards their priors.
PRIOR_LEANING_SIGMA_FACTOR = 4.0
#: Relocalising: two verified matches confirm each other when their keyframes are this many apart
#: at most and put them within RELOCALISE_M (per keyframe between them) and RELOCALISE_DEG.
RELOCALISE_NEIGHBOURS = 3
RELOCALISE_M = 0.3
RELOCALISE_DEG = 10.0
#: Keyframes whose windows are kept while relocalising (each window's prediction is kept once per keyframe).
MAX_WAITING_KEYFRAMES = 32
#: Newest keyframes whose graph poses are read back after every window (all of them after a loop).
RECENT_KEYFRAMES = 48
#: Pixels on which a view's median depth is judged against ``max_depth_m``: the check catches unit
#: slips (mm as m, a thousandfold), and the median of a regular sample of this size lies within
#: about a percentile of the image's.
MEDIAN_SAMPLES = 5_000

log = logging.getLogger(__name__)


def _medians_beyond(views: list[ViewPrediction], limit: float) -> list[bool]:
    """Per view, whether the (lower) median of its valid, finite depth exceeds ``limit``: exactly
    when at most (n - 1) // 2 of its n values are within it. Two counts instead of a selection, on
    a regular grid of about MEDIAN_SAMPLES pixels; views of one size counted together."""
    out = [False] * len(views)
    for (height, width, _), idx in by_size(views).items():
        s = grid_stride((height, width), MEDIAN_SAMPLES)
        grid = (slice(s // 2, None, s), slice(s // 2, None, s))
        depth = torch.stack([views[i].depth[grid] for i in idx])
        ok = torch.stack([views[i].valid[grid] for i in idx]) & torch.isfinite(depth)
        n = ok.sum((1, 2)).tolist()
        within = (ok & (depth <= limit)).sum((1, 2)).tolist()
        for i, n_i, w_i in zip(idx, n, within, strict=True):
            out[i] = n_i > 0 and w_i <= (n_i - 1) // 2
    return out


def _any(mask: torch.Tensor) -> bool:
    """``bool(mask.any())`` for a bool mask: its bytes' maximum, on a CPU some 20x faster than ``any``."""
    return mask.numel() > 0 and bool(mask.view(torch.uint8).max())


class WindowPlacer:
    """Places windows in the map (see module docstring). Called from the pipeline's worker thread.

    ``place`` changes nothing until the window has passed every check: an exception on the way
    leaves the placer as it was (with odometry, the window's keyframes may have entered the graph
    with their odometry, as for a rejected window).
    """

    def __init__(self, config: PlacementConfig, extrinsic: Callable[[str], np.ndarray | None]) -> None:
        self.config = config
        self._extrinsic = extrinsic
        self.stats = PlacementStats()
        #: Time per stage of the newest window, and of the newest loop job (``loop_job`` + ``close_loop``).
        self.clock = StageClock()
        self.loop_clock = StageClock()
        self._loaded: SavedKeyframes | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the map (a restart of the input): the next window starts a new one. The odometry's
        scale, where a rig measured it, is the robot's and is kept (else taken from a loaded map)."""
        calibration = self._odometry_calibration()
        self._anchors: collections.OrderedDict[tuple[str, int], Anchor] = collections.OrderedDict()
        self._placed_groups: collections.deque[list[Frame]] = collections.deque(maxlen=16)
        self.graph = PoseGraph(self.config.graph())
        self.index = KeyframeIndex()
        self._mode: OdometryGraphPlacement | OverlapChainPlacement = (
            OdometryGraphPlacement(self.config, self.graph, self.index, self.clock) if self.config.use_odometry
            else OverlapChainPlacement(self.config, self._anchors, self._extrinsic, self.graph, self.index, self.clock))
        if calibration is not None and isinstance(self._mode, OdometryGraphPlacement) and self.config.rig_scale:
            self._mode.take_calibration(calibration)
        self._windows = 0
        #: Without odometry: the node's own chained estimate (visual odometry) per keyframe id, and
        #: the newest one's id. Continuous: only the graph's relative motion enters it.
        self._vo: dict[int, np.ndarray] = {}
        self._vo_newest: int | None = None
        self.loops = LoopCloser(self.config.loops, self.config.view_sigma_m, np.radians(self.config.view_sigma_deg))
        #: The graph's latest word on every keyframe (recent ones after each window, all after a loop).
        self._poses: dict[int, np.ndarray] = {}
        #: With a loaded map: its keyframes (negative ids) in loop closure's memory, and until the
        #: robot is localised in it nothing is placed. New keyframes' groups wait to start the map.
        self.localised = True
        #: While relocalising: new keyframe id -> the window (groups, prediction) that saw it.
        self._waiting_windows: dict[int, tuple[list[list[Frame]], WindowPrediction]] = {}
        self._matches: list[tuple[int, np.ndarray]] = []  # verified (new keyframe, T_map_base) while relocalising
        if self._loaded is not None:
            order = sorted(self._loaded.poses)
            for n, kid in enumerate(order):  # oldest saved = -len, newest = -1: neighbours stay neighbours
                new_id = n - len(order)
                kf = next(k for k in self._loaded.keyframes if k.kid == kid)
                self.loops.memory.insert(dataclasses.replace(kf, kid=new_id))
                self._poses[new_id] = self._loaded.poses[kid]
            self.localised = not order

    def load(self, saved: SavedKeyframes | None) -> None:
        """Start in a saved map (None: a new map). Its keyframes keep their poses; the robot is
        relocalised by loop closure against them before anything is placed (see :meth:`place`)."""
        self._loaded = saved
        self.reset()

    def saved_keyframes(self, map_frame: str = "map") -> SavedKeyframes:
        """Every keyframe loop closure remembers, at its latest pose, loaded ones included (a map folder)."""
        poses = {k: self.graph.T_map_base(k) if self.graph.has(k) else T for k, T in self._poses.items()}
        kfs = [kf for k, kf in self.loops.memory.keyframes.items() if k in poses]
        return SavedKeyframes(kfs, {kf.kid: poses[kf.kid] for kf in kfs}, map_frame, self._odometry_calibration())

    def _odometry_calibration(self) -> OdometryCalibration | None:
        """The odometry's scale as a rig measured it: this run's, else the loaded map's (None: neither)."""
        mode = getattr(self, "_mode", None)  # none yet while the first map is set up
        live = mode.calibration if isinstance(mode, OdometryGraphPlacement) else None
        return live if live is not None or self._loaded is None else self._loaded.odometry_calibration

    # ------------------------------------------------------------------ queries
    def context(self, n: int) -> list[list[Frame]]:
        """The newest ``n`` placed keyframe groups: the context every next window starts with."""
        return list(self._placed_groups)[-n:] if n > 0 else []

    # ------------------------------------------------------------------ placing
    def place(self, groups: list[list[Frame]], n_context: int, prediction: WindowPrediction, *,
              poses_are_priors: bool = False) -> PlacedWindow:
        """Place one window; ``groups[:n_context]`` are placed context, the rest new keyframes.

        ``poses_are_priors``: the backend returned its pose priors as its poses (plane sweep
        computes depth from the given poses). Refining them against that depth can then only add
        the depth's noise to exact poses: it is skipped.
        """
        self.clock.reset()
        frames = [f for g in groups for f in g]
        views = prediction.views
        if len(views) != len(frames):
            raise ValueError(f"backend returned {len(views)} views for {len(frames)} frames")
        clock = self.clock
        with clock.stage("view checks"):
            usable = [i for i, v in enumerate(views)
                      if is_rigid(rigidify(v.T_world_camera)) and _any(v.valid)]
            accepted = [i in usable for i in range(len(views))]
        if not self.localised:  # relocalising: its own work (a search per keyframe), timed as no stage
            return self._relocalise(groups, n_context, frames, prediction, accepted)
        with clock.stage("view checks"):
            mode = self._mode
            if isinstance(mode, OdometryGraphPlacement):
                mode.register(groups)
                scale = mode.scale_guess(groups, frames, prediction, usable)
            else:
                scale = mode.scale_guess(groups, n_context, frames, prediction, usable)
            units = 1.0 / scale  # metres -> window units, for the checks' sigmas
            stack = self._reject_outliers(frames, prediction, accepted, units)
        owed: dict[int, np.ndarray] = {}  # view -> what its points owe after refinement (moved in one pass)
        if not poses_are_priors and self.config.refine_poses and stack is not None:
            with clock.stage("refinement"):
                prediction, owed = self._refine(groups, prediction, stack, accepted, units)
                if isinstance(mode, OdometryGraphPlacement) and prediction.pose_priors_used:
                    # Poses that lean towards the odometry share its scale error; refined on the depth, not.
                    scale = mode.rescale_refined(frames, prediction, [i for i, a in enumerate(accepted) if a])
        depth_ok = list(accepted)
        self._windows += 1
        # With odometry the window's depth is checked against the map's; without, the overlap fit is that check.
        with clock.stage("local check"):
            off = self._depth_disagreement(groups, n_context, frames, prediction, accepted, scale) \
                if isinstance(mode, OdometryGraphPlacement) else None
        if off is not None:
            placed = rejected(prediction, f"depth disagrees with the previous window's on the frames both "
                              f"predicted by a factor {off:.3g}", self._T_map_odom())
        elif isinstance(mode, OdometryGraphPlacement):
            placed = mode.place(self._windows, groups, frames, prediction, accepted, owed)
        else:
            placed = mode.place(self._windows, groups, n_context, frames, prediction, accepted, owed)
        placed.rejected_views = [i for i, a in enumerate(depth_ok) if not a]
        placed.depth_ok = depth_ok
        if placed.status is PlacementStatus.REJECTED:  # its views stay in the window frame, as refined
            with clock.stage("views out"):
                # Depth that still goes out is in metres.
                placed.prediction = dataclasses.replace(placed.prediction, views=[
                    settle(dataclasses.replace(v, depth=v.depth * scale), owed.get(i)) if ok and scale != 1.0
                    else settle(v, owed.get(i))
                    for i, (v, ok) in enumerate(zip(placed.prediction.views, depth_ok, strict=True))])
        if placed.status is not PlacementStatus.REJECTED:
            with clock.stage("report"):
                self._report(groups, placed)
        self._bookkeep(groups, n_context, frames, placed)
        return placed

    def _relocalise(self, groups: list[list[Frame]], n_context: int, frames: list[Frame],
                    prediction: WindowPrediction, accepted: list[bool]) -> PlacedWindow:
        """A window while not localised in the loaded map: its new keyframes are remembered and
        matched against the map's keyframes (by appearance; loop jobs verify); nothing is placed,
        only the depth of views that pass the view checks goes out."""
        self._reject_outliers(frames, prediction, accepted, 1.0)
        group_of = [gi for gi, g in enumerate(groups) for _ in g]
        for gi in range(n_context, len(groups)):
            g = groups[gi]
            newest = self.index.newest
            if self.index.get(g) is not None or (newest is not None and g[0].stamp_ns <= newest.stamp_ns):
                continue
            kf = self.index.add(g)
            self._waiting_windows[kf.kid] = (groups, prediction)
            while len(self._waiting_windows) > MAX_WAITING_KEYFRAMES:
                self._waiting_windows.pop(next(iter(self._waiting_windows)))
            idx = [i for i in range(len(frames)) if group_of[i] == gi and accepted[i] and frames[i].key in kf.cameras]
            if idx:
                self.loops.remember(kf.kid, kf.stamp_ns, [(frames[i], kf.cameras[frames[i].key],
                                                          prediction.views[i].depth, prediction.views[i].valid)
                                                         for i in idx])
                self.loops.propose(kf.kid, self._poses, 0.0, every=True)
        self.stats.windows_unlocalised += 1
        self.stats.loop_candidates = self.loops.stats.candidates
        placed = rejected(prediction, "not localised in the loaded map yet")
        placed.depth_ok = list(accepted)
        placed.rejected_views = [i for i, a in enumerate(accepted) if not a]
        return placed

    def _localise(self, loop: LoopMeasurement, job: LoopJob, prediction: WindowPrediction) -> PlacedWindow | None:
        """A verified match of a new keyframe with a loaded one: localised once a second match of a
        keyframe close by agrees; then that keyframe starts the map, in the loaded map's frame."""
        if loop.old_kid >= 0 or loop.new_kid < 0:
            return None  # two new keyframes: no use before the map is there
        T_map_new = self._poses[loop.old_kid] @ loop.T_old_new
        agree = any(abs(k - loop.new_kid) <= RELOCALISE_NEIGHBOURS
                    and np.linalg.norm(T[:3, 3] - T_map_new[:3, 3]) <= RELOCALISE_M * (1 + abs(k - loop.new_kid))
                    and np.degrees(rotation_angle(invert(T) @ T_map_new)) <= RELOCALISE_DEG
                    for k, T in self._matches)
        self._matches.append((loop.new_kid, T_map_new))
        if not agree:
            return None
        kf = self.index.by_kid[loop.new_kid]
        window = self._waiting_windows.get(loop.new_kid)
        if window is None:
            return None  # its window is gone from memory: a later match will do
        groups, prediction_w = window
        frames_w = [f for g in groups for f in g]
        k_views = [i for i, f in enumerate(frames_w) if f.key in kf.cameras]
        group = next(g for g in groups if g[0].stamp_ns == kf.stamp_ns)
        # The window that saw the matched keyframe starts the map, placed so that keyframe lands where
        # the loaded map has it: the next window then continues from the newest keyframes, as usual.
        self.localised = True
        if self.config.use_odometry:
            self.graph.set_origin(T_map_new @ invert(group[0].T_world_base))
        elif k_views:
            i = k_views[0]
            T_map_cam = T_map_new @ kf.cameras[frames_w[i].key]
            self._mode.start_at = Sim3.from_pose(T_map_cam) @ Sim3.from_pose(
                invert(rigidify(prediction_w.views[i].T_world_camera)))
        self._waiting_windows.clear()
        placed = self.place(groups, 0, prediction_w)
        if placed.status is PlacementStatus.REJECTED:  # the window itself would not place: wait for another match
            self.reset_localisation()
            return None
        message = (f"localised in the loaded map at the keyframe of {kf.stamp_ns * 1e-9:.2f} s "
                   f"({len(self._matches)} matches verified)")
        log.info(message)
        out = PlacedWindow(dataclasses.replace(prediction, views=[]), [], PlacementStatus.LOCALISED, 1.0, None,
                           None, placed.corrections, placed.view_corrections, message=message)
        out.T_map_odom = self._T_map_odom()
        return out

    def reset_localisation(self) -> None:
        """Back to relocalising (the window a match started the map with could not be placed)."""
        self.reset()

    def _depth_disagreement(self, groups: list[list[Frame]], n_context: int, frames: list[Frame],
                            prediction: WindowPrediction, accepted: list[bool], scale: float) -> float | None:
        """The factor by which the window's depth of the frames it shares with the map differs from
        the map's, when beyond MAX_LINK_SCALE (a unit slip, a collapsed prediction); else None."""
        n_ctx = sum(len(g) for g in groups[:n_context])
        ratios = [depth_ratio(self._anchors[frames[i].key], prediction.views[i]) for i in range(n_ctx)
                  if accepted[i] and frames[i].key in self._anchors]
        ratios = [r / scale for r in ratios if r is not None]
        if not ratios:
            return None
        r = float(np.median(ratios))
        return 1.0 / r if abs(np.log(r)) > np.log(MAX_LINK_SCALE) else None

    def _T_map_odom(self) -> np.ndarray | None:
        """map -> odom: the drift the graph estimates (wheel odometry), or, without odometry, the
        correction between the graph and the node's own continuous chain."""
        if self.config.use_odometry:
            return self.graph.T_map_odom
        if self._vo_newest is None:
            return None
        return self.graph.T_map_base(self._vo_newest) @ invert(self._vo[self._vo_newest])

    def _report(self, groups: list[list[Frame]], placed: PlacedWindow) -> None:
        """Corrections of every keyframe the graph moved (recent ones; all of them after a loop),
        this window's own included; and, without odometry, the chained estimate of the new ones."""
        kids = self.graph.keyframes[-RECENT_KEYFRAMES:]
        poses = {k: self.graph.T_map_base(k) for k in kids}
        self._poses.update(poses)
        placed.corrections, placed.view_corrections = self.index.changed(poses)
        if not self.config.use_odometry:
            for k in kids:
                if k in self._vo:
                    continue
                if self._vo_newest is None:
                    self._vo[k] = poses[k]
                else:  # the graph's relative motion from the previous keyframe, never its corrections
                    ref = self._vo_newest
                    self._vo[k] = self._vo[ref] @ invert(self.graph.T_map_base(ref)) @ poses[k]
                self._vo_newest = k
                placed.visual_odometry[self.index.by_kid[k].stamp_ns] = self._vo[k]
        placed.T_map_odom = self._T_map_odom()

    def _reject_outliers(self, frames: list[Frame], prediction: WindowPrediction, accepted: list[bool],
                         units: float) -> ViewStack | None:
        """Views that disagree with their neighbours: implausible, in geometry (depth), or off their
        path (pose). Returns the window's views stacked for refinement (None for fewer than two)."""
        cfg = self.config
        views = prediction.views
        if prediction.metric and cfg.max_depth_m > 0:  # a unit slip (mm as m) keeps views self-consistent
            checked = [i for i, a in enumerate(accepted) if a]
            for i, beyond in zip(checked, _medians_beyond([views[i] for i in checked], cfg.max_depth_m), strict=True):
                if beyond:
                    accepted[i] = False
        candidates = [i for i, a in enumerate(accepted) if a]
        if len(candidates) < 2:
            return None
        stack = ViewStack(views, candidates, STACK_SAMPLES, normals=True)
        if cfg.view_consistency <= 0:
            return stack
        for i in inconsistent_views(stack, cfg.view_consistency, tolerance=cfg.consistency_tolerance):
            accepted[i] = False
        for camera in sorted({f.camera for f in frames}):
            idx = [i for i, a in enumerate(accepted) if a and frames[i].camera == camera]
            out = pose_outliers([rigidify(views[i].T_world_camera) for i in idx], [frames[i].stamp_ns for i in idx],
                                sigma_m=cfg.view_sigma_m * units, sigma_rad=np.radians(cfg.view_sigma_deg))
            for k in out:
                accepted[idx[k]] = False
        return stack

    def _refine(self, groups: list[list[Frame]], prediction: WindowPrediction, stack: ViewStack,
                accepted: list[bool], units: float) -> tuple[WindowPrediction, dict[int, np.ndarray]]:
        """Refine the accepted views' poses; a view that had to move far more than the model's
        noise to agree with its neighbours is rejected, and the rest refined again without it.
        Returns the prediction with the refined poses and what each refined view's points owe."""
        cfg = self.config
        # Poses that lean towards the odometry they were given are not the model's own evidence: its
        # depth is. Held only loosely to them, the views move wherever the geometry observes them.
        loose = PRIOR_LEANING_SIGMA_FACTOR if prediction.pose_priors_used else 1.0
        kwargs = dict(prior_sigma_m=cfg.view_sigma_m * units * loose,
                      prior_sigma_rad=np.radians(cfg.view_sigma_deg) * loose, depth_sigma=cfg.overlap_sigma / 2,
                      kernel_threshold=cfg.robust_threshold, move_points=False, links=rig_links(groups), units=units,
                      poses_are_evidence=not prediction.pose_priors_used)
        active = [i for i, a in enumerate(accepted) if a]
        ref = refine_window_poses(prediction.views, stack, active, **kwargs)
        # Relative to the window's typical correction: a common shift of all views is no verdict.
        typical = float(np.median(list(ref.correction_chi2.values()))) if ref.correction_chi2 else 0.0
        bad = [i for i, chi2 in ref.correction_chi2.items() if chi2 > max(REJECT_CHI2, 4 * typical)]
        if bad and len(bad) <= len(active) - 2:
            for i in bad:
                accepted[i] = False
            ref = refine_window_poses(prediction.views, stack, [i for i in active if i not in bad], **kwargs)
        return dataclasses.replace(prediction, views=ref.views), ref.point_transforms

    def _bookkeep(self, groups: list[list[Frame]], n_context: int, frames: list[Frame], placed: PlacedWindow) -> None:
        s = self.stats
        s.views_rejected += len(placed.rejected_views)
        s.odometry_slips += len(placed.slips)
        s.graph_keyframes = len(self.graph.keyframes)
        if isinstance(self._mode, OdometryGraphPlacement):
            known, odometry = self._mode.model_scale(), self._mode.odometry_scale()
            if known is not None:
                s.model_scale_vs_odometry, s.model_scale_sigma = known
            if odometry is not None:
                s.odometry_scale, s.odometry_scale_sigma = odometry
        for a, b, metres in placed.slips:
            log.warning("odometry slip: the odometry moved %.2f m away from the model's geometry between the "
                        "keyframes at %.3f s and %.3f s", metres, a * 1e-9, b * 1e-9)
        if placed.status is PlacementStatus.REJECTED:
            s.windows_rejected += 1
            return
        s.windows_placed += 1
        s.last_scale, s.last_residual_m = placed.scale, placed.residual_m or 0.0
        if placed.status is PlacementStatus.RELOCALISED:
            s.chain_breaks += 1
        group_of = [gi for gi, g in enumerate(groups) for _ in g]
        new = {gi: [i for i in range(len(frames)) if group_of[i] == gi and placed.accepted[i]]
               for gi in range(n_context, len(groups))}
        new = {gi: idx for gi, idx in new.items() if idx}
        views = placed.prediction.views
        with self.clock.stage("anchors"):  # later windows measure their scale and attach through these
            fresh = [i for idx in new.values() for i in idx]
            for i, anchor in zip(fresh, make_anchors([frames[i].key for i in fresh], [views[i] for i in fresh],
                                                     self.config.anchor_samples), strict=True):
                self._anchors[frames[i].key] = anchor
            if fresh and isinstance(self._mode, OverlapChainPlacement):
                self._mode.last_pose = views[fresh[-1]].T_world_camera
        for gi, idx in new.items():
            self._placed_groups.append(groups[gi])
            kf = self.index.get(groups[gi])
            if kf is not None and self.loops.config.enabled:
                remembered = [(frames[i], kf.cameras[frames[i].key], views[i].depth, views[i].valid)
                              for i in idx if frames[i].key in kf.cameras]
                if remembered:
                    with self.clock.stage("loop memory"):
                        self.loops.remember(kf.kid, kf.stamp_ns, remembered)
                    if self.loops.searches(kf.kid):  # the search runs while the backend is idle, as of now
                        with self.clock.stage("loop search"):
                            self.loops.search_later(kf.kid, self._poses, self._position_sigma(kf.kid))
        while len(self._anchors) > MAX_ANCHORS:
            self._anchors.popitem(last=False)
        s.loop_candidates = self.loops.stats.candidates

    def _position_sigma(self, kid: int) -> float:
        """Largest standard deviation (m) of a keyframe's position in the graph: how far it may have drifted."""
        if not self.graph.has(kid) or kid not in self._poses:
            return 0.0
        try:
            cov = self.graph.marginal_covariance(kid)[3:, 3:]
        except RuntimeError:  # not yet in iSAM2 (waiting for its window)
            return 0.0
        return float(np.sqrt(max(np.linalg.eigvalsh(0.5 * (cov + cov.T)).max(), 0.0)))

    # ------------------------------------------------------------------ loop closure
    def loop_job(self) -> LoopJob | None:
        """The next loop candidate to verify, with the frames the backend must see (None: nothing to do).
        Called while the backend is idle: first what the windows left for then (candidate searches,
        the loop memory's descriptors and JPEGs)."""
        self.loop_clock.reset()
        with self.loop_clock.stage("idle work"):
            self.loops.idle_work()
        self.stats.loop_candidates = self.loops.stats.candidates
        with self.loop_clock.stage("job frames"):
            return self.loops.next_job() if self.loops.has_candidates else None

    def close_loop(self, job: LoopJob, prediction: WindowPrediction) -> PlacedWindow | None:
        """Verify ``job`` with the backend's ``prediction``; when it closes a loop, the corrections of
        every keyframe it moved (no views), else None."""
        s = self.stats
        with self.loop_clock.stage("verification"):
            loop = self.loops.verify(job, prediction)
        if isinstance(loop, str):
            s.loops_rejected += 1
            self.loops.stats.last_message = loop
            log.debug("loop %s rejected: %s", job.candidate, loop)
            return None
        s.loops_verified += 1
        if not self.localised:
            return self._localise(loop, job, prediction)
        g = self.graph
        if loop.old_kid < 0 and loop.old_kid in self._poses:  # a keyframe of the loaded map: held where it is
            g.add_fixed(loop.old_kid, self._poses[loop.old_kid])
        if not (g.has(loop.old_kid) and g.has(loop.new_kid)):
            return None
        ready = self.loops.confirm(loop, g.T_map_base(loop.old_kid), g.T_map_base(loop.new_kid))
        if not ready:
            return None
        with self.loop_clock.stage("loop in graph"):
            for m in ready:
                g.add_loop(m.old_kid, m.new_kid, m.T_old_new, self.loops.sigmas())
            s.loops_closed += len(ready)
            poses = {k: g.T_map_base(k) for k in g.keyframes}
            self._poses.update(poses)
            corrections, view_corrections = self.index.changed(poses)
        stamps = {k: self.loops.memory.keyframes[k].stamp_ns * 1e-9 for k in (loop.old_kid, loop.new_kid)}
        message = (f"loop closed between the keyframes at {stamps[loop.old_kid]:.2f} s and "
                   f"{stamps[loop.new_kid]:.2f} s ({loop.source}, {loop.overlap:.0%} overlap, {len(ready)} "
                   f"loops); {len(corrections)} keyframes moved")
        log.info(message)
        placed = PlacedWindow(dataclasses.replace(prediction, views=[]), [], PlacementStatus.LOOP_CLOSED, 1.0, None,
                              None, corrections, view_corrections, message=message)
        placed.T_map_odom = self._T_map_odom()
        return placed
