"""The global pose graph (GTSAM iSAM2) over every keyframe the map ever placed.

Variables: ``x_k`` = T_map_base of keyframe k, ``w_j`` = T_map_window of window j (the window's
own frame, already scaled to metres). Factors:

* a prior on the first keyframe: the map's origin;
* odometry between consecutive keyframes (when the robot has odometry): noise growing with the
  distance driven (drift), and a robust kernel, so a wheel slip does not bend the path: the
  model's views, which do not slip, carry it;
* one factor per accepted view: ``x_k = w_j * Z``, Z being the view's base pose in its window
  frame, with a robust kernel so one bad view cannot drag its window. Windows share keyframes
  (their overlap), which is how the model's relative poses chain from window to window;
* loop closures between two keyframes, robust, added by the loop-closure stage.

A window is first checked in a small local problem - its keyframes, the odometry between them and
a prior on its oldest keyframe at the global estimate with its marginal covariance - so a window
that disagrees with the odometry, and its views that disagree with the rest, are known before
anything is committed. Only an accepted window's views enter the global graph. iSAM2 re-eliminates
only the part of the graph a new factor touches, so a window costs the same after ten keyframes
or ten thousand; a loop closure re-eliminates the loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import gtsam
import numpy as np

from mapany_ros.core.alignment import rigidify
from mapany_ros.core.geometry import invert, rotation_angle
from mapany_ros.core.odometry import odometry_between_sigmas

KERNELS = ("cauchy", "huber", "tukey", "none")
#: Relinearisation threshold of iSAM2 (rotation rad / translation m of a variable's update).
RELINEARIZE_THRESHOLD = 1e-3
#: iSAM2 looks for variables to relinearise every this many updates (GTSAM's default): at every
#: update it cost 1.7 ms of a window's 3 at 2000 keyframes, and changed no accuracy figure. A closed
#: loop relinearises at once (:meth:`PoseGraph.add_loop`).
RELINEARIZE_SKIP = 10
#: Iterations of the local check's Levenberg-Marquardt.
LOCAL_ITERATIONS = 30
#: An odometry step that the solution contradicts by more than this many of its own sigmas, and by
#: at least MIN_SLIP_M, is reported as a slip.
SLIP_SIGMAS = 6.0
MIN_SLIP_M = 0.05
#: How loosely a chain continued after a break is tied to the map (rad x3, m x3).
BRIDGE_SIGMAS = np.array([np.radians(10.0)] * 3 + [0.5] * 3)


def x_key(k: int) -> int:
    """Keyframe k's variable; keyframes of a loaded map have negative ids (``s`` variables)."""
    return gtsam.symbol("x", k) if k >= 0 else gtsam.symbol("s", -k)


def w_key(j: int) -> int:
    return gtsam.symbol("w", j)


def _pose(T: np.ndarray) -> gtsam.Pose3:
    return gtsam.Pose3(rigidify(T))


def _origin_noise() -> gtsam.noiseModel.Base:
    """The prior that fixes the map's origin at the first keyframe."""
    return gtsam.noiseModel.Isotropic.Sigma(6, 1e-4)


@dataclass(frozen=True)
class GraphConfig:
    """Noise models and robustness of the graph (one node parameter each)."""

    view_sigma_m: float = 0.05
    view_sigma_rad: float = np.radians(1.0)
    odom_sigma_ratio: float = 0.05
    odom_sigma_rad_per_m: float = np.radians(5.0)
    kernel: str = "cauchy"
    kernel_threshold: float = 2.0
    #: A view whose whitened error (chi-square, 6 dof) exceeds this after the local solve is dropped.
    reject_chi2: float = 22.46  # 99.9 % quantile


@dataclass
class Observation:
    """A view's base pose in its window frame (metres), for keyframe ``kid``.

    ``sigma_scale`` widens the view's noise (1 = the model's per-view sigmas).
    """

    kid: int
    T_window_base: np.ndarray
    sigma_scale: float = 1.0


@dataclass
class WindowCheck:
    """The outcome of the local check of one window (nothing committed yet)."""

    accepted: list[bool]
    #: RMS distance (m) between the accepted views and where the solution puts their keyframes.
    residual_m: float
    T_map_window: np.ndarray
    #: Keyframe id -> local estimate of its T_map_base.
    poses: dict[int, np.ndarray]
    #: (older keyframe, newer keyframe, metres) of odometry steps the window contradicts: slips.
    slips: list[tuple[int, int, float]]


