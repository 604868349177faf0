"""Re-anchoring a window's predicted frame into the world frame of its pose priors (pure numpy).

Multi-view models such as MapAnything discard the caller's world frame: their outputs are anchored
on view 0 as predicted, at the model's own scale. A window is brought back into the prior (odometry
or map) frame with one similarity transform ``X_world = s * R @ X_pred + t`` estimated from the
views that carry a prior, chosen by how much the priors constrain it:

* 3+ posed views whose centres span a plane or a volume: Umeyama Sim(3) on camera centres
  (centres are what odometry measures best; orientations would let one bad view dominate).
* 2+ posed views on a line (or exactly 2): centres fix scale and translation but not the roll about
  the line, so the rotation is the chordal mean of the per-view rotation offsets, the scale the
  ratio of centre spreads.
* 1 posed view, or centres closer together than ``min_baseline_m`` (a robot standing still):
  rigid anchor, rotation mean plus centroid; with one view this is exactly
  ``T_world_pred = T_prior0 @ inv(T_pred0)``. Scale stays the model's (metric) one unless the
  caller knows better (``scale_hint``, e.g. from the depth of a view predicted twice).

The residual is the RMS camera-centre distance after alignment, in metres of the world frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mapany_ros.core.geometry import make_pose, umeyama


def orthonormalize(R: np.ndarray) -> np.ndarray:
    """Nearest rotation matrix (SVD projection, det +1) to an almost-rotation such as a bf16 output."""
    U, _, Vt = np.linalg.svd(np.asarray(R, dtype=np.float64))
    E = np.eye(3)
    E[2, 2] = np.sign(np.linalg.det(U @ Vt)) or 1.0
    return U @ E @ Vt


def rigidify(T: np.ndarray) -> np.ndarray:
    """A float64 rigid 4x4 from a noisy one: orthonormal rotation, exact last row."""
    T = np.asarray(T, dtype=np.float64)
    return make_pose(orthonormalize(T[:3, :3]), T[:3, 3])


def mean_rotation(rotations: Sequence[np.ndarray]) -> np.ndarray:
    """Chordal L2 mean of rotation matrices (projection of their arithmetic mean)."""
    return orthonormalize(np.mean(np.stack([np.asarray(R, dtype=np.float64) for R in rotations]), axis=0))


@dataclass(frozen=True)
class Sim3:
    """``X_world = scale * R @ X + t``; applied to poses it keeps them rigid (scale moves centres)."""

    R: np.ndarray
    t: np.ndarray
    scale: float = 1.0

    @staticmethod
    def identity() -> Sim3:
        return Sim3(np.eye(3), np.zeros(3), 1.0)

    def matrix(self) -> np.ndarray:
        """4x4 matrix with the scale folded into the upper-left block."""
        M = make_pose(self.R, self.t)
        M[:3, :3] *= self.scale
        return M

    def apply_points(self, X: np.ndarray) -> np.ndarray:
        """Transform (..., 3) points."""
        return self.scale * np.asarray(X, dtype=np.float64) @ self.R.T + self.t

    def apply_pose(self, T: np.ndarray) -> np.ndarray:
        """Camera-to-pred pose -> camera-to-world pose (float64, rigid)."""
        T = rigidify(T)
        return make_pose(orthonormalize(self.R @ T[:3, :3]), self.scale * self.R @ T[:3, 3] + self.t)

    def inverse(self) -> Sim3:
        R_inv = self.R.T
        return Sim3(R_inv, -R_inv @ self.t / self.scale, 1.0 / self.scale)

    def __matmul__(self, other: Sim3) -> Sim3:
        """Composition: ``(a @ b).apply_points(X) == a.apply_points(b.apply_points(X))``."""
        return Sim3(self.R @ other.R, self.scale * self.R @ other.t + self.t, self.scale * other.scale)

    @staticmethod
    def from_pose(T: np.ndarray, scale: float = 1.0) -> Sim3:
        """Points scaled by ``scale`` about the origin, then moved by the rigid transform T."""
        T = rigidify(T)
        return Sim3(T[:3, :3], T[:3, 3], scale)


@dataclass(frozen=True)
class Alignment:
    """How one window's predicted frame maps into the world frame, and how well the priors agree."""

    transform: Sim3
    residual_m: float
    rotation_residual_rad: float
    method: str  # "none" | "anchor" | "rotation_mean" | "umeyama"
    num_anchors: int


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.sum(np.asarray(x) ** 2, axis=-1)))) if len(x) else 0.0


def _rotation_residual(R: np.ndarray, R_pred: np.ndarray, R_target: np.ndarray) -> float:
    """RMS angle between aligned predicted and target orientations."""
    angles = []
    for Rp, Rt in zip(R_pred, R_target, strict=True):
        c = (np.trace((R @ Rp).T @ Rt) - 1.0) / 2.0
        angles.append(np.arccos(np.clip(c, -1.0, 1.0)))
    return float(np.sqrt(np.mean(np.square(angles)))) if angles else 0.0


