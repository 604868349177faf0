"""Sliding-window pose graph (GTSAM) that fuses a model's windows with wheel odometry.

Variables: ``x_k`` = T_map_base of keyframe k, ``w_j`` = T_map_window of window j. Factors:

* odometry between consecutive keyframes, noise growing with the distance driven (drift);
* one factor per view of a window: ``x_k = w_j * Z``, Z being the view's base pose in the window
  frame (the model's estimate, scaled to metres), with a robust kernel, so one bad view cannot
  drag its window;
* one factor between consecutive windows, ``w_j = w_i * L``, L fitted to the dense 3D-3D
  correspondences of the frames both predicted (far tighter than the shared views' poses);
* a prior on the first keyframe (map = odom there) and, once old keyframes leave the window, a
  prior on the oldest kept one at its estimate with its marginal covariance.

Windows share keyframes (their overlap), so the model's relative poses chain through the graph
while odometry holds the metric scale and bridges windows that were rejected. ``map -> odom`` is
the newest keyframe's map pose composed with the inverse of its odometry pose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gtsam
import numpy as np

from mapany_ros.core.alignment import rigidify
from mapany_ros.core.geometry import invert, rotation_angle

KERNELS = ("cauchy", "huber", "tukey", "none")
#: A window-to-window link from thousands of dense correspondences is this much tighter than one view.
LINK_SIGMA_FACTOR = 0.5


def _x(k: int) -> int:
    return gtsam.symbol("x", k)


def _w(j: int) -> int:
    return gtsam.symbol("w", j)


def _pose(T: np.ndarray) -> gtsam.Pose3:
    return gtsam.Pose3(rigidify(T))


@dataclass(frozen=True)
class GraphConfig:
    """Noise models and robustness of the graph (one node parameter each)."""

    view_sigma_m: float = 0.05
    view_sigma_rad: float = np.radians(1.0)
    odom_sigma_ratio: float = 0.05
    odom_sigma_rad_per_m: float = np.radians(5.0)
    kernel: str = "cauchy"
    kernel_threshold: float = 2.0
    max_windows: int = 4
    #: A view whose whitened error (chi-square, 6 dof) exceeds this after the solve is dropped.
    reject_chi2: float = 22.46  # 99.9 % quantile


@dataclass
class Observation:
    """A view's base pose in its window frame (metres), for keyframe ``kid``."""

    kid: int
    T_window_base: np.ndarray


@dataclass
class WindowSolve:
    """The outcome of adding one window."""

    accepted: list[bool]
    residual_m: float
    T_map_window: np.ndarray


@dataclass
class _Window:
    observations: list[Observation]
    active: list[bool] = field(default_factory=list)
    #: (earlier window id, T_earlier_this) from the frames both windows predicted.
    links: list[tuple[int, np.ndarray]] = field(default_factory=list)


