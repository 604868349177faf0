"""The placement stage: every window, whatever backend predicted it, goes into the map here, once.

A backend answers in a frame of its own (see :class:`~mapany_ros.core.backends.base.ViewPrediction`).
:class:`WindowPlacer` turns that into map-frame poses, depth and points:

1. views that disagree with their neighbours' geometry are dropped (:mod:`.view_check`);
2. with odometry, the window joins a sliding-window pose graph with the odometry (:mod:`.pose_graph`);
   every prior stays in the odometry frame, and ``map -> odom`` is the drift the graph estimates;
3. without odometry, the window is chained to the map through the frames it shares with placed
   windows: dense 3D-3D correspondences, robust Sim(3) fit (:mod:`.overlap`); a metric window's
   scale is only nudged towards the chain's, so the map stays metric without jumps.

The map frame follows REP 103/105: with odometry it is the odometry frame at the first keyframe;
without, the first keyframe's base_frame pose (through the static extrinsic), or the first camera
turned into x forward, z up. A window that cannot be attached is rejected, and the next one
re-attaches to the last placed keyframes; only when that keeps failing is a break declared, and
the map continues from the last placed pose (never from the origin).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from mapany_ros.core.alignment import Sim3, rigidify, robust_similarity, weighted_similarity
from mapany_ros.core.backends.base import ViewPrediction, WindowPrediction
from mapany_ros.core.frames import Frame
from mapany_ros.core.geometry import invert, is_rigid, make_pose, transform_points
from mapany_ros.core.placement.multiview import ViewStack
from mapany_ros.core.placement.overlap import Anchor, correspondences, make_anchor
from mapany_ros.core.placement.pose_graph import GraphConfig, Observation, PoseGraph
from mapany_ros.core.placement.refine import refine_window_poses
from mapany_ros.core.placement.view_check import inconsistent_views, pose_outliers

log = logging.getLogger(__name__)

#: A view whose refinement moved it beyond this (chi-square of the model's pose noise, 6 dof,
#: 99.9 %) disagrees with its neighbours and is rejected.
REJECT_CHI2 = 22.46
#: Least relative scale error assumed for one link of the overlap chain.
MIN_CHAIN_SCALE_SIGMA = 0.005
#: Two windows' depths of the frames they share may differ by this factor at most (a unit slip, a
#: collapsed prediction); beyond, the newer window is rejected.
MAX_LINK_SCALE = 1.25
#: Points sampled per view for the view checks and the refinement.
STACK_SAMPLES = 1000
#: Placed views kept as anchors for later windows (context is a few groups of a few cameras).
MAX_ANCHORS = 64
#: REP 103 body axes (x forward, y left, z up) -> optical axes (x right, y down, z forward).
R_BODY_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


class PlacementStatus(enum.Enum):
    STARTED = "started the map"
    PLACED = "placed"
    RELOCALISED = "chain broken: continued from the last placed pose"
    REJECTED = "rejected"


@dataclass
class PlacementConfig:
    """Every knob of the placement stage; validated by the node's parameter layer."""

    use_odometry: bool = True
    #: Reject a window whose placement residual exceeds this, metres (0 = never).
    max_residual_m: float = 0.5
    #: A view's best agreement with a neighbour must reach this fraction of the window's median (0 = no check).
    view_consistency: float = 0.85
    #: Relative depth difference under which a point agrees with a neighbour's depth.
    consistency_tolerance: float = 0.08
    #: A metric view whose median depth is beyond this is implausible (0 = no limit).
    max_depth_m: float = 100.0
    robust_kernel: str = "cauchy"
    robust_threshold: float = 2.0
    view_sigma_m: float = 0.05
    view_sigma_deg: float = 1.0
    #: Expected per-window scale error of a metric model (relative, one sigma).
    metric_scale_sigma: float = 0.03
    odom_sigma_ratio: float = 0.05
    odom_sigma_deg_per_m: float = 5.0
    graph_windows: int = 4
    #: Relative depth error assumed for overlap correspondences (whitening of the robust fit).
    overlap_sigma: float = 0.02
    #: Fraction of overlap correspondences that must fit for a window to attach.
    min_overlap_inliers: float = 0.5
    #: Consecutive windows that fail to attach before a break is declared.
    max_attach_failures: int = 2
    anchor_samples: int = 3000
    #: Refine each window's view poses so that their depth maps agree (see :mod:`.refine`).
    refine_poses: bool = True

    def graph(self) -> GraphConfig:
        return GraphConfig(
            view_sigma_m=self.view_sigma_m, view_sigma_rad=np.radians(self.view_sigma_deg),
            odom_sigma_ratio=self.odom_sigma_ratio, odom_sigma_rad_per_m=np.radians(self.odom_sigma_deg_per_m),
            kernel=self.robust_kernel, kernel_threshold=self.robust_threshold, max_windows=self.graph_windows,
        )


