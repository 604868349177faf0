"""Which views of a window disagree with their neighbours' geometry.

A feed-forward model now and then returns one view badly off (a wrong pose, a depth map of the
wrong scale). Its points then land where no neighbouring view sees a surface. Every view's
points are projected into every other view of the same window and compared with that view's
depth: a view is consistent when, with at least one neighbour that sees the same surfaces, most
of its points fall on the neighbour's surface. Nothing here needs priors, so it works with and
without odometry, for every backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.spatial.transform import Rotation

from mapany_ros.core.placement.multiview import ViewStack


def agreement_matrix(stack: ViewStack, T: np.ndarray, *, tolerance: float = 0.05, min_overlap: int = 50
                     ) -> np.ndarray:
    """A[a, b]: fraction of view a's points seen by view b that lie on b's depth (NaN: overlap too small).

    ``a``, ``b`` index ``stack.candidates``; a point agrees when its depth in view b is within
    ``tolerance`` (relative) of the depth view b predicts at that pixel.
    """
    assoc = stack.associate(T)
    agree = (assoc.Y[:, 2] - assoc.Qz).abs() <= tolerance * assoc.Qz
    seen = assoc.seen.sum(1)
    frac = (agree & assoc.seen).sum(1).double() / seen.clamp_min(1).double()
    n = len(stack.candidates)
    A = np.full((n, n), np.nan)
    ok = (seen >= min_overlap).cpu().numpy()
    A[stack.I.cpu().numpy()[ok], stack.J.cpu().numpy()[ok]] = frac.cpu().numpy()[ok]
    return A


def inconsistent_views(stack: ViewStack, threshold: float, *, tolerance: float = 0.08) -> list[int]:
    """The stack's views whose best agreement with any neighbour is below ``threshold`` x the window's median.

    A good view has at least one good neighbour, so its best agreement is high even beside a bad
    view; a bad view agrees with nobody. Judged against the window's median, so a model whose
    depth is noisier everywhere is not punished view by view. With fewer than three views there
    is no consensus to judge by (one of two disagreeing views is wrong, but which?): nothing is
    rejected here, and the priors (odometry, the placed overlap) decide instead.
    """
    if threshold <= 0 or len(stack.candidates) < 3:
        return []
    A = agreement_matrix(stack, stack.T0, tolerance=tolerance)
    best = np.array([np.nanmax(row) if np.any(np.isfinite(row)) else np.nan for row in A])
    if np.sum(np.isfinite(best)) < 3:
        return []
    limit = threshold * np.nanmedian(best)
    return [i for i, b in zip(stack.candidates, best, strict=True) if np.isfinite(b) and b < limit]


def pose_outliers(T: Sequence[np.ndarray], stamps: Sequence[int], *, sigma_m: float, sigma_rad: float,
                  max_rejections: int | None = None) -> list[int]:
    """Views whose pose leaves the path their neighbours in time describe (indices into ``T``).

    A robot moves smoothly between keyframes; a view whose predicted pose is far from what its
    neighbours interpolate (or extrapolate, at the ends) is wrong even where its depth fits the
    scene (a pose error along a wall leaves every point on the wall). Tolerance: three times the
    model's pose noise for a difference of poses, plus a quarter of the neighbours' own spacing
    (a sparse path curves between keyframes). The worst offender goes first, then the rest are
    judged again without it.
    """
    order = sorted(range(len(T)), key=lambda i: stamps[i])
    keep = list(order)
    rejected: list[int] = []
    limit = max_rejections if max_rejections is not None else len(T) // 4
    poses = np.asarray(T, dtype=np.float64).reshape(-1, 4, 4)
    times = np.asarray(stamps, dtype=np.int64)
    while len(keep) >= 4 and len(rejected) < limit:
        # Every kept view against what its neighbours predict, all at once.
        m = len(keep)
        pos = np.arange(m)
        a = np.where(pos == 0, 1, np.where(pos == m - 1, m - 2, pos - 1))
        b = np.where(pos == 0, 2, np.where(pos == m - 1, m - 3, pos + 1))
        idx, ia, ib = np.asarray(keep), np.asarray(keep)[a], np.asarray(keep)[b]
        ta, tb = times[ia], times[ib]
        span = tb - ta  # nanoseconds, exact
        alpha = np.where(span != 0, (times[idx] - ta) / np.where(span != 0, span, 1), 0.5)
        pred = _lerp_poses(poses[ia], poses[ib], alpha)
        d_t = np.linalg.norm(poses[idx, :3, 3] - pred[:, :3, 3], axis=1)
        d_r = _angles(pred[:, :3, :3], poses[idx, :3, :3])
        spread_t = np.linalg.norm(poses[ia, :3, 3] - poses[ib, :3, 3], axis=1)
        spread_r = _angles(poses[ia, :3, :3], poses[ib, :3, :3])
        ratio = np.maximum(d_t / (3 * np.sqrt(2) * sigma_m + 0.25 * spread_t),
                           d_r / (3 * np.sqrt(2) * sigma_rad + 0.25 * spread_r))
        ratio = np.where(np.isnan(ratio), -np.inf, ratio)
        k = int(np.argmax(ratio))  # the first of equal worst ones, as a scan in time order would find
        if not ratio[k] > 1.0:
            break
        worst = keep[k]
        rejected.append(worst)
        keep.remove(worst)
    return rejected


def _angles(Ra: np.ndarray, Rb: np.ndarray) -> np.ndarray:
    """Rotation angle (radians) of Ra^T Rb for stacks of rotation matrices."""
    c = (np.einsum("nij,nij->n", Ra, Rb) - 1.0) / 2.0
    return np.arccos(np.clip(c, -1.0, 1.0))


def _lerp_poses(Ta: np.ndarray, Tb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """SE(3) interpolation that also extrapolates (alpha outside [0, 1]), for stacks of poses."""
    rel = Rotation.from_matrix(np.transpose(Ta[:, :3, :3], (0, 2, 1)) @ Tb[:, :3, :3]).as_rotvec()
    out = np.tile(np.eye(4), (len(Ta), 1, 1))
    out[:, :3, :3] = Ta[:, :3, :3] @ Rotation.from_rotvec(alpha[:, None] * rel).as_matrix()
    out[:, :3, 3] = (1 - alpha)[:, None] * Ta[:, :3, 3] + alpha[:, None] * Tb[:, :3, 3]
    return out