class PoseGraph:
    """Keyframes and windows in, optimised T_map_base per keyframe and map -> odom out."""

    def __init__(self, config: GraphConfig) -> None:
        if config.kernel not in KERNELS:
            raise ValueError(f"robust kernel must be one of {', '.join(KERNELS)}, got {config.kernel!r}")
        self.config = config
        self.values = gtsam.Values()
        self.odom: dict[int, np.ndarray] = {}
        self.order: list[int] = []  # active keyframes, oldest first
        self.priors: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # kid -> (pose, 6x6 covariance)
        self.windows: dict[int, _Window] = {}
        self._T_map_odom = np.eye(4)

    # ------------------------------------------------------------------ building
    def has(self, kid: int) -> bool:
        return kid in self.odom

    def has_window(self, j: int) -> bool:
        return j in self.windows

    def add_keyframe(self, kid: int, T_odom_base: np.ndarray) -> None:
        """A new keyframe, newer than every other, with its odometry pose."""
        T = rigidify(T_odom_base)
        if not self.order and not self.odom:
            self.priors[kid] = (T, np.diag([1e-6] * 3 + [1e-6] * 3))  # map = odom at the first keyframe
        self.odom[kid] = T
        self.order.append(kid)
        self.values.insert(_x(kid), _pose(self._T_map_odom @ T))

    def _odometry_noise(self, delta: np.ndarray) -> gtsam.noiseModel.Base:
        c = self.config
        dist = float(np.linalg.norm(delta[:3, 3]))
        sigma_t = max(c.odom_sigma_ratio * dist, 0.002)
        sigma_r = max(c.odom_sigma_rad_per_m * dist + 0.02 * rotation_angle(delta), np.radians(0.1))
        return gtsam.noiseModel.Diagonal.Sigmas(np.array([sigma_r] * 3 + [sigma_t] * 3))

    def _view_noise(self, factor: float = 1.0) -> gtsam.noiseModel.Base:
        c = self.config
        base = gtsam.noiseModel.Diagonal.Sigmas(factor * np.array([c.view_sigma_rad] * 3 + [c.view_sigma_m] * 3))
        kernel = {
            "cauchy": lambda: gtsam.noiseModel.mEstimator.Cauchy.Create(c.kernel_threshold),
            "huber": lambda: gtsam.noiseModel.mEstimator.Huber.Create(c.kernel_threshold),
            "tukey": lambda: gtsam.noiseModel.mEstimator.Tukey.Create(c.kernel_threshold),
        }.get(c.kernel)
        return base if kernel is None else gtsam.noiseModel.Robust.Create(kernel(), base)

    def _graph(self) -> gtsam.NonlinearFactorGraph:
        g = gtsam.NonlinearFactorGraph()
        for kid, (T, cov) in self.priors.items():
            g.add(gtsam.PriorFactorPose3(_x(kid), _pose(T), gtsam.noiseModel.Gaussian.Covariance(cov)))
        for a, b in zip(self.order, self.order[1:], strict=False):
            delta = invert(self.odom[a]) @ self.odom[b]
            g.add(gtsam.BetweenFactorPose3(_x(a), _x(b), _pose(delta), self._odometry_noise(delta)))
        noise = self._view_noise()
        link_noise = self._view_noise(LINK_SIGMA_FACTOR)
        for j, win in self.windows.items():
            for obs, active in zip(win.observations, win.active, strict=True):
                if active:
                    g.add(gtsam.BetweenFactorPose3(_w(j), _x(obs.kid), _pose(obs.T_window_base), noise))
            for i, L in win.links:
                if i in self.windows:
                    g.add(gtsam.BetweenFactorPose3(_w(i), _w(j), _pose(L), link_noise))
        return g

    def _optimize(self) -> None:
        params = gtsam.LevenbergMarquardtParams()
        params.setMaxIterations(50)
        self.values = gtsam.LevenbergMarquardtOptimizer(self._graph(), self.values, params).optimize()
        newest = self.order[-1]
        self._T_map_odom = rigidify(self.values.atPose3(_x(newest)).matrix() @ invert(self.odom[newest]))

    def _chi2(self, j: int, obs: Observation) -> tuple[float, float]:
        """Whitened squared error (no kernel) and translation error (m) of one view factor."""
        W = self.values.atPose3(_w(j)).matrix()
        X = self.values.atPose3(_x(obs.kid)).matrix()
        err = invert(W @ obs.T_window_base) @ X
        rot = gtsam.Rot3.Logmap(gtsam.Rot3(err[:3, :3]))
        c = self.config
        chi2 = float(np.sum(np.square(rot / c.view_sigma_rad)) + np.sum(np.square(err[:3, 3] / c.view_sigma_m)))
        return chi2, float(np.linalg.norm(err[:3, 3]))

    def add_window(self, j: int, observations: list[Observation], links: list[tuple[int, np.ndarray]] | None = None
                   ) -> WindowSolve:
        """Add window ``j`` (its keyframes must be in the graph), solve, drop views that do not fit.

        ``links`` are (earlier window, T_earlier_this) from dense overlap; links to windows that
        already left the graph are ignored.
        """
        if not observations:
            raise ValueError("a window needs at least one observation")
        first = min(observations, key=lambda o: self.order.index(o.kid))
        X0 = self.values.atPose3(_x(first.kid)).matrix()
        self.values.insert(_w(j), _pose(X0 @ invert(first.T_window_base)))
        win = _Window(observations, [True] * len(observations), [(i, L) for i, L in links or [] if i in self.windows])
        self.windows[j] = win
        self._optimize()
        chi2 = [self._chi2(j, o) for o in observations]
        bad = [c > self.config.reject_chi2 for c, _ in chi2]
        # A few views off: those views are wrong. Many: the window and odometry disagree, and the
        # residual decides about the whole window.
        if 0 < sum(bad) <= max(1, len(bad) // 4):
            win.active = [not b for b in bad]
            self._optimize()
            chi2 = [self._chi2(j, o) for o in observations]
        used = [e for (_, e), a in zip(chi2, win.active, strict=True) if a]
        residual = float(np.sqrt(np.mean(np.square(used)))) if used else float("inf")
        return WindowSolve(list(win.active), residual, self.values.atPose3(_w(j)).matrix())

    def remove_window(self, j: int) -> None:
        """Forget window ``j`` (rejected): its keyframes keep their odometry-only estimates."""
        if self.windows.pop(j, None) is not None:
            self.values.erase(_w(j))
            self._optimize()

    # ------------------------------------------------------------------ results
    def T_map_base(self, kid: int) -> np.ndarray:
        return self.values.atPose3(_x(kid)).matrix()

    @property
    def T_map_odom(self) -> np.ndarray:
        return self._T_map_odom.copy()

    # ------------------------------------------------------------------ sliding window
    def marginalize(self) -> list[int]:
        """Keep the newest ``max_windows`` windows; older keyframes leave with a prior on the boundary.

        Returns the keyframe ids that left the graph.
        """
        while len(self.windows) > self.config.max_windows:
            oldest = min(self.windows)
            del self.windows[oldest]
            self.values.erase(_w(oldest))
        referenced = {o.kid for w in self.windows.values() for o in w.observations}
        keep_from = next((i for i, k in enumerate(self.order) if k in referenced), len(self.order) - 1)
        if keep_from == 0:
            return []
        boundary = self.order[keep_from]
        cov = gtsam.Marginals(self._graph(), self.values).marginalCovariance(_x(boundary))
        gone = self.order[:keep_from]
        for k in gone:
            self.values.erase(_x(k))
            self.priors.pop(k, None)
            del self.odom[k]
        self.order = self.order[keep_from:]
        self.priors[boundary] = (self.T_map_base(boundary), cov)
        return gone
