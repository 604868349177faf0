"""Odometry buffer: base poses by time, interpolated at image stamps; odometry noise from covariances.

Images and odometry arrive on different topics at different rates. A frame can only be given
a pose prior once odometry on both sides of its stamp has arrived, so lookups answer "wait"
as well as "here it is" or "never". The same buffer keeps any time-indexed rigid transform (a
moving camera's extrinsic).
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
        #: Per sample: its 6x6 pose covariance (ROS order x, y, z, rotX, rotY, rotZ), or None.
        self._covariances: list[np.ndarray | None] = []

    def __len__(self) -> int:
        return len(self._stamps)

    def clear(self) -> None:
        self._stamps.clear()
        self._poses.clear()
        self._covariances.clear()

    @property
    def newest_ns(self) -> int | None:
        return self._stamps[-1] if self._stamps else None

    def add(self, stamp_ns: int, T_odom_base: np.ndarray, covariance: np.ndarray | None = None) -> None:
        """Insert a sample (a repeated stamp replaces it); raises ValueError for a non-rigid or non-finite
        pose or a covariance that is not a finite 6x6 matrix."""
        if not is_rigid(T_odom_base):
            raise ValueError("odometry pose is not a finite rigid transform")
        if covariance is not None:
            covariance = np.asarray(covariance, dtype=np.float64)
            if covariance.shape != (6, 6) or not np.all(np.isfinite(covariance)):
                raise ValueError("odometry pose covariance is not a finite 6x6 matrix")
        i = bisect.bisect_left(self._stamps, stamp_ns)
        if i < len(self._stamps) and self._stamps[i] == stamp_ns:
            self._poses[i] = T_odom_base
            self._covariances[i] = covariance
            return
        self._stamps.insert(i, stamp_ns)
        self._poses.insert(i, T_odom_base)
        self._covariances.insert(i, covariance)
        if len(self._stamps) > self.max_samples:
            del self._stamps[0]
            del self._poses[0]
            del self._covariances[0]

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

    def covariance(self, stamp_ns: int) -> np.ndarray | None:
        """The pose covariance at ``stamp_ns``: linear between the two samples around it (a convex
        combination stays positive semi-definite), None where either lacks one or the stamp is not covered."""
        if not self._stamps or not self._stamps[0] <= stamp_ns <= self._stamps[-1]:
            return None
        i = bisect.bisect_left(self._stamps, stamp_ns)
        if self._stamps[i] == stamp_ns:
            c = self._covariances[i]
            return None if c is None else c.copy()
        c0, c1 = self._covariances[i - 1], self._covariances[i]
        if c0 is None or c1 is None:
            return None
        alpha = (stamp_ns - self._stamps[i - 1]) / (self._stamps[i] - self._stamps[i - 1])
        return (1.0 - alpha) * c0 + alpha * c1


#: Least between-keyframe odometry sigmas (rotation rad, translation m), as the parametric noise's floors:
#: a zero sigma would make GTSAM treat the odometry as a hard constraint.
MIN_SIGMA_ROTATION_RAD = float(np.radians(0.1))
MIN_SIGMA_TRANSLATION_M = 0.002


def covariance_is_set(covariance: np.ndarray | None) -> bool:
    """True for a usable nav_msgs/Odometry pose covariance: finite 6x6, diagonal >= 0 and not all zero.

    All zeros is how most drivers say "not filled in"; a negative diagonal (-1) is REP 145's "unknown".
    """
    if covariance is None:
        return False
    c = np.asarray(covariance, dtype=np.float64)
    if c.shape != (6, 6) or not np.all(np.isfinite(c)):
        return False
    d = np.diag(c)
    return bool(np.all(d >= 0.0) and np.any(d > 0.0))


def odometry_between_sigmas(
    covariance_a: np.ndarray | None,
    covariance_b: np.ndarray | None,
    T_odom_b: np.ndarray,
    fallback: np.ndarray,
) -> np.ndarray:
    """Noise sigmas of the odometry between keyframes a and b, for a GTSAM ``BetweenFactorPose3(a, b)``.

    ``covariance_a`` / ``covariance_b`` are the keyframes' ``Frame.odometry_covariance`` (at their image
    stamps), ``T_odom_b`` is b's ``Frame.T_world_base`` (where b's body axes point), ``fallback`` the
    parametric sigmas the graph would use without covariance.

    Returns 6 sigmas, rotation (rad) first, then translation (m), in b's body frame: GTSAM's Pose3
    tangent order, whose Between error is the right perturbation of b relative to a.

    Convention assumed: ``covariance_*`` are nav_msgs/Odometry ``pose.covariance`` reshaped to 6x6,
    row-major in the order (x, y, z, rotX, rotY, rotZ), the uncertainty of the pose *in the parent frame*
    (``header.frame_id``, the odometry frame): position errors along the parent's axes, small rotations
    about the parent's fixed axes. Only each variance is used (the graph takes diagonal sigmas).

    Per axis, a variance that grew from a to b is dead reckoning accumulating (wheel odometry, an
    EKF without absolute fixes): the motion in between added the growth, b - a. A variance that stayed
    or shrank (drivers that publish a constant covariance, or a filter after an absolute fix) says
    each pose is uncertain by itself: the two errors add, a + b. The variances are then rotated from
    the parent frame into b's body frame and floored at :data:`MIN_SIGMA_ROTATION_RAD` /
    :data:`MIN_SIGMA_TRANSLATION_M`.

    Zero, unset or invalid covariance (None, all zeros, a negative or non-finite entry) on either
    keyframe: ``fallback`` is returned as given - the parametric noise from ``odometry.sigma_*``.
    """
    fallback = np.asarray(fallback, dtype=np.float64).reshape(6)
    if not (covariance_is_set(covariance_a) and covariance_is_set(covariance_b)):
        return fallback.copy()
    var_a = np.diag(np.asarray(covariance_a, dtype=np.float64))
    var_b = np.diag(np.asarray(covariance_b, dtype=np.float64))
    var = np.where(var_b > var_a, var_b - var_a, var_a + var_b)
    R_body_parent = np.asarray(T_odom_b, dtype=np.float64)[:3, :3].T
    # Diagonal of R^T diag(v) R: each body axis collects the parent variances it projects onto.
    rot = (R_body_parent**2) @ var[3:]
    trans = (R_body_parent**2) @ var[:3]
    return np.concatenate([np.maximum(np.sqrt(rot), MIN_SIGMA_ROTATION_RAD),
                           np.maximum(np.sqrt(trans), MIN_SIGMA_TRANSLATION_M)])