def _kernel(config: GraphConfig) -> gtsam.noiseModel.mEstimator.Base | None:
    c = config
    make = {
        "cauchy": lambda: gtsam.noiseModel.mEstimator.Cauchy.Create(c.kernel_threshold),
        "huber": lambda: gtsam.noiseModel.mEstimator.Huber.Create(c.kernel_threshold),
        "tukey": lambda: gtsam.noiseModel.mEstimator.Tukey.Create(c.kernel_threshold),
    }.get(c.kernel)
    return None if make is None else make()


class PoseGraph:
    """Keyframes, windows and loops in; T_map_base per keyframe and map -> odom out."""

    def __init__(self, config: GraphConfig) -> None:
        if config.kernel not in KERNELS:
            raise ValueError(f"robust kernel must be one of {', '.join(KERNELS)}, got {config.kernel!r}")
        self.config = config
        params = gtsam.ISAM2Params()
        params.setRelinearizeThreshold(RELINEARIZE_THRESHOLD)
        params.relinearizeSkip = RELINEARIZE_SKIP
        self._isam = gtsam.ISAM2(params)
        self._new_factors = gtsam.NonlinearFactorGraph()
        self._new_values = gtsam.Values()
        #: map -> odom where the map starts (identity: map = odom at the first keyframe).
        self._origin = np.eye(4)
        #: Keyframe id -> the odometry's own pose covariance at its stamp (odometry.use_covariance), or None.
        self._covariance: dict[int, np.ndarray | None] = {}
        #: Keyframe id -> odometry pose (None without odometry). Ids grow with the keyframes' stamps.
        self.odom: dict[int, np.ndarray | None] = {}
        self._in_graph: set[int] = set()
        #: Keyframes with odometry waiting to enter the graph, oldest first.
        self._pending: list[int] = []
        #: Every keyframe with a pose (in the graph or waiting), oldest first.
        self._known: list[int] = []
        #: Newest keyframe in the graph.
        self._newest: int | None = None
        self._T_map_odom = np.eye(4)
        #: The odometry's metres per map metre: 1 unless a camera rig's baseline measured the
        #: odometry's scale error (see :mod:`.scale`); steps entering the graph are divided by it.
        self.odometry_scale = 1.0

    # ------------------------------------------------------------------ noise models
    def odometry_sigmas(self, delta: np.ndarray, a: int | None = None, b: int | None = None) -> np.ndarray:
        """(rotation x3 rad, translation x3 m) sigmas of the odometry step from keyframe a to b: drift
        growing with distance, or what the odometry's own covariance says when it gave one."""
        c = self.config
        dist = float(np.linalg.norm(delta[:3, 3]))
        sigma_t = max(c.odom_sigma_ratio * dist, 0.002)
        sigma_r = max(c.odom_sigma_rad_per_m * dist + 0.02 * rotation_angle(delta), np.radians(0.1))
        parametric = np.array([sigma_r] * 3 + [sigma_t] * 3)
        if a is None or b is None:
            return parametric
        return odometry_between_sigmas(self._covariance.get(a), self._covariance.get(b), self.odom[b], parametric)

    def _robust(self, sigmas: np.ndarray) -> gtsam.noiseModel.Base:
        base = gtsam.noiseModel.Diagonal.Sigmas(np.asarray(sigmas, dtype=np.float64))
        kernel = _kernel(self.config)
        return base if kernel is None else gtsam.noiseModel.Robust.Create(kernel, base)

    def _view_sigmas(self, obs: Observation) -> np.ndarray:
        c = self.config
        return obs.sigma_scale * np.array([c.view_sigma_rad] * 3 + [c.view_sigma_m] * 3)

    def odometry_step(self, a: int, b: int) -> np.ndarray:
        """The odometry's motion from keyframe a to b, in the map's metres."""
        delta = invert(self.odom[a]) @ self.odom[b]
        if self.odometry_scale != 1.0:
            delta[:3, 3] /= self.odometry_scale
        return delta

    # ------------------------------------------------------------------ keyframes
    def has(self, kid: int) -> bool:
        """The keyframe has a pose: in the graph, or (with odometry) waiting to enter it."""
        return kid in self._in_graph or kid in self._pending

    def add_keyframe(self, kid: int, T_odom_base: np.ndarray | None, covariance: np.ndarray | None = None) -> None:
        """A new keyframe, newer (and with a larger id) than every other.

        With odometry it waits, predicted by the odometry, until the window that observes it
        commits it - at the window's local solution, so that iSAM2 starts from values where a
        slipped odometry step's robust kernel already weighs little - or until a later commit
        takes it along on its odometry alone. Without odometry it enters with the window that
        places it.
        """
        T = None if T_odom_base is None else rigidify(T_odom_base)
        if self.odom and (T is None) != (self.odom[next(reversed(self.odom))] is None):
            raise ValueError("odometry must be given for every keyframe or for none")
        self.odom[kid] = T
        self._covariance[kid] = covariance
        if T is not None:
            self._pending.append(kid)
            self._known.append(kid)

    def _predicted(self, kid: int, queued: dict[int, np.ndarray] | None = None) -> np.ndarray:
        """A waiting keyframe's pose: the newest committed one's, moved by the odometry since.

        ``queued``: poses of keyframes committed but not yet handed to iSAM2 (it knows none of them).
        """
        if self._newest is None:
            return self._origin @ self.odom[kid]  # map = odom at the first keyframe (or the origin set)
        base = self._newest
        T_base = queued[base] if queued and base in queued else self.T_map_base(base)
        return T_base @ self.odometry_step(base, kid)

    def _commit_pending(self, upto: int, poses: dict[int, np.ndarray]) -> None:
        """Queue the waiting keyframes up to ``upto`` with their odometry factors (at ``poses`` where given)."""
        queued: dict[int, np.ndarray] = {}
        while self._pending and self._pending[0] <= upto:
            kid = self._pending.pop(0)
            T = poses.get(kid)
            if T is None:
                T = self._predicted(kid, queued)
            queued[kid] = T
            if self._newest is None:  # the map's first keyframe: map = odom there (or the origin set)
                origin = self._origin @ self.odom[kid]
                self._new_factors.add(gtsam.PriorFactorPose3(x_key(kid), _pose(origin), _origin_noise()))
            else:
                previous = self._newest
                delta = self.odometry_step(previous, kid)
                noise = self._robust(self.odometry_sigmas(delta, previous, kid))
                self._new_factors.add(gtsam.BetweenFactorPose3(x_key(previous), x_key(kid), _pose(delta), noise))
            self._new_values.insert(x_key(kid), _pose(T))
            self._in_graph.add(kid)
            self._newest = kid

    def set_origin(self, T_map_odom: np.ndarray) -> None:
        """Start the map with this drift instead of map = odom (relocalised in a loaded map): the
        first keyframe to enter the graph is held at ``T_map_odom @ T_odom_base``."""
        if self._in_graph:
            raise ValueError("the origin can only be set before the first keyframe enters the graph")
        self._origin = rigidify(T_map_odom)
        self._T_map_odom = self._origin.copy()

    def add_fixed(self, kid: int, T_map_base: np.ndarray) -> None:
        """A keyframe held where it is (a loaded map's): loops to it pull only the new keyframes."""
        if kid in self._in_graph:
            return
        self._new_factors.add(gtsam.PriorFactorPose3(x_key(kid), _pose(T_map_base), _origin_noise()))
        self._new_values.insert(x_key(kid), _pose(T_map_base))
        self._in_graph.add(kid)
        self._flush()

    def add_origin(self, kid: int, T_map_base: np.ndarray) -> None:
        """The map's first keyframe, without odometry, at a given pose (relocalised in a loaded map)."""
        self.add_fixed(kid, T_map_base)
        self._known.append(kid)
        self._newest = kid

    def commit_odometry(self) -> None:
        """Take every waiting keyframe into the graph on its odometry alone (its window was rejected)."""
        if self._pending:
            self._commit_pending(self._pending[-1], {})
            self._flush()

    def _flush(self) -> None:
        if self._new_factors.size() or self._new_values.size():
            self._isam.update(self._new_factors, self._new_values)
            self._new_factors = gtsam.NonlinearFactorGraph()
            self._new_values = gtsam.Values()
        if self._newest is not None and self.odom.get(self._newest) is not None:
            self._T_map_odom = rigidify(self.T_map_base(self._newest) @ invert(self.odom[self._newest]))

    # ------------------------------------------------------------------ windows
    def check_window(self, observations: list[Observation]) -> WindowCheck:
        """Solve one window locally against the odometry (its keyframes must be in the graph):
        which views fit, how far the rest is from the odometry, which odometry steps slipped.

        The local problem holds the window's keyframes, the odometry between consecutive ones, a
        prior on the oldest at its global estimate and marginal covariance, and the views.
        """
        if not observations:
            raise ValueError("a window needs at least one observation")
        lo, hi = min(o.kid for o in observations), max(o.kid for o in observations)
        kids = [k for k in range(lo, hi + 1) if self.has(k)]  # and those between (rejected windows')
        current = {k: self.T_map_base(k) for k in kids}
        # Two starts: the odometry's poses, and the window's own geometry hung on its oldest keyframe.
        # With robust kernels a solve keeps the side it starts on, so a slipped odometry step must be
        # given the chance to lose against the window, and a wrong view to lose against the odometry.
        first = next(o for o in observations if o.kid == kids[0])
        W = current[kids[0]] @ invert(first.T_window_base)
        by_window = dict(current)
        for o in reversed(observations):
            by_window[o.kid] = W @ o.T_window_base
        starts = []
        for poses in (current, by_window):
            values = gtsam.Values()
            for k in kids:
                values.insert(x_key(k), _pose(poses[k]))
            values.insert(w_key(0), _pose(W))
            starts.append(values)
        graph = gtsam.NonlinearFactorGraph()
        if kids[0] in self._in_graph:
            cov = self._isam.marginalCovariance(x_key(kids[0]))
            noise = gtsam.noiseModel.Gaussian.Covariance(0.5 * (cov + cov.T))
        else:  # the map's first keyframe
            noise = _origin_noise()
        graph.add(gtsam.PriorFactorPose3(x_key(kids[0]), _pose(current[kids[0]]), noise))
        steps = []
        for a, b in zip(kids, kids[1:], strict=False):
            delta = self.odometry_step(a, b)
            sigmas = self.odometry_sigmas(delta, a, b)
            steps.append((a, b, delta, sigmas))
            graph.add(gtsam.BetweenFactorPose3(x_key(a), x_key(b), _pose(delta), self._robust(sigmas)))
        active = [True] * len(observations)

        def solve(*initial: gtsam.Values) -> gtsam.Values:
            """The lowest-cost solution from the given starts."""
            g = gtsam.NonlinearFactorGraph(graph)
            for o, on in zip(observations, active, strict=True):
                if on:
                    g.add(gtsam.BetweenFactorPose3(w_key(0), x_key(o.kid), _pose(o.T_window_base),
                                                   self._robust(self._view_sigmas(o))))
            params = gtsam.LevenbergMarquardtParams()
            params.setMaxIterations(LOCAL_ITERATIONS)
            solutions = [gtsam.LevenbergMarquardtOptimizer(g, v, params).optimize() for v in initial]
            return min(solutions, key=g.error)

        result = solve(*starts)
        chi2 = [self._view_chi2(result, o) for o in observations]
        bad = [c > self.config.reject_chi2 for c, _ in chi2]
        # A few views off: those views are wrong. Many: the window and the odometry disagree, and
        # the residual decides about the whole window.
        if 0 < sum(bad) <= max(1, len(bad) // 4):
            active = [not b for b in bad]
            result = solve(result)
            chi2 = [self._view_chi2(result, o) for o in observations]
        used = [e for (_, e), a in zip(chi2, active, strict=True) if a]
        residual = float(np.sqrt(np.mean(np.square(used)))) if used else float("inf")
        slips = []
        for a, b, delta, sigmas in steps:
            solved = invert(result.atPose3(x_key(a)).matrix()) @ result.atPose3(x_key(b)).matrix()
            off = float(np.linalg.norm(solved[:3, 3] - delta[:3, 3]))
            if off > max(MIN_SLIP_M, SLIP_SIGMAS * sigmas[3]):
                slips.append((a, b, off))
        poses = {k: result.atPose3(x_key(k)).matrix() for k in kids}
        return WindowCheck(active, residual, result.atPose3(w_key(0)).matrix(), poses, slips)

    def _view_chi2(self, values: gtsam.Values, obs: Observation) -> tuple[float, float]:
        """Whitened squared error (no kernel) and translation error (m) of one view factor."""
        W = values.atPose3(w_key(0)).matrix()
        X = values.atPose3(x_key(obs.kid)).matrix()
        err = invert(W @ obs.T_window_base) @ X
        rot = gtsam.Rot3.Logmap(gtsam.Rot3(err[:3, :3]))
        s = self._view_sigmas(obs)
        chi2 = float(np.sum(np.square(rot / s[:3])) + np.sum(np.square(err[:3, 3] / s[3:])))
        return chi2, float(np.linalg.norm(err[:3, 3]))

    def commit_window(self, j: int, observations: list[Observation], T_map_window: np.ndarray,
                      new_poses: dict[int, np.ndarray] | None = None,
                      bridge: tuple[int, int, np.ndarray] | None = None) -> None:
        """Add window ``j``'s (accepted) views to the global graph.

        Keyframes not yet in the graph (without odometry) enter here at ``new_poses``; each must
        be observed by the window, and at least one observed keyframe must already be in the graph
        unless the graph is empty (the first window then also sets the map's origin), or a
        ``bridge`` (graph keyframe, new keyframe, T between them) must tie it, loosely, to the map:
        after a break of the chain the map continues from its newest keyframe.
        """
        new_poses = new_poses or {}
        if not observations:
            raise ValueError("a window needs at least one observation")
        if self._pending:  # with odometry: the window's keyframes (and older waiting ones) enter now
            self._commit_pending(max(o.kid for o in observations), new_poses)
            new_poses = {}
        missing = [o.kid for o in observations if o.kid not in self._in_graph and o.kid not in new_poses]
        if missing:
            raise ValueError(f"keyframes {missing} are neither in the graph nor given a pose")
        if self._newest is None:  # the first window: its first keyframe is the map's origin
            first = min(new_poses)
            self._new_factors.add(gtsam.PriorFactorPose3(x_key(first), _pose(new_poses[first]),
                                                         _origin_noise()))
        elif bridge is not None:
            a, b, T_ab = bridge
            self._new_factors.add(gtsam.BetweenFactorPose3(x_key(a), x_key(b), _pose(T_ab),
                                                           gtsam.noiseModel.Diagonal.Sigmas(BRIDGE_SIGMAS)))
        elif all(o.kid in new_poses for o in observations):
            raise ValueError("a window must share a keyframe with the graph")
        for k, T in sorted(new_poses.items()):
            if k not in self._in_graph:
                self._new_values.insert(x_key(k), _pose(T))
                self._in_graph.add(k)
                self._known.append(k)
                self._newest = k if self._newest is None else max(self._newest, k)
        self._new_values.insert(w_key(j), _pose(T_map_window))
        for o in observations:
            self._new_factors.add(gtsam.BetweenFactorPose3(w_key(j), x_key(o.kid), _pose(o.T_window_base),
                                                           self._robust(self._view_sigmas(o))))
        self._flush()

    # ------------------------------------------------------------------ loops
    def add_loop(self, kid_a: int, kid_b: int, T_a_b: np.ndarray, sigmas: np.ndarray, iterations: int = 3) -> None:
        """A loop closure: keyframe b seen from keyframe a (robust). Re-solves the loop."""
        self._new_factors.add(gtsam.BetweenFactorPose3(x_key(kid_a), x_key(kid_b), _pose(T_a_b), self._robust(sigmas)))
        self._flush()
        for _ in range(iterations - 1):  # relinearise around the closed loop
            self._isam.update(force_relinearize=True)
        self._flush()

    # ------------------------------------------------------------------ results
    def T_map_base(self, kid: int) -> np.ndarray:
        """The keyframe's current estimate (a waiting one's is predicted by the odometry)."""
        if kid in self._in_graph:
            return self._isam.calculateEstimatePose3(x_key(kid)).matrix()
        return self._predicted(kid)

    def marginal_covariance(self, kid: int) -> np.ndarray:
        """6x6 covariance (rotation, translation; in the keyframe's frame) of a keyframe's pose."""
        return self._isam.marginalCovariance(x_key(kid))

    @property
    def keyframes(self) -> list[int]:
        """Keyframe ids with a pose (see :meth:`has`), oldest first."""
        return self._known

    @property
    def T_map_odom(self) -> np.ndarray:
        """The drift: newest keyframe's map pose composed with the inverse of its odometry pose."""
        return self._T_map_odom.copy()