@dataclass
class PlacementStats:
    windows_placed: int = 0
    windows_rejected: int = 0
    views_rejected: int = 0
    chain_breaks: int = 0
    last_scale: float = 1.0
    last_residual_m: float = 0.0


@dataclass
class PlacedWindow:
    """A window in the map frame and what placement decided about it."""

    #: The backend's prediction with every accepted view moved into the map frame.
    prediction: WindowPrediction
    #: Per view: placed and worth publishing.
    accepted: list[bool]
    status: PlacementStatus
    scale: float
    residual_m: float | None
    #: Drift estimate map -> odom after this window (None without odometry).
    T_map_odom: np.ndarray | None
    #: Group stamp -> corrected T_map_base (camera pose without extrinsic) of keyframes still adjustable.
    corrections: dict[int, np.ndarray] = field(default_factory=dict)
    message: str = ""
    #: Views judged wrong (context views included): disagreeing with their neighbours or the priors.
    rejected_views: list[int] = field(default_factory=list)


def move_view(view: ViewPrediction, T_window_camera: np.ndarray, T_map_camera: np.ndarray, scale: float
              ) -> ViewPrediction:
    """The view with depth scaled and points carried from the window frame to the map frame.

    The camera's map pose may differ from what the window's single transform would give (the
    pose graph refines each keyframe), so points follow their camera: window -> camera frame
    (rigid), scale, camera -> map.
    """
    A = Sim3.from_pose(T_map_camera) @ Sim3(np.eye(3), np.zeros(3), scale) @ Sim3.from_pose(invert(T_window_camera))
    points = transform_points(view.points_world, A.matrix())
    return dataclasses.replace(view, depth=view.depth * scale, points_world=points, T_world_camera=T_map_camera)


