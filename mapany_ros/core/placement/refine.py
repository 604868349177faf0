"""Per-view pose refinement inside a window: make the views' depth maps agree (point-to-plane).

A feed-forward model's per-view poses carry a few centimetres of independent noise, while each
view's depth map is accurate in its own camera frame: consecutive keyframes would then step by the
noise of two views. Like DUSt3R's global alignment, the window's poses are refined so that every
view's points lie on its neighbours' surfaces: projective association into every overlapping view
(batched, :mod:`.multiview`), point-to-plane residuals with a Cauchy kernel, Gauss-Newton on all
views' 6-DoF corrections at once, each held to the model's pose by a prior. Directions the
geometry does not observe (a wall and the floor leave sliding along the wall free) keep the
model's values instead of drifting. How far a view had to move to agree is its disagreement: a
view that needed far more than the model's noise is rejected by the caller.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from mapany_ros.core.backends.base import ViewPrediction
from mapany_ros.core.geometry import invert, make_pose, transform_points
from mapany_ros.core.placement.multiview import ViewStack

#: A view's pose is refined only along directions where the data's information exceeds the prior's
#: by this factor and is at least this fraction of its best-observed direction's.
DEGENERACY_RATIO = 10.0
DEGENERACY_FRACTION = 0.05
#: Pairs with fewer associated points than this do not contribute.
MIN_PAIR_POINTS = 50


@dataclass
class Refinement:
    """Refined views and, per candidate, how far the model's pose had to move (Mahalanobis, 6 dof)."""

    views: list[ViewPrediction]
    correction_chi2: dict[int, float]


