"""Keyframe selection: keep a frame group when the rig moved or enough time passed.

With odometry, motion is the pose's translation and rotation. Without it, motion is what the
images show (:mod:`mapany_ros.core.visual_motion`): the view's rotation and its parallax since the
last keyframe, measured on every camera of the group.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mapany_ros.core.frames import Frame
from mapany_ros.core.geometry import invert, rotation_angle
from mapany_ros.core.visual_motion import ViewMotion, ViewTracker

#: Fewer of the keyframe's patches still found than this fraction: the view has moved on (too far to measure).
MIN_TRACKED = 0.5
#: Keyframes whose visual distance is remembered for thinning (far more than can wait for the backend).
_ODOMETER_SIZE = 4096


@dataclass
class KeyframeSelector:
    """Decides which frame groups enter windows.

    A group is a keyframe when it is the first, when it moved enough since the last keyframe, or
    when ``max_interval_s`` passed. Groups closer than ``min_interval_s`` to the last keyframe are
    never keyframes (rate cap). Moved enough: with a pose (odometry), by ``min_translation_m`` or
    ``min_rotation_deg``; without one, when any camera of the group sees its view turned by
    ``min_rotation_deg`` or a parallax of ``min_parallax_deg`` since its keyframe image, or lost
    more than half of that image's patches. Without a pose or images, only time decides.
    """

    min_translation_m: float = 0.15
    min_rotation_deg: float = 10.0
    max_interval_s: float = 1.0
    min_interval_s: float = 0.0
    min_parallax_deg: float = 1.0

    def __post_init__(self) -> None:
        self._trackers: dict[str, ViewTracker] = {}
        self.reset()

    def reset(self) -> None:
        self._last_stamp: int | None = None
        self._last_pose: np.ndarray | None = None
        for tracker in self._trackers.values():
            tracker.reset()
        #: Keyframe stamp -> visual distance travelled since the first keyframe, in threshold units.
        self._odometer: OrderedDict[int, float] = OrderedDict()
        #: The latest group's view change per camera (None: no measure), for logs and tests.
        self.last_motion: dict[str, ViewMotion | None] = {}

    def separation(self, stamp_a: int, pose_a: np.ndarray | None, stamp_b: int, pose_b: np.ndarray | None) -> float:
        """How far apart two keyframe groups are in units of the keyframe thresholds (1 = just a new keyframe).

        The largest of elapsed time over ``max_interval_s`` and, with poses, translation and
        rotation over their thresholds; without poses, the visual motion summed over the keyframes
        between them. Used to thin keyframes evenly when the backend lags.
        """
        sep = abs(stamp_b - stamp_a) * 1e-9 / self.max_interval_s
        if pose_a is not None and pose_b is not None:
            rel = invert(pose_a) @ pose_b
            if self.min_translation_m > 0:
                sep = max(sep, float(np.linalg.norm(rel[:3, 3])) / self.min_translation_m)
            if self.min_rotation_deg > 0:
                sep = max(sep, float(np.degrees(rotation_angle(rel))) / self.min_rotation_deg)
        elif stamp_a in self._odometer and stamp_b in self._odometer:
            sep = max(sep, abs(self._odometer[stamp_b] - self._odometer[stamp_a]))
        return sep

    def consider(self, stamp_ns: int, pose: np.ndarray | None, frames: Sequence[Frame] = ()) -> bool:
        """True (and remember it) when the group at ``stamp_ns`` is a keyframe.

        ``pose``: the group's pose (odometry), or None; ``frames``: the group's images, which
        decide without a pose.
        """
        visual = pose is None and len(frames) > 0
        step = 0.0
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
            elif visual:
                moved, step = self._visual_step(frames)
            if not moved and dt < self.max_interval_s:
                return False
        elif visual:
            self._visual_step(frames)  # nothing to compare with: this only takes the images in
        if visual:
            for frame in frames:
                self._trackers[frame.camera].promote()
            travelled = next(reversed(self._odometer.values()), 0.0) + step
            self._odometer[stamp_ns] = travelled
            while len(self._odometer) > _ODOMETER_SIZE:
                self._odometer.popitem(last=False)
        self._last_stamp = stamp_ns
        self._last_pose = None if pose is None else pose.copy()
        return True

    def _visual_step(self, frames: Sequence[Frame]) -> tuple[bool, float]:
        """Whether any camera's view moved enough since its keyframe image, and by how much (threshold units)."""
        moved, step = False, 0.0
        self.last_motion = {}
        for frame in frames:
            tracker = self._trackers.setdefault(frame.camera, ViewTracker())
            motion = tracker.measure(frame.image, frame.camera_model, frame.stamp_ns)
            self.last_motion[frame.camera] = motion
            if motion is None:
                continue  # no keyframe image yet, or too bland to track: time decides
            units = 0.0
            for value, threshold in ((motion.rotation_deg, self.min_rotation_deg),
                                     (motion.parallax_deg, self.min_parallax_deg)):
                if math.isnan(value):
                    continue
                if threshold > 0:
                    units = max(units, value / threshold)
                moved |= value >= threshold
            if motion.tracked < MIN_TRACKED:
                moved, units = True, max(units, 1.0)
            step = max(step, units)
        return moved, step
