"""Depth and point accuracy against ground truth (ROS-free; numpy or torch inputs).

Used by the tests and benchmarks to judge backends on synthetic or recorded data. Errors are
only computed where the prediction is valid and the ground truth is defined, and the
ground truth is first brought onto the prediction's grid (:func:`downsample_depth`) so the
comparison is like with like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree

ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class DepthErrors:
    """Summary of a depth map's accuracy; fractions are in [0, 1], NaN when nothing to compare."""

    median_abs_rel: float  # median |d - gt| / gt over compared pixels
    mean_abs_rel: float
    within_10pct: float  # fraction of compared pixels with |d - gt| / gt < 0.10
    valid_fraction: float  # predicted-valid pixels / all pixels
    n_compared: int  # valid pixels that have ground truth
    n_pixels: int

    def __str__(self) -> str:
        return (
            f"median_rel={self.median_abs_rel:.4f} mean_rel={self.mean_abs_rel:.4f} "
            f"within10={self.within_10pct:.3f} valid={self.valid_fraction:.3f} (n={self.n_compared})"
        )


def to_numpy(x: ArrayLike) -> np.ndarray:
    """Host numpy copy-free view when possible (torch tensors are detached and moved to CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _gt_ok(gt: np.ndarray) -> np.ndarray:
    return np.isfinite(gt) & (gt > 0)


def depth_errors(
    pred: ArrayLike, valid: ArrayLike | None, gt: ArrayLike, threshold: float = 0.10
) -> DepthErrors:
    """Accuracy of ``pred`` (h, w) where ``valid`` (default: finite pred) against ``gt`` (h, w).

    Pixels without ground truth (NaN or <= 0) are left out of the error statistics but still
    count in ``valid_fraction``, which is about how much of the image the backend covers.
    """
    p = to_numpy(pred).astype(np.float64)
    g = to_numpy(gt).astype(np.float64)
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and ground truth {g.shape} differ; use downsample_depth")
    m = np.isfinite(p) if valid is None else to_numpy(valid).astype(bool) & np.isfinite(p)
    cmp = m & _gt_ok(g)
    rel = np.abs(p[cmp] - g[cmp]) / g[cmp]
    nan = float("nan")
    return DepthErrors(
        median_abs_rel=float(np.median(rel)) if rel.size else nan,
        mean_abs_rel=float(rel.mean()) if rel.size else nan,
        within_10pct=float(np.mean(rel < threshold)) if rel.size else nan,
        valid_fraction=float(m.mean()),
        n_compared=int(cmp.sum()),
        n_pixels=int(m.size),
    )


def downsample_depth(
    depth: ArrayLike, width: int, height: int, mode: str = "harmonic", max_spread: float = 0.05
) -> np.ndarray:
    """Ground-truth depth resampled to a ``width`` x ``height`` grid with the same pixel centres.

    ``harmonic`` averages inverse depth over each output pixel's footprint, which on a plane
    is exactly the depth at the footprint centre (1/z is affine in the image), matching an
    area-averaged image; footprints spanning a depth edge (relative spread above
    ``max_spread``) or missing depth give NaN. ``min`` keeps the nearest surface,
    ``nearest`` samples the input pixel closest to the output pixel centre.
    """
    d = to_numpy(depth).astype(np.float32)
    H, W = d.shape
    if (W, H) == (width, height):
        return d.copy()
    if mode == "nearest":
        ys = np.clip(np.round((np.arange(height) + 0.5) * H / height - 0.5).astype(int), 0, H - 1)
        xs = np.clip(np.round((np.arange(width) + 0.5) * W / width - 0.5).astype(int), 0, W - 1)
        return d[np.ix_(ys, xs)].copy()
    ok = _gt_ok(d)
    t = torch.from_numpy(np.where(ok, d, np.nan))[None, None]
    size = (height, width)
    if mode == "min":
        out = -F.adaptive_max_pool2d(torch.nan_to_num(-t, nan=-np.inf), size)
        bad = F.adaptive_max_pool2d((~torch.from_numpy(ok)).float()[None, None], size) > 0
        return torch.where(bad, torch.nan, out)[0, 0].numpy()
    if mode != "harmonic":
        raise ValueError(f"mode must be 'harmonic', 'min' or 'nearest', got {mode!r}")
    inv = F.adaptive_avg_pool2d(1.0 / t, size)  # NaN anywhere in a footprint -> NaN
    hi = F.adaptive_max_pool2d(torch.nan_to_num(t, nan=np.inf), size)
    lo = -F.adaptive_max_pool2d(torch.nan_to_num(-t, nan=-np.inf), size)
    out = 1.0 / inv
    out = torch.where((hi - lo) > max_spread * lo, torch.nan, out)
    return out[0, 0].numpy()


def gt_points(gt_depth: ArrayLike, K: np.ndarray, T_world_camera: np.ndarray) -> np.ndarray:
    """(h, w, 3) world points of a ground-truth z-depth map (NaN where it has none)."""
    g = to_numpy(gt_depth).astype(np.float64)
    g = np.where(_gt_ok(g), g, np.nan)
    h, w = g.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K).T
    pts = rays * g[..., None]
    return pts @ T_world_camera[:3, :3].T + T_world_camera[:3, 3]


def pixel_point_errors(
    points_world: ArrayLike, valid: ArrayLike, gt_depth: ArrayLike, K: np.ndarray, T_world_camera: np.ndarray
) -> np.ndarray:
    """Distance (m) from each valid predicted point to the ground-truth point of the same pixel.

    This is the error along the pixel's ray, an upper bound on the distance to the surface.
    """
    p = to_numpy(points_world).astype(np.float64)
    g = gt_points(gt_depth, K, T_world_camera)
    m = to_numpy(valid).astype(bool) & np.all(np.isfinite(p), -1) & np.all(np.isfinite(g), -1)
    return np.linalg.norm(p[m] - g[m], axis=-1)


def surface_distances(points: ArrayLike, surface_points: ArrayLike) -> np.ndarray:
    """Distance (m) from each finite point in ``points`` (..., 3) to the nearest surface sample.

    With a dense sample of the true surface (e.g. :func:`gt_points` of a full-resolution
    depth map) this approximates the point-to-surface distance to within half the sample
    spacing.
    """
    p = to_numpy(points).reshape(-1, 3).astype(np.float64)
    s = to_numpy(surface_points).reshape(-1, 3).astype(np.float64)
    p = p[np.all(np.isfinite(p), 1)]
    s = s[np.all(np.isfinite(s), 1)]
    if len(p) == 0:
        return np.zeros(0)
    if len(s) == 0:
        raise ValueError("no finite surface points to compare against")
    dist, _ = cKDTree(s).query(p, k=1)
    return dist


__all__ = [
    "DepthErrors",
    "depth_errors",
    "downsample_depth",
    "gt_points",
    "pixel_point_errors",
    "surface_distances",
    "to_numpy",
]


def map_quality(surface_distance: np.ndarray, xyz: np.ndarray, surface: np.ndarray, radius_m: float = 0.05
                ) -> dict[str, float]:
    """A fused map against the truth: accuracy (median and 90th percentile of each map point's
    ``surface_distance``, m) and completeness (fraction of true ``surface`` samples within
    ``radius_m`` of a map point)."""
    from scipy.spatial import cKDTree

    if len(xyz) == 0:
        return {"accuracy_median_m": float("nan"), "accuracy_p90_m": float("nan"), "completeness": 0.0}
    covered, _ = cKDTree(xyz).query(surface, k=1, distance_upper_bound=radius_m)
    return {
        "accuracy_median_m": float(np.median(surface_distance)),
        "accuracy_p90_m": float(np.percentile(surface_distance, 90)),
        "completeness": float(np.mean(np.isfinite(covered))),
    }


def depth_frame_errors(depth: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """AbsRel, median relative error, delta < 1.25 over valid pixels with ground truth; valid fraction."""
    e = depth_errors(depth, None, gt)
    cmp = np.isfinite(depth) & np.isfinite(gt) & (gt > 0)
    ratio = depth[cmp] / gt[cmp]
    delta = float(np.mean(np.maximum(ratio, 1.0 / ratio) < 1.25)) if ratio.size else math.nan
    return {"abs_rel": e.mean_abs_rel, "median_rel": e.median_abs_rel, "delta_1_25": delta,
            "valid_fraction": e.valid_fraction, "pixels_compared": e.n_compared}
