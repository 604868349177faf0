"""The model's scale against metric references: the odometry, and a camera rig's calibrated baseline.

A "metric" model is only roughly metric, and its errors do not average out: a model that sees a
room 5 % too large sees every window 5 % too large, each with a few per cent of its own on top.
In log scale, window j is ``log s_j = u + e_j`` in odometry metres per window unit: ``u`` a bias
that changes slowly (a random walk), ``e_j`` the window's own error (``window_sigma``). Its camera
centres fitted to the odometry's steps measure ``u + e_j``; that gives the window's scale as the
posterior of ``s_j``, and teaches ``u`` so that a window with a weak measurement (no baseline)
still gets the bias corrected. A non-metric window has no bias to learn: its scale is its
measurement, or the previous window's.

The odometry is itself only as metric as its calibration (a wheel radius 5 % off makes every
step 5 % long), and nothing in the odometry and the model together can tell its error from the
model's: both show one steady ratio. A rig of cameras with a calibrated baseline between them is
a third, truly metric reference: the distance the window puts between two cameras of one group,
against their extrinsics, measures ``u + e_j - c``, with ``c`` the odometry's own log scale (its
metres per true metre). ``c`` is learned from the two together, and the map is put in true
metres by its estimate: windows' depth and the odometry steps the pose graph uses are both divided by
``exp(c)`` (from the first rig window on, as the estimate converges). Without a rig ``c`` keeps
its prior (0) and the map keeps the odometry's scale.

``c`` is the robot's, not the map's: a new map (an input restart, ``~/reset``) keeps it, and a map
folder stores it (:class:`OdometryCalibration`), so a node started in a saved map applies it from its
first window instead of measuring it again over the first windows' odometry steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Prior spread of the bias of a metric model (log scale): 20 %.
BIAS_SIGMA = 0.2
#: How much the bias may wander from one window to the next (log scale).
BIAS_WALK = 0.003
#: Prior spread of the odometry's scale error (log scale): 10 %, a badly calibrated wheel radius.
ODOMETRY_SCALE_SIGMA = 0.1
#: How much the odometry's scale may wander from one window to the next (load, tyre wear).
ODOMETRY_SCALE_WALK = 0.0005
#: Windows with a rig measurement before the odometry's scale is reported (it is applied from the
#: first one on: the posterior's mean, shrunk towards 1 while it is uncertain; an estimate held
#: back until it is sure would leave the first windows' odometry steps the whole error).
MIN_RIG_WINDOWS = 5
#: A non-metric window's own scale is unknown: its prior is this wide (log scale).
DIFFUSE = 100.0
#: A stored calibration is held no tighter than this (log scale) when it is taken up again: tyres,
#: load and pressure change between runs.
CALIBRATION_FLOOR_SIGMA = 0.005


@dataclass(frozen=True)
class OdometryCalibration:
    """The odometry's log scale ``c`` as a rig measured it, its variance, and over how many windows."""

    log_scale: float
    variance: float
    rig_windows: int


@dataclass
class ScaleMeasurement:
    """log of a window's scale (window units -> metres) and its variance."""

    log_scale: float
    variance: float


class ScaleFilter:
    """Per-window scale estimates (see module docstring)."""

    def __init__(self, window_sigma: float) -> None:
        self.window_var = window_sigma**2
        #: [u, c] and their covariance.
        self.x = np.zeros(2)
        self.P = np.diag([BIAS_SIGMA**2, ODOMETRY_SCALE_SIGMA**2])
        self.last = 1.0
        #: Metric windows whose odometry measurement taught the bias.
        self.learned = 0
        #: Windows with a rig measurement.
        self.rig_learned = 0

    @property
    def bias(self) -> float:
        """``u``: the model's log scale in odometry metres per window unit."""
        return float(self.x[0])

    @property
    def bias_var(self) -> float:
        return float(self.P[0, 0])

    @property
    def odometry_log_scale(self) -> float:
        """``c`` as the map applies it (0 until a rig measured it)."""
        return float(self.x[1])

    def odometry_scale(self) -> tuple[float, float] | None:
        """The odometry's distances over the true ones and the relative one-sigma; None until a rig measured it."""
        if self.rig_learned < MIN_RIG_WINDOWS:
            return None
        return float(np.exp(self.x[1])), float(np.sqrt(self.P[1, 1]))

    def calibration(self) -> OdometryCalibration | None:
        """What the rig measured of the odometry's scale, to carry into a new map; None before any rig window."""
        if self.rig_learned == 0:
            return None
        return OdometryCalibration(float(self.x[1]), float(self.P[1, 1]), self.rig_learned)

    def take_calibration(self, calibration: OdometryCalibration) -> None:
        """Start from an earlier measurement of ``c`` (this filter's bias estimate is kept)."""
        self.x[1] = calibration.log_scale
        self.P[0, 1] = self.P[1, 0] = 0.0
        self.P[1, 1] = max(calibration.variance, CALIBRATION_FLOOR_SIGMA**2)
        self.rig_learned = calibration.rig_windows

    def _posterior(self, odometry: ScaleMeasurement | None, rig: ScaleMeasurement | None, metric: bool
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Mean and covariance of [u, c, e_j] given the window's measurements."""
        m = 1.0 if metric else 0.0
        z = np.array([self.x[0], self.x[1], 0.0])
        S = np.zeros((3, 3))
        S[:2, :2] = self.P
        S[2, 2] = self.window_var if metric else DIFFUSE
        for meas, H in ((odometry, np.array([m, 0.0, 1.0])), (rig, np.array([m, -1.0, 1.0]))):
            if meas is None:
                continue
            SH = S @ H
            gain = SH / (H @ SH + meas.variance)
            z = z + gain * (meas.log_scale - H @ z)
            S = S - np.outer(gain, SH)
        return z, S

    def estimate(self, odometry: ScaleMeasurement | None, metric: bool, rig: ScaleMeasurement | None = None) -> float:
        """The window's scale (posterior mean, in the map's metres) without learning from it."""
        c = self.odometry_log_scale
        if odometry is None and rig is None:
            return float(np.exp(self.bias - c)) if metric else self.last
        z, _ = self._posterior(odometry, rig, metric)
        # In the map's metres with the c the pose graph's odometry steps are divided by now.
        return float(np.exp(metric * z[0] + z[2] - c))

    def update(self, odometry: ScaleMeasurement | None, metric: bool, scale: float,
               rig: ScaleMeasurement | None = None) -> None:
        """Learn from an accepted window whose scale was ``scale``."""
        self.last = scale
        if metric:
            self.P[0, 0] += BIAS_WALK**2
        self.P[1, 1] += ODOMETRY_SCALE_WALK**2
        if odometry is None and rig is None:
            return
        z, S = self._posterior(odometry, rig, metric)
        self.x, self.P = z[:2].copy(), S[:2, :2].copy()
        if metric and odometry is not None:
            self.learned += 1
        if rig is not None:
            self.rig_learned += 1
