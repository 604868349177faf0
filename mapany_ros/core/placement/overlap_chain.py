"""Placement without odometry: windows chained to the map through the frames they share.

The same pixels predicted by the window and by the placed one give dense 3D-3D correspondences
(:mod:`.overlap`), fitted by a robust, confidence-weighted similarity. The map's scale is carried
along the chain by a 1-D Kalman filter in which each metric window measures it anew. A window
that cannot attach is rejected, the next one re-attaches to the last placed keyframes; only when
that keeps failing is a break declared, and the map continues from the last placed pose.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

import numpy as np

from mapany_ros.core.alignment import Sim3, rigidify, robust_similarity, weighted_similarity
from mapany_ros.core.backends.base import ViewPrediction, WindowPrediction
from mapany_ros.core.frames import Frame
from mapany_ros.core.geometry import invert, make_pose
from mapany_ros.core.placement.config import PlacementConfig
from mapany_ros.core.placement.keyframe_index import KeyframeIndex
from mapany_ros.core.placement.overlap import Anchor, correspondences, depth_ratio
from mapany_ros.core.placement.placed import PlacedWindow, PlacementStatus, moved, rejected
from mapany_ros.core.placement.pose_graph import Observation, PoseGraph
from mapany_ros.core.placement.stage_clock import StageClock

log = logging.getLogger(__name__)

#: Least relative scale error assumed for one link of the overlap chain.
MIN_CHAIN_SCALE_SIGMA = 0.005
#: REP 103 body axes (x forward, y left, z up) -> optical axes (x right, y down, z forward).
R_BODY_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


class OverlapChainPlacement:
    """Windows chained through their shared frames' anchors (map-frame points of placed views)."""

    def __init__(self, config: PlacementConfig, anchors: collections.OrderedDict[tuple[str, int], Anchor],
                 extrinsic: Callable[[str], np.ndarray | None], graph: PoseGraph, index: KeyframeIndex,
                 clock: StageClock | None = None) -> None:
        self.config = config
        self.clock = clock if clock is not None else StageClock()
        self._anchors = anchors
        self._extrinsic = extrinsic
        self.graph = graph
        self.index = index
        self._failures = 0
        #: Newest placed camera pose, where the map continues after a break.
        self.last_pose: np.ndarray | None = None
        #: Scale of the newest placed window (map units per window unit).
        self.scale = 1.0
        #: Window -> map of the first window when the map is not new (relocalised in a loaded one).
        self.start_at: Sim3 | None = None
        #: Variance of the map's log-scale error where the chain ends.
        self._scale_var = config.metric_scale_sigma**2
        self._pending_scale_var = self._scale_var

    def scale_guess(self, groups: list[list[Frame]], n_context: int, frames: list[Frame],
                    prediction: WindowPrediction, usable: list[int]) -> float:
        """The window's scale (window units -> map metres) before its views are checked: a metric
        window's is about 1; a non-metric one's is its depth against the map's on the shared frames."""
        if prediction.metric:
            return 1.0
        n_ctx = sum(len(g) for g in groups[:n_context])
        ratios = [depth_ratio(self._anchors[frames[i].key], prediction.views[i]) for i in usable
                  if i < n_ctx and frames[i].key in self._anchors]
        ratios = [r for r in ratios if r is not None]
        return float(np.median(ratios)) if ratios else self.scale

    def _initial_frame(self, frame: Frame, T_window_camera: np.ndarray) -> Sim3:
        """Window -> map for the first window: REP 103 map at the first keyframe's base (or camera)."""
        T_base_cam = frame.T_base_camera if frame.T_base_camera is not None else self._extrinsic(frame.camera)
        T_map_cam = T_base_cam if T_base_cam is not None else make_pose(R_BODY_OPTICAL, np.zeros(3))
        return Sim3.from_pose(T_map_cam @ invert(T_window_camera))

    def place(self, j: int, groups: list[list[Frame]], n_context: int, frames: list[Frame],
              prediction: WindowPrediction, accepted: list[bool], owed: dict[int, np.ndarray] | None = None
              ) -> PlacedWindow:
        """Place window ``j`` by its shared frames (``groups[:n_context]`` are placed context).

        ``owed``: view index -> the transform its points still owe (refinement's, see :func:`.placed.settle`).
        """
        owed = owed or {}
        views = prediction.views
        ok = [i for i in range(len(frames)) if accepted[i]]
        if not ok:
            return rejected(prediction, "no view of the window is usable")
        if self.last_pose is None:
            first = ok[0]
            S = self.start_at if self.start_at is not None else self._initial_frame(
                frames[first], rigidify(views[first].T_world_camera))
            self.start_at = None
            return self._finish(j, groups, frames, prediction, accepted, S, PlacementStatus.STARTED, None, owed=owed)
        n_ctx_frames = sum(len(g) for g in groups[:n_context])
        shared = [i for i in ok if i < n_ctx_frames and frames[i].key in self._anchors]
        with self.clock.stage("local check"):
            fit, message = self._fit_overlap(frames, views, shared, prediction.metric, owed)
        if fit is not None:
            self._failures = 0
            self._scale_var = self._pending_scale_var
            S, residual = fit
            return self._finish(j, groups, frames, prediction, accepted, S, PlacementStatus.PLACED, residual,
                                owed=owed)
        self._failures += 1
        if self._failures < self.config.max_attach_failures:
            return rejected(prediction, message)
        # A break: continue from the newest placed pose rather than from the origin.
        self._failures = 0
        ref = shared[-1] if shared else ok[0]
        T_map_ref = self._anchors[frames[ref].key].T_map_camera if shared else self.last_pose
        scale = self.scale if not prediction.metric else 1.0
        S = Sim3.from_pose(T_map_ref) @ Sim3(np.eye(3), np.zeros(3), scale) @ Sim3.from_pose(
            invert(rigidify(views[ref].T_world_camera)))
        log.warning("placement: %s; continuing from the last placed pose", message)
        return self._finish(j, groups, frames, prediction, accepted, S, PlacementStatus.RELOCALISED, None, message,
                            owed)

    def _fit_overlap(self, frames: list[Frame], views: list[ViewPrediction], shared: list[int], metric: bool,
                     owed: dict[int, np.ndarray]) -> tuple[tuple[Sim3, float] | None, str]:
        """Window -> map from the shared frames' dense correspondences, or why it failed."""
        if not shared:
            return None, "the window shares no placed frame with the map"
        parts = [correspondences(self._anchors[frames[i].key], views[i], owed.get(i)) for i in shared]
        src = np.concatenate([p[0] for p in parts])
        dst = np.concatenate([p[1] for p in parts])
        depth = np.concatenate([p[2] for p in parts])
        weight = np.concatenate([p[3] for p in parts])
        if len(src) < 50:
            return None, f"only {len(src)} overlap correspondences"
        cfg = self.config
        sigma = cfg.overlap_sigma * depth + 0.01
        fit = robust_similarity(src, dst, sigma, weight, kernel=cfg.robust_kernel, threshold=cfg.robust_threshold)
        S = fit.transform
        # The map's scale, as a 1-D Kalman filter along the chain: each link carries the scale on
        # with its own error (the shared views' spread), each metric window measures it anew.
        var_pred = self._scale_var + self._chain_scale_variance(parts, fit.weights)
        self._pending_scale_var = var_pred
        if metric:
            gain = var_pred / (var_pred + cfg.metric_scale_sigma**2)
            self._pending_scale_var = (1.0 - gain) * var_pred
            S = weighted_similarity(src, dst, np.maximum(fit.weights, 1e-12), scale=float(S.scale ** (1.0 - gain)))
        residuals = np.linalg.norm(S.apply_points(src) - dst, axis=1)
        inliers = residuals < 3 * sigma
        ratio = float(inliers.mean())
        residual = float(np.median(residuals))
        limit = cfg.max_residual_m
        if ratio < cfg.min_overlap_inliers or (limit > 0 and residual > limit):
            return None, (f"overlap with the map does not fit: {ratio:.0%} of {len(src)} correspondences within "
                          f"3 sigma, median {residual:.3f} m")
        return (S, residual), ""

    def _chain_scale_variance(self, parts: list[tuple[np.ndarray, ...]], weights: np.ndarray) -> float:
        """How well one link of the chain knows the scale: the spread of the shared views' own scales.

        Each shared view fits its own similarity; their log-scales disagree by the views' pose and
        depth errors, which is what the link's scale inherits (at least MIN_CHAIN_SCALE_SIGMA).
        """
        logs, start = [], 0
        for src, dst, _, _ in parts:
            n = len(src)
            w = weights[start : start + n]
            if n >= 50 and w.sum() > 0:
                logs.append(np.log(weighted_similarity(src, dst, np.maximum(w, 1e-12)).scale))
            start += n
        spread = float(np.var(logs) / len(logs)) if len(logs) >= 2 else 0.0
        return max(spread, MIN_CHAIN_SCALE_SIGMA**2)

    def _finish(self, j: int, groups: list[list[Frame]], frames: list[Frame], prediction: WindowPrediction,
                accepted: list[bool], S: Sim3, status: PlacementStatus, residual: float | None, message: str = "",
                owed: dict[int, np.ndarray] | None = None) -> PlacedWindow:
        """Commit the window, placed by ``S``, to the pose graph, and read its views' poses back."""
        self.scale = S.scale
        graph, index = self.graph, self.index
        for g in groups:
            newest = index.newest
            if index.get(g) is None and (newest is None or g[0].stamp_ns > newest.stamp_ns):
                index.add(g)
        group_of = [g for g, grp in enumerate(groups) for _ in grp]
        obs, new_poses = [], {}
        chained = [S.apply_pose(v.T_world_camera) for v in prediction.views]
        kfs = [index.get(groups[group_of[i]]) for i in range(len(frames))]
        for i in range(len(frames)):
            kf = kfs[i]
            if not accepted[i] or kf is None or frames[i].key not in kf.cameras:
                continue
            T_base_cam = kf.cameras[frames[i].key]
            T_win = rigidify(prediction.views[i].T_world_camera)
            T_win[:3, 3] *= S.scale
            obs.append(Observation(kf.kid, T_win @ invert(T_base_cam)))
            if not graph.has(kf.kid) and kf.kid not in new_poses:
                new_poses[kf.kid] = chained[i] @ invert(T_base_cam)
        bridge = None
        if obs and graph.keyframes and not any(graph.has(o.kid) for o in obs):
            # Nothing shared with the graph (a break): continue from the newest keyframe, loosely.
            last, first = graph.keyframes[-1], min(new_poses)
            bridge = (last, first, invert(graph.T_map_base(last)) @ new_poses[first])
        with self.clock.stage("graph commit"):
            if obs:
                graph.commit_window(j, obs, make_pose(S.R, S.t), new_poses, bridge=bridge)
            poses: list[np.ndarray | None] = []
            for i in range(len(frames)):
                kf = kfs[i]
                if not accepted[i]:
                    poses.append(None)
                elif kf is not None and frames[i].key in kf.cameras and graph.has(kf.kid):
                    poses.append(graph.T_map_base(kf.kid) @ kf.cameras[frames[i].key])
                else:
                    poses.append(chained[i])
        with self.clock.stage("views out"):
            out = moved(prediction, accepted, poses, S.scale, owed)
        return PlacedWindow(out, accepted, status, S.scale, residual, None, message=message)
