"""A wheel odometry that drifts from the truth: scale error, heading drift and noise per metre driven."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mapany_ros.core.geometry import interpolate, make_pose


@dataclass(frozen=True)
class OdometryErrors:
    """How a wheel odometry's estimate departs from the true motion.

    ``scale_error`` lengthens every translation (0.05 = 5 % too long); ``yaw_drift_deg_per_m``
    turns the heading per metre driven (wheel slip, unequal wheel radii); ``noise_m`` and
    ``noise_deg`` are random-walk noise per square root of metre driven.
    """

    scale_error: float = 0.0
    yaw_drift_deg_per_m: float = 0.0
    noise_m: float = 0.0
    noise_deg: float = 0.0
    seed: int = 0

    @property
    def exact(self) -> bool:
        return not (self.scale_error or self.yaw_drift_deg_per_m or self.noise_m or self.noise_deg)


class DriftingOdometry:
    """T_odom_base(t) integrated from the true motion with :class:`OdometryErrors`.

    Starts equal to the truth at ``t0_s`` (odom = world there) and drifts from then on, the way
    dead reckoning does: increments of the true path on a fine time grid, each with its error,
    composed. Deterministic for a seed, so any time can be queried in any order.
    """

    def __init__(self, truth: Callable[[float], np.ndarray], errors: OdometryErrors, t0_s: float = 0.0,
                 step_s: float = 0.01) -> None:
        self.truth, self.errors, self.t0_s, self.step_s = truth, errors, t0_s, step_s
        self._rng = np.random.default_rng(errors.seed)
        self._poses = [np.asarray(truth(t0_s), dtype=np.float64)]
        self._true_prev = self._poses[0]

    def _extend(self, n: int) -> None:
        e = self.errors
        while len(self._poses) < n:
            t = self.t0_s + len(self._poses) * self.step_s
            true_now = np.asarray(self.truth(t), dtype=np.float64)
            delta = np.linalg.inv(self._true_prev) @ true_now
            self._true_prev = true_now
            dist = float(np.linalg.norm(delta[:3, 3]))
            t_err = delta[:3, 3] * (1.0 + e.scale_error) + self._rng.normal(scale=e.noise_m * np.sqrt(dist), size=3)
            yaw = math.radians(e.yaw_drift_deg_per_m * dist + self._rng.normal(scale=e.noise_deg * np.sqrt(dist)))
            c, s_ = math.cos(yaw), math.sin(yaw)
            R_err = delta[:3, :3] @ np.array([[c, -s_, 0.0], [s_, c, 0.0], [0.0, 0.0, 1.0]])
            self._poses.append(self._poses[-1] @ make_pose(R_err, t_err))

    def pose(self, t_s: float) -> np.ndarray:
        """T_odom_base at ``t_s`` (>= t0_s), interpolated between grid samples."""
        if t_s < self.t0_s:
            raise ValueError(f"odometry starts at {self.t0_s} s, asked for {t_s} s")
        x = (t_s - self.t0_s) / self.step_s
        i = int(math.floor(x))
        self._extend(i + 2)
        a = x - i
        T0, T1 = self._poses[i], self._poses[i + 1]
        return T0.copy() if a < 1e-12 else interpolate(T0, T1, a)
