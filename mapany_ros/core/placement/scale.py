"""The model's scale against a metric reference: a steady bias plus each window's own error.

A "metric" model is only roughly metric, and its errors do not average out: a model that sees a
room 5 % too large sees every window 5 % too large, each with a few per cent of its own on top.
In log scale, window j is ``log s_j = b + e_j``: ``b`` a bias that changes slowly (a random walk),
``e_j`` the window's own error (``window_sigma``). A measurement of ``log s_j`` (the window's camera
centres fitted to the odometry's, or its depth against the map's on shared frames) gives the
window's scale as the posterior of ``s_j``, and teaches ``b`` so that a window with a weak
measurement (no baseline) still gets the bias corrected. A non-metric window has no bias to learn:
its scale is its measurement, or the previous window's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Prior spread of the bias of a metric model (log scale): 20 %.
BIAS_SIGMA = 0.2
#: How much the bias may wander from one window to the next (log scale).
BIAS_WALK = 0.003


@dataclass
class ScaleMeasurement:
    """log of a window's scale (window units -> metres) and its variance."""

    log_scale: float
    variance: float


class ScaleFilter:
    """Per-window scale estimates (see module docstring)."""

    def __init__(self, window_sigma: float) -> None:
        self.window_var = window_sigma**2
        self.bias = 0.0
        self.bias_var = BIAS_SIGMA**2
        self.last = 1.0
        #: Metric windows whose measurement taught the bias.
        self.learned = 0

    def estimate(self, measurement: ScaleMeasurement | None, metric: bool) -> float:
        """The window's scale (posterior mean) without learning from it."""
        if not metric:
            return float(np.exp(measurement.log_scale)) if measurement is not None else self.last
        prior_var = self.bias_var + self.window_var
        if measurement is None:
            return float(np.exp(self.bias))
        gain = prior_var / (prior_var + measurement.variance)
        return float(np.exp(self.bias + gain * (measurement.log_scale - self.bias)))

    def update(self, measurement: ScaleMeasurement | None, metric: bool, scale: float) -> None:
        """Learn from an accepted window whose scale was ``scale``."""
        self.last = scale
        if not metric:
            return
        self.bias_var += BIAS_WALK**2
        if measurement is None:
            return
        var = measurement.variance + self.window_var
        gain = self.bias_var / (self.bias_var + var)
        self.bias += gain * (measurement.log_scale - self.bias)
        self.bias_var *= 1.0 - gain
        self.learned += 1