def align_window(
    T_pred: Sequence[np.ndarray],
    T_target: Sequence[np.ndarray | None],
    *,
    with_scale: bool = True,
    min_baseline_m: float = 0.05,
    min_planarity: float = 0.05,
    scale_hint: float | None = None,
) -> Alignment:
    """Similarity mapping predicted camera poses onto the targets given for some of them.

    ``T_pred[i]`` and ``T_target[i]`` are camera-to-frame 4x4 poses of the same view; ``None``
    targets are ignored. ``min_baseline_m`` is the RMS spread of target centres below which the
    centres say nothing about rotation or scale; ``min_planarity`` is the ratio of the second to
    the first singular value of the centred target centres below which they count as collinear.
    ``scale_hint`` is used where the centres cannot fix the scale (one view, or no baseline), e.g.
    the depth ratio of a view predicted twice.
    """
    if len(T_pred) != len(T_target):
        raise ValueError("T_pred and T_target must have the same length")
    idx = [i for i, T in enumerate(T_target) if T is not None]
    if not idx:
        return Alignment(Sim3.identity(), 0.0, 0.0, "none", 0)
    P = [rigidify(T_pred[i]) for i in idx]
    Q = [rigidify(T_target[i]) for i in idx]
    c_p = np.stack([T[:3, 3] for T in P])
    c_q = np.stack([T[:3, 3] for T in Q])
    R_p = [T[:3, :3] for T in P]
    R_q = [T[:3, :3] for T in Q]
    n = len(idx)
    centred_q = c_q - c_q.mean(0)
    centred_p = c_p - c_p.mean(0)
    spread_q = _rms(centred_q)
    spread_p = _rms(centred_p)
    sv = np.linalg.svd(centred_q, compute_uv=False) if n >= 2 else np.zeros(1)
    spans_plane = n >= 3 and sv[0] > 0 and sv[1] >= min_planarity * sv[0]

    if spans_plane and spread_q >= min_baseline_m:
        T, s, _ = umeyama(c_p, c_q, with_scale=with_scale)
        R, t, method = T[:3, :3], T[:3, 3], "umeyama"
    else:
        R = mean_rotation([Rq @ Rp.T for Rp, Rq in zip(R_p, R_q, strict=True)])
        s = 1.0
        if n >= 2 and spread_q >= min_baseline_m and with_scale and spread_p > 1e-9:
            s = spread_q / spread_p
            method = "rotation_mean"
        else:
            method = "anchor" if n == 1 else "rotation_mean"
            if scale_hint is not None and with_scale:
                s = float(scale_hint)
        t = c_q.mean(0) - s * R @ c_p.mean(0)
    if not np.isfinite(s) or s <= 0:
        s = 1.0
        t = c_q.mean(0) - R @ c_p.mean(0)
    sim = Sim3(orthonormalize(R), np.asarray(t, dtype=np.float64), float(s))
    residual = _rms(sim.apply_points(c_p) - c_q)
    return Alignment(sim, residual, _rotation_residual(sim.R, R_p, R_q), method, n)


def weighted_similarity(
    src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None, *, scale: float | None = None
) -> Sim3:
    """Weighted least-squares ``dst ~ s * R @ src + t`` (Umeyama with per-point weights).

    ``scale`` fixes s instead of fitting it (a rigid fit when 1.0). Rotation and translation are
    the closed-form optimum for that scale, so a fixed scale costs no extra iteration.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mu_s, mu_d = w @ src, w @ dst
    xs, xd = src - mu_s, dst - mu_d
    U, S, Vt = np.linalg.svd((xd * w[:, None]).T @ xs)
    E = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        E[2, 2] = -1
    R = U @ E @ Vt
    if scale is None:
        var_s = float(w @ np.sum(xs**2, axis=1))
        scale = float(np.trace(np.diag(S) @ E) / var_s) if var_s > 0 else 1.0
    return Sim3(R, mu_d - scale * R @ mu_s, float(scale))


#: IRLS weight of a whitened residual r for each robust kernel (threshold k in the same units).
ROBUST_WEIGHTS = {
    "none": lambda r, k: np.ones_like(r),
    "huber": lambda r, k: np.minimum(1.0, k / np.maximum(r, 1e-12)),
    "cauchy": lambda r, k: 1.0 / (1.0 + (r / k) ** 2),
    "tukey": lambda r, k: np.where(r < k, (1.0 - (r / k) ** 2) ** 2, 0.0),
}


@dataclass(frozen=True)
class RobustFit:
    """A robust similarity fit and how well the points agree with it."""

    transform: Sim3
    #: Per-point distance after the fit, in dst units.
    residuals: np.ndarray
    #: Final IRLS weight of each point (0 = outlier).
    weights: np.ndarray


def robust_similarity(
    src: np.ndarray,
    dst: np.ndarray,
    sigma: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    kernel: str = "cauchy",
    threshold: float = 2.0,
    fit_scale: bool = True,
    iterations: int = 10,
) -> RobustFit:
    """Iteratively re-weighted similarity fit of ``src`` onto ``dst`` with a robust kernel.

    ``sigma`` is each point's expected error (e.g. proportional to its depth, as a model's depth
    error is), so residuals are whitened before the kernel weighs them; ``weights`` are prior
    confidences. The first iteration is the plain weighted fit; the kernel then suppresses the
    points that disagree with the consensus (a wrong view, a moving object).
    """
    if kernel not in ROBUST_WEIGHTS:
        raise ValueError(f"robust kernel must be one of {', '.join(ROBUST_WEIGHTS)}, got {kernel!r}")
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    prior = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64)
    sigma = np.maximum(np.asarray(sigma, dtype=np.float64), 1e-9)
    w = prior.copy()
    sim = Sim3.identity()
    for _ in range(iterations):
        if w.sum() <= 0:
            break
        sim = weighted_similarity(src, dst, w, scale=None if fit_scale else 1.0)
        residuals = np.linalg.norm(sim.apply_points(src) - dst, axis=1)
        w_new = prior * ROBUST_WEIGHTS[kernel](residuals / sigma, threshold)
        if np.allclose(w_new, w, rtol=1e-4, atol=1e-8):
            break
        w = w_new
    residuals = np.linalg.norm(sim.apply_points(src) - dst, axis=1)
    return RobustFit(sim, residuals, w)
