"""A wheel odometry that drifts from the truth: scale error, heading drift and noise per metre driven, and slips."""

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
    ``noise_deg`` are random-walk noise per square root of metre driven. ``slips`` are sudden
    jumps ``(time_s, translation_m, yaw_deg)``: at ``time_s`` the odometry jumps once by
    ``translation_m`` along the base's x axis (forward; negative: backward) and turns by ``yaw_deg``,
    as a wheel spinning on a slippery floor or a robot carried away (kidnapped) makes it; the error
    stays from then on. :meth:`good` and :meth:`poor` are two wheel odometries to test against.
    """

    scale_error: float = 0.0
    yaw_drift_deg_per_m: float = 0.0
    noise_m: float = 0.0
    noise_deg: float = 0.0
    seed: int = 0
    slips: tuple[tuple[float, float, float], ...] = ()

    def __post_init__(self) -> None:
        slips = tuple(sorted(tuple(float(x) for x in slip) for slip in self.slips))
        if any(len(slip) != 3 for slip in slips):
            raise ValueError(f"each slip is (time_s, translation_m, yaw_deg), got {self.slips}")
        object.__setattr__(self, "slips", slips)

    @classmethod
    def good(cls, seed: int = 0, **overrides) -> OdometryErrors:
        """A well-calibrated wheel odometry on a good floor: 1 % scale error, 0.5 deg/m heading drift."""
        return cls(**{"scale_error": 0.01, "yaw_drift_deg_per_m": 0.5, "seed": seed, **overrides})

    @classmethod
    def poor(cls, seed: int = 0, **overrides) -> OdometryErrors:
        """A badly calibrated one: 5 % scale error, 5 deg/m heading drift, 5 mm and 0.2 deg of noise per sqrt(m)."""
        return cls(**{"scale_error": 0.05, "yaw_drift_deg_per_m": 5.0, "noise_m": 0.005, "noise_deg": 0.2,
                      "seed": seed, **overrides})

    @property
    def exact(self) -> bool:
        return not (self.scale_error or self.yaw_drift_deg_per_m or self.noise_m or self.noise_deg or self.slips)


def _yaw(rad: float) -> np.ndarray:
    c, s = math.cos(rad), math.sin(rad)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


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
            t_prev, t = (self.t0_s + k * self.step_s for k in (len(self._poses) - 1, len(self._poses)))
            true_now = np.asarray(self.truth(t), dtype=np.float64)
            delta = np.linalg.inv(self._true_prev) @ true_now
            self._true_prev = true_now
            dist = float(np.linalg.norm(delta[:3, 3]))
            t_err = delta[:3, 3] * (1.0 + e.scale_error) + self._rng.normal(scale=e.noise_m * np.sqrt(dist), size=3)
            yaw = math.radians(e.yaw_drift_deg_per_m * dist + self._rng.normal(scale=e.noise_deg * np.sqrt(dist)))
            step = make_pose(delta[:3, :3] @ _yaw(yaw), t_err)
            for slip_t, slip_m, slip_deg in e.slips:  # the slips in this step, once each
                if t_prev < slip_t <= t:
                    step = step @ make_pose(_yaw(math.radians(slip_deg)), [slip_m, 0.0, 0.0])
            self._poses.append(self._poses[-1] @ step)

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
