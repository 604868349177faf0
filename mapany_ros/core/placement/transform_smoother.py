"""map -> odom as tf2 users need it: published often, stamped ahead, and never jumping.

The placement stage revises the drift estimate once per window, seconds apart. Publishing each
revision as it comes would make ``map -> base_link`` jump, and stamping it with the window's
image stamp would make lookups at "now" extrapolate. Like amcl and slam_toolbox, the node
publishes on a timer, stamped now plus a tolerance; this class makes the value glide to each new
estimate with a time constant (exponential in SE(3): slerp and lerp by 1 - exp(-dt / tau)).
"""

from __future__ import annotations

import math

import numpy as np

from mapany_ros.core.geometry import interpolate


class TransformSmoother:
    """A 4x4 rigid transform that follows its latest target smoothly over time (seconds)."""

    def __init__(self, time_constant_s: float = 0.5) -> None:
        if time_constant_s < 0:
            raise ValueError(f"time_constant_s must be >= 0, got {time_constant_s}")
        self.time_constant_s = time_constant_s
        self.reset()

    def reset(self) -> None:
        self._value: np.ndarray | None = None
        self._target: np.ndarray | None = None
        self._t: float | None = None

    def set_target(self, T: np.ndarray) -> None:
        """A new estimate to converge to; the first one is taken at once."""
        self._target = np.asarray(T, dtype=np.float64).copy()
        if self._value is None:
            self._value = self._target.copy()

    def value(self, now_s: float) -> np.ndarray | None:
        """The transform at ``now_s`` (None before the first target)."""
        if self._value is None or self._target is None:
            return None
        dt = 0.0 if self._t is None else max(0.0, now_s - self._t)
        self._t = now_s
        alpha = 1.0 if self.time_constant_s == 0 else 1.0 - math.exp(-dt / self.time_constant_s)
        if alpha > 0:
            self._value = interpolate(self._value, self._target, alpha)
        return self._value.copy()
