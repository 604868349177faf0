"""Keyframe selection: keep a frame group when the rig moved or enough time passed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mapany_ros.core.geometry import invert, rotation_angle


@dataclass
class KeyframeSelector:
    """Decides which frame groups enter windows.

    A group is a keyframe when it is the first, when the pose moved by ``min_translation_m`` or
    turned by ``min_rotation_deg`` since the last keyframe, or when ``max_interval_s`` passed.
    Groups closer than ``min_interval_s`` to the last keyframe are never keyframes (rate cap).
    Without a pose only the interval rules apply.
    """

    min_translation_m: float = 0.15
    min_rotation_deg: float = 10.0
    max_interval_s: float = 1.0
    min_interval_s: float = 0.0

    def __post_init__(self) -> None:
        self._last_stamp: int | None = None
        self._last_pose: np.ndarray | None = None

    def reset(self) -> None:
        self._last_stamp = None
        self._last_pose = None

    def separation(self, stamp_a: int, pose_a: np.ndarray | None, stamp_b: int, pose_b: np.ndarray | None) -> float:
        """How far apart two groups are in units of the keyframe thresholds (1 = just a new keyframe).

        The largest of elapsed time over ``max_interval_s`` and, with poses, translation and
        rotation over their thresholds; used to thin keyframes evenly when the backend lags.
        """
        sep = abs(stamp_b - stamp_a) * 1e-9 / self.max_interval_s
        if pose_a is not None and pose_b is not None:
            rel = invert(pose_a) @ pose_b
            if self.min_translation_m > 0:
                sep = max(sep, float(np.linalg.norm(rel[:3, 3])) / self.min_translation_m)
            if self.min_rotation_deg > 0:
                sep = max(sep, float(np.degrees(rotation_angle(rel))) / self.min_rotation_deg)
        return sep

    def consider(self, stamp_ns: int, pose: np.ndarray | None) -> bool:
        """True (and remember it) when the group at ``stamp_ns`` with ``pose`` is a keyframe."""
        if self._last_stamp is not None:
            dt = (stamp_ns - self._last_stamp) * 1e-9
            if dt < self.min_interval_s:
                return False
            moved = False
            if pose is not None and self._last_pose is not None:
                rel = invert(self._last_pose) @ pose
                moved = (
                    np.linalg.norm(rel[:3, 3]) >= self.min_translation_m
                    or np.degrees(rotation_angle(rel)) >= self.min_rotation_deg
                )
            if not moved and dt < self.max_interval_s:
                return False
        self._last_stamp = stamp_ns
        self._last_pose = None if pose is None else pose.copy()
        return True
