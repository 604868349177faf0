"""Odometry buffer: base poses by time, interpolated at image stamps.

Images and odometry arrive on different topics at different rates. A frame can only be given
a pose prior once odometry on both sides of its stamp has arrived, so lookups answer "wait"
as well as "here it is" or "never".
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass

import numpy as np

from mapany_ros.core.geometry import interpolate, is_rigid


class Lookup(enum.Enum):
    OK = "ok"
    WAIT = "wait"  # stamp is newer than the newest odometry: may still be covered
    GAP = "gap"  # the samples around the stamp are further apart than allowed
    TOO_OLD = "too_old"  # stamp precedes the buffer


@dataclass
class OdometryBuffer:
    """A bounded, time-sorted buffer of T_odom_base samples.

    ``max_gap_s`` is the largest interval between two samples that may be interpolated (and
    the largest distance to the nearest sample when the stamp equals it).
    """

    max_gap_s: float = 0.2
    max_samples: int = 2000

    def __post_init__(self) -> None:
        self._stamps: list[int] = []
        self._poses: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._stamps)

    def clear(self) -> None:
        self._stamps.clear()
        self._poses.clear()

    @property
    def newest_ns(self) -> int | None:
        return self._stamps[-1] if self._stamps else None

    def add(self, stamp_ns: int, T_odom_base: np.ndarray) -> None:
        """Insert a sample; raises ValueError for a non-rigid or non-finite pose."""
        if not is_rigid(T_odom_base):
            raise ValueError("odometry pose is not a finite rigid transform")
        i = bisect.bisect_left(self._stamps, stamp_ns)
        if i < len(self._stamps) and self._stamps[i] == stamp_ns:
            self._poses[i] = T_odom_base
            return
        self._stamps.insert(i, stamp_ns)
        self._poses.insert(i, T_odom_base)
        if len(self._stamps) > self.max_samples:
            del self._stamps[0]
            del self._poses[0]

    def lookup(self, stamp_ns: int) -> tuple[Lookup, np.ndarray | None]:
        """T_odom_base at ``stamp_ns`` by SE(3) interpolation, never extrapolated."""
        if not self._stamps or stamp_ns > self._stamps[-1]:
            return Lookup.WAIT, None
        if stamp_ns < self._stamps[0]:
            return Lookup.TOO_OLD, None
        i = bisect.bisect_left(self._stamps, stamp_ns)
        if self._stamps[i] == stamp_ns:
            return Lookup.OK, self._poses[i].copy()
        t0, t1 = self._stamps[i - 1], self._stamps[i]
        if (t1 - t0) * 1e-9 > self.max_gap_s:
            return Lookup.GAP, None
        alpha = (stamp_ns - t0) / (t1 - t0)
        return Lookup.OK, interpolate(self._poses[i - 1], self._poses[i], alpha)
