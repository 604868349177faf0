"""The keyframes placement knows: a graph id per keyframe group, and where each of its cameras sits.

A keyframe group holds one frame per camera, stamped a few milliseconds apart. The pose graph has
one node per group: the base pose at the group's reference stamp (its first frame's). Each camera
frame is tied to that node by its own transform, ``T_base_camera`` at the group's stamp - with
odometry the motion between the two stamps composed with the camera's extrinsic, so a camera
stamped 20 ms later on a robot turning at 1 rad/s is not placed 1.1 degrees off. Every correction
of a node therefore reaches all of its cameras.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mapany_ros.core.frames import Frame
from mapany_ros.core.geometry import invert

#: A keyframe whose pose moved by less than this since it was last reported is not reported again.
REPORT_TRANSLATION_M = 0.002
REPORT_ROTATION_RAD = np.radians(0.05)

FrameKey = tuple[str, int]


def camera_on_base(group: list[Frame], frame: Frame) -> np.ndarray | None:
    """T_base(group stamp) -> camera of ``frame``: through the odometry between the stamps when the
    frames carry it, else the frame's extrinsic; None when neither is known (a camera without
    extrinsic other than the group's first is then placed with its window, not through the graph)."""
    ref = group[0]
    if ref.T_world_base is not None and frame.T_world_camera is not None:
        return invert(ref.T_world_base) @ frame.T_world_camera
    if frame.T_base_camera is not None:
        return frame.T_base_camera
    return np.eye(4) if frame is ref else None


@dataclass
class Keyframe:
    kid: int
    stamp_ns: int
    #: Each camera frame of the group -> T_base_camera at the group's stamp.
    cameras: dict[FrameKey, np.ndarray] = field(default_factory=dict)
    #: The map pose last reported to the outputs (path, fused map), None before the first report.
    reported: np.ndarray | None = None


class KeyframeIndex:
    """Group stamp -> :class:`Keyframe`; ids grow with the stamps."""

    def __init__(self) -> None:
        self.by_stamp: dict[int, Keyframe] = {}
        self.by_kid: dict[int, Keyframe] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self.by_kid)

    def get(self, group: list[Frame]) -> Keyframe | None:
        return self.by_stamp.get(group[0].stamp_ns)

    @property
    def newest(self) -> Keyframe | None:
        return self.by_kid[self._next - 1] if self._next else None

    def add(self, group: list[Frame]) -> Keyframe:
        """Register a group (newer than every known one) with its cameras."""
        stamp = group[0].stamp_ns
        newest = self.newest
        if newest is not None and stamp <= newest.stamp_ns:
            raise ValueError(f"keyframe at {stamp} is not newer than the newest ({newest.stamp_ns})")
        kf = Keyframe(self._next, stamp)
        self._next += 1
        for f in group:
            T = camera_on_base(group, f)
            if T is not None:
                kf.cameras[f.key] = T
        self.by_stamp[stamp] = kf
        self.by_kid[kf.kid] = kf
        return kf

    def changed(self, poses: dict[int, np.ndarray]) -> tuple[dict[int, np.ndarray], dict[FrameKey, np.ndarray]]:
        """Of keyframe id -> T_map_base, those that moved since last reported (marked reported now):
        (group stamp -> T_map_base, frame key -> T_map_camera for each of their cameras).

        Compared all at once (after a loop closure every keyframe of the map is asked about)."""
        kids = list(poses)
        kfs = [self.by_kid[k] for k in kids]
        moved = np.ones(len(kids), dtype=bool)
        seen = [n for n, kf in enumerate(kfs) if kf.reported is not None]
        if seen:
            T = np.stack([poses[kids[n]] for n in seen])
            R0 = np.stack([kfs[n].reported for n in seen])
            # T_reported^-1 T: its translation R0^T (t - t0), its angle from the trace of R0^T R.
            shift = np.linalg.norm(np.einsum("nji,nj->ni", R0[:, :3, :3], T[:, :3, 3] - R0[:, :3, 3]), axis=1)
            cos = (np.einsum("nij,nij->n", R0[:, :3, :3], T[:, :3, :3]) - 1.0) / 2.0
            angle = np.arccos(np.clip(cos, -1.0, 1.0))
            moved[seen] = ~((shift < REPORT_TRANSLATION_M) & (angle < REPORT_ROTATION_RAD))
        bases: dict[int, np.ndarray] = {}
        views: dict[FrameKey, np.ndarray] = {}
        for n in np.flatnonzero(moved):
            kf, T = kfs[n], poses[kids[n]]
            kf.reported = T
            bases[kf.stamp_ns] = T
            for key, T_base_cam in kf.cameras.items():
                views[key] = T @ T_base_cam
        return bases, views