def _pair_blocks(stack: ViewStack, T: np.ndarray, depth_sigma: float, kernel_threshold: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair 12x12 normal-equation blocks, 12-gradients and point counts at poses ``T``."""
    a = stack.associate(T)
    Tt = torch.as_tensor(T, dtype=torch.float32, device=stack.device)
    I, J = stack.I, stack.J
    p = stack.src[I]  # (P, S, 3) camera i
    r = ((a.Y - a.Q) * a.normal).sum(-1)
    sigma = depth_sigma * a.Q[..., 2].abs() + 1e-3
    w = torch.where(a.planar, 1.0 / (1.0 + (r / (kernel_threshold * sigma)) ** 2) / sigma**2, torch.zeros_like(r))
    R_ji = Tt[J, :3, :3].transpose(1, 2) @ Tt[I, :3, :3]  # (P, 3, 3)
    nR = a.normal @ R_ji  # n^T R_ji
    # r = n . (R_ji (p + w_i x p + v_i) + ... - Q), camera-local perturbations of both poses.
    Jc = torch.cat([torch.cross(p, nR, dim=-1), nR, -torch.cross(a.Y, a.normal, dim=-1), -a.normal], dim=-1)
    count = a.planar.sum(1)
    use = (count >= MIN_PAIR_POINTS).float()[:, None]
    Jw = Jc * w[..., None]
    Hb = (torch.bmm(Jw.transpose(1, 2), Jc) * use[..., None]).double()
    gb = (torch.bmm(Jw.transpose(1, 2), r[..., None])[..., 0] * use).double()
    return Hb, gb, count


def _assemble(stack: ViewStack, Hb: torch.Tensor, gb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter the pair blocks into the (6n x 6n) system of all views."""
    n = len(stack.candidates)
    idx = torch.cat([6 * stack.I[:, None] + torch.arange(6, device=stack.device),
                     6 * stack.J[:, None] + torch.arange(6, device=stack.device)], dim=1)  # (P, 12)
    H = torch.zeros(6 * n, 6 * n, dtype=torch.float64, device=stack.device)
    g = torch.zeros(6 * n, dtype=torch.float64, device=stack.device)
    H.index_put_((idx[:, :, None].expand_as(Hb), idx[:, None, :].expand_as(Hb)), Hb, accumulate=True)
    g.index_put_((idx,), gb, accumulate=True)
    return H, g


def _observed_directions(H: np.ndarray, prior: np.ndarray, n: int) -> np.ndarray:
    """Basis (6n x k) of the per-view pose directions the geometry really observes.

    Each view's data block is whitened by the prior (so rotation and translation compare) and
    eigen-decomposed; directions whose information is small, absolutely or next to the view's best
    one, are left out. They carry only noise (a wall and the floor say nothing about sliding along
    the wall, yet noisy normals fake a little information there), so the model's values stand.
    """
    scale = 1.0 / np.sqrt(prior)
    blocks = []
    for a in range(n):
        Hw = H[6 * a : 6 * a + 6, 6 * a : 6 * a + 6] * np.outer(scale, scale)
        evals, evecs = np.linalg.eigh(Hw)
        keep = (evals > DEGENERACY_RATIO) & (evals > DEGENERACY_FRACTION * evals.max())
        blocks.append(scale[:, None] * evecs[:, keep])
    B = np.zeros((6 * n, sum(b.shape[1] for b in blocks)))
    col = 0
    for a, b in enumerate(blocks):
        B[6 * a : 6 * a + 6, col : col + b.shape[1]] = b
        col += b.shape[1]
    return B


def refine_window_poses(
    views: Sequence[ViewPrediction], stack: ViewStack, active: Sequence[int], *, prior_sigma_m: float,
    prior_sigma_rad: float, depth_sigma: float = 0.01, kernel_threshold: float = 2.0, iterations: int = 5,
) -> Refinement:
    """Refine the ``active`` views' poses (points move with them); other views are returned as they are.

    ``stack`` holds the window's views (built with normals; its pairs are pruned to those that see
    each other). ``depth_sigma`` is the relative depth noise that whitens residuals before the
    kernel; ``prior_sigma_*`` is how far the model's own poses are trusted.
    """
    out = list(views)
    slots = [a for a, i in enumerate(stack.candidates) if i in set(active)]
    if len(slots) < 2:
        return Refinement(out, {stack.candidates[a]: 0.0 for a in slots})
    n = len(stack.candidates)
    on = torch.zeros(n, dtype=torch.bool, device=stack.device)
    on[slots] = True
    T = stack.T0.copy()
    prior = np.array([1 / prior_sigma_rad**2] * 3 + [1 / prior_sigma_m**2] * 3)
    P = np.tile(prior, n)
    xi = np.zeros(6 * n)  # accumulated corrections (camera-local), held to zero by the prior
    for it in range(iterations):
        Hb, gb, count = _pair_blocks(stack, T, depth_sigma, kernel_threshold)
        if it == 0:  # views that do not see each other now will not after a small correction
            keep = count >= MIN_PAIR_POINTS // 2
            stack.keep_pairs(keep)
            Hb, gb, count = Hb[keep], gb[keep], count[keep]
        use = (on[stack.I] & on[stack.J]).double()  # pairs of views being refined
        H, g = _assemble(stack, Hb * use[:, None, None], gb * use[:, None])
        H = H.cpu().numpy()
        B = _observed_directions(H, prior, n)
        g = g.cpu().numpy() + P * xi
        y = np.linalg.solve(B.T @ (H + np.diag(P)) @ B, -(B.T @ g)) if B.shape[1] else np.zeros(0)
        step = B @ y
        xi += step
        for a in slots:
            s = step[6 * a : 6 * a + 6]
            T[a] = T[a] @ make_pose(Rotation.from_rotvec(s[:3]).as_matrix(), s[3:])
        if np.abs(step).max() < 1e-4:
            break
    chi2 = {}
    for a in slots:
        i = stack.candidates[a]
        delta = invert(stack.T0[a]) @ T[a]
        e = np.concatenate([Rotation.from_matrix(delta[:3, :3]).as_rotvec(), delta[:3, 3]])
        chi2[i] = float(np.sum(e**2 * prior))
        view = views[i]
        out[i] = dataclasses.replace(view, points_world=transform_points(view.points_world, T[a] @ invert(stack.T0[a])),
                                     T_world_camera=T[a])
    return Refinement(out, chi2)
