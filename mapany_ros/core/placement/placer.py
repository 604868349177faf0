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
from collections.abc import Callable

import numpy as np
import torch

from mapany_ros.core.alignment import rigidify
from mapany_ros.core.backends.base import WindowPrediction
from mapany_ros.core.frames import Frame
from mapany_ros.core.geometry import is_rigid
from mapany_ros.core.placement.config import PlacementConfig
from mapany_ros.core.placement.multiview import ViewStack
from mapany_ros.core.placement.odometry_graph import OdometryGraphPlacement
from mapany_ros.core.placement.overlap import Anchor, make_anchor
from mapany_ros.core.placement.overlap_chain import OverlapChainPlacement
from mapany_ros.core.placement.placed import PlacedWindow, PlacementStats, PlacementStatus
from mapany_ros.core.placement.refine import refine_window_poses
from mapany_ros.core.placement.view_check import inconsistent_views, pose_outliers

#: A view whose refinement moved it beyond this (chi-square of the model's pose noise, 6 dof,
#: 99.9 %) disagrees with its neighbours and is rejected.
REJECT_CHI2 = 22.46
#: Points sampled per view for the view checks and the refinement.
STACK_SAMPLES = 1000
#: Placed views kept as anchors for later windows (context is a few groups of a few cameras).
MAX_ANCHORS = 64


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
        self._mode: OdometryGraphPlacement | OverlapChainPlacement = (
            OdometryGraphPlacement(self.config, self._anchors) if self.config.use_odometry
            else OverlapChainPlacement(self.config, self._anchors, self._extrinsic))
        self._windows = 0

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
        if not poses_are_priors and self.config.refine_poses and stack is not None:
            prediction = self._refine(prediction, stack, accepted)
        group_of = [gi for gi, g in enumerate(groups) for _ in g]
        self._windows += 1
        if isinstance(self._mode, OdometryGraphPlacement):
            self._mode.poses_are_priors = poses_are_priors
            placed = self._mode.place(self._windows, groups, n_context, frames, group_of, prediction, accepted)
        else:
            placed = self._mode.place(groups, n_context, frames, prediction, accepted)
        placed.rejected_views = [i for i, a in enumerate(accepted) if not a]
        self._bookkeep(groups, n_context, frames, group_of, placed)
        return placed

    def _units(self, prediction: WindowPrediction) -> float:
        """Metres -> window units: 1 for a metric window, else from the last placed window's scale."""
        return 1.0 if prediction.metric else 1.0 / self._mode.scale

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
                if isinstance(self._mode, OverlapChainPlacement):  # the chain needs the points; the graph does not
                    self._mode.last_pose = view.T_world_camera
                    self._anchors[frames[i].key] = make_anchor(frames[i].key, view, self.config.anchor_samples)
        while len(self._anchors) > MAX_ANCHORS:
            self._anchors.popitem(last=False)
