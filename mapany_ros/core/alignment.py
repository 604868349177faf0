"""Similarity transforms between frames and point sets (pure numpy), for the placement stage.

``Sim3`` carries a window's frame into the map (``X_map = s * R @ X + t``, poses kept rigid);
``weighted_similarity`` is the closed-form weighted fit of one point set onto another and
``robust_similarity`` its iteratively re-weighted form, which suppresses points that disagree with
the consensus (a wrong view, a moving object). ``rigidify`` repairs almost-rigid poses such as
a model's bf16 outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mapany_ros.core.geometry import make_pose


def orthonormalize(R: np.ndarray) -> np.ndarray:
    """Nearest rotation matrix (SVD projection, det +1) to an almost-rotation such as a bf16 output."""
    R = np.asarray(R, dtype=np.float64)
    if R.shape == (3, 3):
        # Already a rotation to float64 rounding (the graph's poses, an earlier projection): the
        # projection would return it unchanged to that rounding. Checked in plain floats, a few
        # microseconds against the SVD's twenty-odd; placement asks this a hundred times a window.
        (a, b, c), (d, e, f), (g, h, i) = R.tolist()
        if (max(abs(a * a + b * b + c * c - 1.0), abs(d * d + e * e + f * f - 1.0), abs(g * g + h * h + i * i - 1.0),
                abs(a * d + b * e + c * f), abs(a * g + b * h + c * i), abs(d * g + e * h + f * i)) < 1e-12
                and a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g) > 0.0):
            return R.copy()
    U, _, Vt = np.linalg.svd(R)
    E = np.eye(3)
    E[2, 2] = np.sign(np.linalg.det(U @ Vt)) or 1.0
    return U @ E @ Vt


def rigidify(T: np.ndarray) -> np.ndarray:
    """A float64 rigid 4x4 from a noisy one: orthonormal rotation, exact last row."""
    T = np.asarray(T, dtype=np.float64)
    return make_pose(orthonormalize(T[:3, :3]), T[:3, 3])


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
