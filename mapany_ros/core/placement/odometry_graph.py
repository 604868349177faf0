"""Placement with odometry: each window joins a pose graph with the odometry (see :mod:`.pose_graph`).

Every prior stays in the odometry frame, and ``map -> odom`` is the drift the graph estimates. A
metric window is fitted rigidly; a non-metric one is first scaled to the odometry (Sim(3)). A
window further from the odometry than ``max_residual_m`` is rejected; its keyframes keep their
odometry estimates.
"""

from __future__ import annotations

import collections

import numpy as np

from mapany_ros.core.alignment import rigidify, robust_similarity
from mapany_ros.core.backends.base import WindowPrediction
from mapany_ros.core.frames import Frame
from mapany_ros.core.geometry import invert, make_pose
from mapany_ros.core.placement.config import PlacementConfig
from mapany_ros.core.placement.overlap import Anchor, correspondences, make_anchor
from mapany_ros.core.placement.placed import PlacedWindow, PlacementStatus, moved, rejected
from mapany_ros.core.placement.pose_graph import Observation, PoseGraph

#: Two windows' depths of the frames they share may differ by this factor at most (a unit slip, a
#: collapsed prediction); beyond, the newer window is rejected.
MAX_LINK_SCALE = 1.25


class OdometryGraphPlacement:
    """Windows into the pose graph with the odometry; keeps the keyframe ids and the link anchors."""

    def __init__(self, config: PlacementConfig, anchors: collections.OrderedDict[tuple[str, int], Anchor]) -> None:
        self.config = config
        self._anchors = anchors
        self._graph = PoseGraph(config.graph())
        self._kids: dict[int, int] = {}  # group stamp -> keyframe id in the pose graph
        self._next_kid = 0
        self._newest_stamp = -1
        #: Scale of the newest placed window (1 for metric windows).
        self.scale = 1.0
        self.poses_are_priors = False

    def place(self, j: int, groups: list[list[Frame]], n_context: int, frames: list[Frame], group_of: list[int],
              prediction: WindowPrediction, accepted: list[bool]) -> PlacedWindow:
        """Place window ``j`` (``groups[:n_context]`` are placed context); ``accepted`` is narrowed to the views
        the graph keeps."""
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
            return rejected(prediction, "no view of the window is usable", graph.T_map_odom)
        scale = 1.0 if prediction.metric else self._odometry_scale(frames, T_base_cam, T_win_cam, idx)
        obs = []
        for i in idx:
            T = T_win_cam[i].copy()
            T[:3, 3] *= scale
            obs.append(Observation(self._kids[groups[group_of[i]][0].stamp_ns], T @ invert(T_base_cam[i])))
        links, link_scales = ([], []) if self.poses_are_priors else self._window_links(frames, prediction, idx,
                                                                                         scale)
        off = [s_ for s_ in link_scales if abs(np.log(s_)) > np.log(MAX_LINK_SCALE)]
        if off:
            return rejected(prediction, f"depth disagrees with the previous window's on the frames both "
                                  f"predicted by a factor {off[0]:.3g}", graph.T_map_odom)
        solve = graph.add_window(j, obs, links)
        limit = self.config.max_residual_m
        if limit > 0 and solve.residual_m > limit:
            graph.remove_window(j)
            return rejected(prediction, f"window disagrees with odometry by {solve.residual_m:.3f} m RMS "
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
        self.scale = scale
        for i in range(len(frames)):
            if placed[i] and group_of[i] >= n_context:  # later windows link to this one through these
                self._anchors[frames[i].key] = make_anchor(frames[i].key, prediction.views[i],
                                                           self.config.anchor_samples, window=j, scale=scale)
        return PlacedWindow(moved(prediction, placed, poses, scale), placed, PlacementStatus.PLACED,
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
            return self.scale  # no baseline: the previous window's scale is the best guess
        fit = robust_similarity(src, dst, np.full(len(idx), self.config.view_sigma_m),
                                kernel=self.config.robust_kernel, threshold=self.config.robust_threshold)
        return fit.transform.scale