class WindowPlacer:
    """Places windows in the map (see module docstring). Called from the pipeline's worker thread."""

    def __init__(self, config: PlacementConfig, extrinsic: Callable[[str], np.ndarray | None]) -> None:
        self.config = config
        self._extrinsic = extrinsic
        self.stats = PlacementStats()
        self.reset()

    def reset(self) -> None:
        """Forget the map (a restart of the input): the next window starts a new one."""
        self._anchors: collections.OrderedDict[tuple[str, int], Anchor] = collections.OrderedDict()
        self._placed_groups: collections.deque[list[Frame]] = collections.deque(maxlen=16)
        self._graph = PoseGraph(self.config.graph()) if self.config.use_odometry else None
        self._kids: dict[int, int] = {}  # group stamp -> keyframe id in the pose graph
        self._next_kid = 0
        self._newest_stamp = -1
        self._windows = 0
        self._failures = 0
        self._last_pose: np.ndarray | None = None  # newest placed camera pose, for re-localisation
        self._scale = 1.0
        self._poses_are_priors = False
        #: Variance of the map's log-scale error where the chain ends (overlap chaining only).
        self._scale_var = self.config.metric_scale_sigma**2
        self._pending_scale_var = self._scale_var

    # ------------------------------------------------------------------ queries
    def context(self, n: int) -> list[list[Frame]]:
        """The newest ``n`` placed keyframe groups: the context every next window starts with."""
        return list(self._placed_groups)[-n:] if n > 0 else []

    # ------------------------------------------------------------------ placing
    def place(self, groups: list[list[Frame]], n_context: int, prediction: WindowPrediction, *,
              poses_are_priors: bool = False) -> PlacedWindow:
        """Place one window; ``groups[:n_context]`` are placed context, the rest new keyframes.

        ``poses_are_priors``: the backend returned its pose priors as its poses (plane sweep
        computes depth from the given poses). Refining them against that depth, or linking
        windows through it, can then only add the depth's noise to exact poses: both are skipped.
        """
        frames = [f for g in groups for f in g]
        views = prediction.views
        if len(views) != len(frames):
            raise ValueError(f"backend returned {len(views)} views for {len(frames)} frames")
        usable = [i for i, v in enumerate(views) if is_rigid(rigidify(v.T_world_camera)) and bool(v.valid.any())]
        accepted = [i in usable for i in range(len(views))]
        stack = self._reject_outliers(frames, prediction, accepted)
        self._poses_are_priors = poses_are_priors
        if not poses_are_priors and self.config.refine_poses and stack is not None:
            prediction = self._refine(prediction, stack, accepted)
        group_of = [gi for gi, g in enumerate(groups) for _ in g]
        self._windows += 1
        if self._graph is not None:
            placed = self._place_with_odometry(groups, n_context, frames, group_of, prediction, accepted)
        else:
            placed = self._place_by_overlap(groups, n_context, frames, prediction, accepted)
        placed.rejected_views = [i for i, a in enumerate(accepted) if not a]
        self._bookkeep(groups, n_context, frames, group_of, placed)
        return placed

    def _units(self, prediction: WindowPrediction) -> float:
        """Metres -> window units: 1 for a metric window, else from the last placed window's scale."""
        return 1.0 if prediction.metric else 1.0 / self._scale

    def _reject_outliers(self, frames: list[Frame], prediction: WindowPrediction, accepted: list[bool]
                         ) -> ViewStack | None:
        """Views that disagree with their neighbours: implausible, in geometry (depth), or off their
        path (pose). Returns the window's views stacked for refinement (None for fewer than two)."""
        cfg = self.config
        views = prediction.views
        if prediction.metric and cfg.max_depth_m > 0:  # a unit slip (mm as m) keeps views self-consistent
            for i, a in enumerate(accepted):
                d = views[i].depth[views[i].valid & torch.isfinite(views[i].depth)]
                if a and d.numel() and float(d.median()) > cfg.max_depth_m:
                    accepted[i] = False
        candidates = [i for i, a in enumerate(accepted) if a]
        if len(candidates) < 2:
            return None
        stack = ViewStack(views, candidates, STACK_SAMPLES, normals=True)
        if cfg.view_consistency <= 0:
            return stack
        for i in inconsistent_views(stack, cfg.view_consistency, tolerance=cfg.consistency_tolerance):
            accepted[i] = False
        units = self._units(prediction)
        for camera in sorted({f.camera for f in frames}):
            idx = [i for i, a in enumerate(accepted) if a and frames[i].camera == camera]
            out = pose_outliers([rigidify(views[i].T_world_camera) for i in idx], [frames[i].stamp_ns for i in idx],
                                sigma_m=cfg.view_sigma_m * units, sigma_rad=np.radians(cfg.view_sigma_deg))
            for k in out:
                accepted[idx[k]] = False
        return stack

    def _refine(self, prediction: WindowPrediction, stack: ViewStack, accepted: list[bool]) -> WindowPrediction:
        """Refine the accepted views' poses; a view that had to move far more than the model's
        noise to agree with its neighbours is rejected, and the rest refined again without it."""
        cfg = self.config
        kwargs = dict(prior_sigma_m=cfg.view_sigma_m * self._units(prediction),
                      prior_sigma_rad=np.radians(cfg.view_sigma_deg), depth_sigma=cfg.overlap_sigma / 2,
                      kernel_threshold=cfg.robust_threshold)
        active = [i for i, a in enumerate(accepted) if a]
        ref = refine_window_poses(prediction.views, stack, active, **kwargs)
        # Relative to the window's typical correction: a common shift of all views is no verdict.
        typical = float(np.median(list(ref.correction_chi2.values()))) if ref.correction_chi2 else 0.0
        bad = [i for i, chi2 in ref.correction_chi2.items() if chi2 > max(REJECT_CHI2, 4 * typical)]
        if bad and len(bad) <= len(active) - 2:
            for i in bad:
                accepted[i] = False
            ref = refine_window_poses(prediction.views, stack, [i for i in active if i not in bad], **kwargs)
        return dataclasses.replace(prediction, views=ref.views)

    def _bookkeep(self, groups: list[list[Frame]], n_context: int, frames: list[Frame], group_of: list[int],
                  placed: PlacedWindow) -> None:
        s = self.stats
        s.views_rejected += len(placed.rejected_views)
        if placed.status is PlacementStatus.REJECTED:
            s.windows_rejected += 1
            return
        s.windows_placed += 1
        s.last_scale, s.last_residual_m = placed.scale, placed.residual_m or 0.0
        if placed.status is PlacementStatus.RELOCALISED:
            s.chain_breaks += 1
        for gi in range(n_context, len(groups)):
            idx = [i for i in range(len(frames)) if group_of[i] == gi and placed.accepted[i]]
            if not idx:
                continue
            self._placed_groups.append(groups[gi])
            for i in idx:
                view = placed.prediction.views[i]
                self._last_pose = view.T_world_camera
                if self._graph is None:  # the overlap chain needs the points; the pose graph does not
                    self._anchors[frames[i].key] = make_anchor(frames[i].key, view, self.config.anchor_samples)
        while len(self._anchors) > MAX_ANCHORS:
            self._anchors.popitem(last=False)

    def _moved(self, prediction: WindowPrediction, accepted: list[bool], poses: list[np.ndarray | None],
               scale: float) -> WindowPrediction:
        views = [
            move_view(v, rigidify(v.T_world_camera), T, scale) if a and T is not None else v
            for v, a, T in zip(prediction.views, accepted, poses, strict=True)
        ]
        return dataclasses.replace(prediction, views=views)

    def _rejected(self, prediction: WindowPrediction, message: str, T_map_odom: np.ndarray | None = None
                  ) -> PlacedWindow:
        log.debug("window rejected: %s", message)
        return PlacedWindow(prediction, [False] * len(prediction.views), PlacementStatus.REJECTED, 1.0, None,
                            T_map_odom, message=message)

    # ------------------------------------------------------------------ with odometry
    def _place_with_odometry(self, groups: list[list[Frame]], n_context: int, frames: list[Frame],
                             group_of: list[int], prediction: WindowPrediction, accepted: list[bool]
                             ) -> PlacedWindow:
        graph = self._graph
        assert graph is not None
        for g in groups:
            stamp = g[0].stamp_ns
            # A context keyframe that already left the graph stays out (the graph only grows forward).
            if stamp not in self._kids and stamp > self._newest_stamp:
                if g[0].T_world_base is None:
                    raise ValueError("placement with odometry needs T_world_base on every frame")
                self._kids[stamp] = self._next_kid
                graph.add_keyframe(self._next_kid, g[0].T_world_base)
                self._next_kid += 1
                self._newest_stamp = stamp
        T_base_cam = [invert(f.T_world_base) @ f.T_world_camera for f in frames]
        T_win_cam = [rigidify(v.T_world_camera) for v in prediction.views]
        idx = [i for i in range(len(frames)) if accepted[i] and self._kids.get(groups[group_of[i]][0].stamp_ns)
               is not None and graph.has(self._kids[groups[group_of[i]][0].stamp_ns])]
        if not idx:
            return self._rejected(prediction, "no view of the window is usable", graph.T_map_odom)
        scale = 1.0 if prediction.metric else self._odometry_scale(frames, T_base_cam, T_win_cam, idx)
        obs = []
        for i in idx:
            T = T_win_cam[i].copy()
            T[:3, 3] *= scale
            obs.append(Observation(self._kids[groups[group_of[i]][0].stamp_ns], T @ invert(T_base_cam[i])))
        j = self._windows
        links, link_scales = ([], []) if self._poses_are_priors else self._window_links(frames, prediction, idx,
                                                                                         scale)
        off = [s_ for s_ in link_scales if abs(np.log(s_)) > np.log(MAX_LINK_SCALE)]
        if off:
            return self._rejected(prediction, f"depth disagrees with the previous window's on the frames both "
                                  f"predicted by a factor {off[0]:.3g}", graph.T_map_odom)
        solve = graph.add_window(j, obs, links)
        limit = self.config.max_residual_m
        if limit > 0 and solve.residual_m > limit:
            graph.remove_window(j)
            return self._rejected(prediction, f"window disagrees with odometry by {solve.residual_m:.3f} m RMS "
                                  f"(placement.max_residual_m = {limit})", graph.T_map_odom)
        for i, ok in zip(idx, solve.accepted, strict=True):
            accepted[i] = accepted[i] and ok
        poses: list[np.ndarray | None] = [None] * len(frames)
        for i in idx:
            poses[i] = graph.T_map_base(self._kids[groups[group_of[i]][0].stamp_ns]) @ T_base_cam[i]
        placed = [accepted[i] and poses[i] is not None for i in range(len(frames))]
        corrections = {stamp: graph.T_map_base(kid) for stamp, kid in self._kids.items() if graph.has(kid)}
        gone = graph.marginalize()
        if gone:
            gone_set = set(gone)
            self._kids = {s: k for s, k in self._kids.items() if k not in gone_set}
        self._scale = scale
        for i in range(len(frames)):
            if placed[i] and group_of[i] >= n_context:  # later windows link to this one through these
                self._anchors[frames[i].key] = make_anchor(frames[i].key, prediction.views[i],
                                                           self.config.anchor_samples, window=j, scale=scale)
        return PlacedWindow(self._moved(prediction, placed, poses, scale), placed, PlacementStatus.PLACED,
                            scale, solve.residual_m, graph.T_map_odom, corrections)

    def _window_links(self, frames: list[Frame], prediction: WindowPrediction, idx: list[int], scale: float
                      ) -> tuple[list[tuple[int, np.ndarray]], list[float]]:
        """Rigid transforms to earlier windows from the dense correspondences of the frames they share,
        and the relative scale those correspondences show (1 when both windows agree on depth)."""
        graph = self._graph
        assert graph is not None
        by_window: dict[int, list[tuple[np.ndarray, ...]]] = {}
        for i in idx:
            anchor = self._anchors.get(frames[i].key)
            if anchor is not None and anchor.window is not None and graph.has_window(anchor.window):
                by_window.setdefault(anchor.window, []).append(correspondences(anchor, prediction.views[i]))
        links, scales = [], []
        cfg = self.config
        for w, parts in by_window.items():
            src = np.concatenate([p[0] for p in parts]) * scale
            dst = np.concatenate([p[1] for p in parts])
            if len(src) < 50:
                continue
            depth = np.concatenate([p[2] for p in parts])
            weight = np.concatenate([p[3] for p in parts])
            kwargs = dict(kernel=cfg.robust_kernel, threshold=cfg.robust_threshold)
            sigma = cfg.overlap_sigma * depth + 0.01
            scales.append(robust_similarity(src, dst, sigma, weight, **kwargs).transform.scale)
            fit = robust_similarity(src, dst, sigma, weight, fit_scale=False, **kwargs)
            links.append((w, make_pose(fit.transform.R, fit.transform.t)))
        return links, scales

    def _odometry_scale(self, frames: list[Frame], T_base_cam: list[np.ndarray], T_win_cam: list[np.ndarray],
                        idx: list[int]) -> float:
        """Scale of a non-metric window: its camera centres fitted to the odometry's (robust Sim(3))."""
        src = np.stack([T_win_cam[i][:3, 3] for i in idx])
        dst = np.stack([frames[i].T_world_camera[:3, 3] for i in idx])
        if len(idx) < 2 or np.sqrt(np.mean(np.sum((dst - dst.mean(0)) ** 2, axis=1))) < 0.05:
            return self._scale  # no baseline: the previous window's scale is the best guess
        fit = robust_similarity(src, dst, np.full(len(idx), self.config.view_sigma_m),
                                kernel=self.config.robust_kernel, threshold=self.config.robust_threshold)
        return fit.transform.scale

    # ------------------------------------------------------------------ without odometry
    def _initial_frame(self, frame: Frame, T_window_camera: np.ndarray) -> Sim3:
        """Window -> map for the first window: REP 103 map at the first keyframe's base (or camera)."""
        T_base_cam = self._extrinsic(frame.camera)
        T_map_cam = T_base_cam if T_base_cam is not None else make_pose(R_BODY_OPTICAL, np.zeros(3))
        return Sim3.from_pose(T_map_cam @ invert(T_window_camera))

    def _place_by_overlap(self, groups: list[list[Frame]], n_context: int, frames: list[Frame],
                          prediction: WindowPrediction, accepted: list[bool]) -> PlacedWindow:
        views = prediction.views
        ok = [i for i in range(len(frames)) if accepted[i]]
        if not ok:
            return self._rejected(prediction, "no view of the window is usable")
        if self._last_pose is None:
            first = ok[0]
            S = self._initial_frame(frames[first], rigidify(views[first].T_world_camera))
            return self._finish(prediction, accepted, S, PlacementStatus.STARTED, None)
        n_ctx_frames = sum(len(g) for g in groups[:n_context])
        shared = [i for i in ok if i < n_ctx_frames and frames[i].key in self._anchors]
        fit, message = self._fit_overlap(frames, views, shared, prediction.metric)
        if fit is not None:
            self._failures = 0
            self._scale_var = self._pending_scale_var
            S, residual = fit
            return self._finish(prediction, accepted, S, PlacementStatus.PLACED, residual)
        self._failures += 1
        if self._failures < self.config.max_attach_failures:
            return self._rejected(prediction, message)
        # A break: continue from the newest placed pose rather than from the origin.
        self._failures = 0
        ref = shared[-1] if shared else ok[0]
        T_map_ref = self._anchors[frames[ref].key].T_map_camera if shared else self._last_pose
        scale = self._scale if not prediction.metric else 1.0
        S = Sim3.from_pose(T_map_ref) @ Sim3(np.eye(3), np.zeros(3), scale) @ Sim3.from_pose(
            invert(rigidify(views[ref].T_world_camera)))
        log.warning("placement: %s; continuing from the last placed pose", message)
        return self._finish(prediction, accepted, S, PlacementStatus.RELOCALISED, None, message)

    def _fit_overlap(self, frames: list[Frame], views: list[ViewPrediction], shared: list[int], metric: bool
                     ) -> tuple[tuple[Sim3, float] | None, str]:
        """Window -> map from the shared frames' dense correspondences, or why it failed."""
        if not shared:
            return None, "the window shares no placed frame with the map"
        parts = [correspondences(self._anchors[frames[i].key], views[i]) for i in shared]
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

    def _finish(self, prediction: WindowPrediction, accepted: list[bool], S: Sim3, status: PlacementStatus,
                residual: float | None, message: str = "") -> PlacedWindow:
        poses = [S.apply_pose(v.T_world_camera) for v in prediction.views]
        self._scale = S.scale
        return PlacedWindow(self._moved(prediction, accepted, poses, S.scale), accepted, status, S.scale, residual,
                            None, message=message)

