"""One keyframe's say on the 2-D grid: the cells its samples hit, those its rays crossed, those just behind.

Rays from the camera to its depth samples are cast in the floor plane at once, through a polar
buffer around the camera (a laser scan made from the depth image): the horizontal directions are
cut into bins about one ray apart. In each bin the keyframe saw through out to the farthest ray's
reach, but never closer than one cell to the bin's nearest obstacle sample; a ray reaches as far
as it stays at or below the obstacle band (a ray to the floor all the way, a ray to an obstacle up
to it, a ray to the ceiling until it rises above the band). The cells just behind the bin's
farthest obstacle sample, as far as the keyframe's depth may be off, get a "behind" vote: this
keyframe would have hit them had the surface been there. The cells of a window around the camera
are then tested against the buffer in one vectorised pass, so the cost is one pass over the
keyframe's samples and one over the cells it can see; no ray is stepped cell by cell.

Hits are cells holding MIN_HIT_SAMPLES of the keyframe's samples in the band, plus the cells
between neighbouring samples of an image row that lie on one surface (rays a stride apart would
leave a far wall dotted).

Everything is a pure function of the keyframe's samples, pose and floor, so the same call gives
the same cells again: that is how a corrected keyframe is taken out of the grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mapany_ros.core.geometry import transform_points

#: An obstacle cell needs this many of the keyframe's samples in the band: one stray sample is no wall.
MIN_HIT_SAMPLES = 2
#: Largest gap between two neighbouring rays' surfaces that is closed as one surface.
BRIDGE_MAX_M = 0.25
#: How far behind the farthest surface of a bearing a keyframe votes "behind": the depth error it may
#: have (6 % of the range: twice a real model's 3 % scale error; at least one cell).
BEHIND_RANGE_FRACTION = 0.06
BEHIND_MIN_CELLS = 1


@dataclass(frozen=True)
class Band:
    """The obstacle band and the geometry of the cells (from :class:`OccupancyConfig`)."""

    resolution_m: float
    min_height_m: float
    max_height_m: float


@dataclass
class Evidence:
    """Hit and free cells of one keyframe in a window of the grid (absolute cell indices from ``ix0, iy0``)."""

    ix0: int
    iy0: int
    hit: torch.Tensor  # (ny, nx) bool: MIN_HIT_SAMPLES or more samples in the band
    free: torch.Tensor  # (ny, nx) bool: a ray crossed the cell, and no sample lies in the band there
    behind: torch.Tensor  # (ny, nx) bool: just behind the farthest surface of its bearing, no sample there

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.hit.shape[0]), int(self.hit.shape[1])


def keyframe_evidence(points_cam: torch.Tensor, T_map_camera: np.ndarray, floor_z: float, band: Band,
                      bin_rad: float) -> Evidence | None:
    """Cells hit and seen through by the camera-frame samples ``points_cam`` at pose ``T_map_camera``.

    ``points_cam`` (h, w, 3) is the stride grid of samples, NaN where unused; ``floor_z`` the floor's
    height in the map frame under this keyframe; ``bin_rad`` the angle between two neighbouring rays
    (the width of the polar bins). None when no sample is usable.
    """
    used = torch.isfinite(points_cam).all(dim=-1)
    if not bool(used.any()):
        return None
    res = band.resolution_m
    grid_map = transform_points(points_cam, T_map_camera)  # (h, w, 3), NaN where unused
    p = grid_map[used]
    cx, cy, cz = (float(v) for v in T_map_camera[:3, 3])
    h = p[:, 2] - floor_z
    hc = cz - floor_z
    dx, dy = p[:, 0] - cx, p[:, 1] - cy
    r = torch.hypot(dx, dy)
    n_bins = max(8, math.ceil(2.0 * math.pi / bin_rad))
    bins = _bin_of(dx, dy, n_bins)

    lo, hi = band.min_height_m, band.max_height_m
    in_band = (h >= lo) & (h <= hi)
    # How far (horizontally) each ray stays at or below the band's top, and where it enters the band
    # when the camera is above it; below the band a ray proves that no obstacle standing on the floor
    # taller than the band's bottom is in its way.
    if hc < hi:
        far = torch.where(h > hi, r * ((hi - hc) / (h - hc).clamp_min(1e-6)), r)
        near = torch.zeros_like(r)
    else:
        far = torch.where(h > hi, torch.zeros_like(r), r)
        near = torch.where(h < hi, r * ((hc - hi) / (hc - h).clamp_min(1e-6)), r)
    reach = far > near
    dev = p.device
    r_hit = torch.full((n_bins,), math.inf, device=dev).scatter_reduce_(0, bins[in_band], r[in_band], "amin")
    r_far = torch.zeros(n_bins, device=dev).scatter_reduce_(0, bins[reach], far[reach], "amax")
    r_near = torch.full((n_bins,), math.inf, device=dev).scatter_reduce_(0, bins[reach], near[reach], "amin")
    r_free = torch.minimum(r_far, r_hit - res)  # never closer than one cell to what the bin hit
    r_back = torch.full((n_bins,), -math.inf, device=dev).scatter_reduce_(0, bins[in_band], r[in_band], "amax")
    r_behind = r_back + torch.clamp(r_back * BEHIND_RANGE_FRACTION, min=BEHIND_MIN_CELLS * res)

    # The window: every cell a sample, a free ray or a "behind" vote can touch.
    xs, ys = p[:, 0], p[:, 1]
    far_hit = float(r[in_band].max()) if bool(in_band.any()) else 0.0
    m = max(BEHIND_MIN_CELLS * res, BEHIND_RANGE_FRACTION * far_hit)
    ix0 = math.floor((min(cx, float(xs.min())) - m) / res)
    iy0 = math.floor((min(cy, float(ys.min())) - m) / res)
    ix1 = math.floor((max(cx, float(xs.max())) + m) / res)
    iy1 = math.floor((max(cy, float(ys.max())) + m) / res)
    nx, ny = ix1 - ix0 + 1, iy1 - iy0 + 1

    gx = (torch.arange(ix0, ix1 + 1, device=dev, dtype=torch.float64) + 0.5) * res - cx
    gy = (torch.arange(iy0, iy1 + 1, device=dev, dtype=torch.float64) + 0.5) * res - cy
    gx, gy = gx.float()[None, :].expand(ny, nx), gy.float()[:, None].expand(ny, nx)
    r_cell = torch.hypot(gx, gy)
    b_cell = _bin_of(gx, gy, n_bins)
    free = (r_cell <= r_free[b_cell]) & (r_cell >= r_near[b_cell])
    behind = (r_cell > r_back[b_cell]) & (r_cell <= r_behind[b_cell])

    counts = torch.zeros(ny * nx, dtype=torch.int32, device=dev)
    hx = torch.floor(xs[in_band] / res).long() - ix0
    hy = torch.floor(ys[in_band] / res).long() - iy0
    counts.index_add_(0, hy * nx + hx, torch.ones_like(hx, dtype=torch.int32))
    counts = counts.view(ny, nx)
    hit = counts >= MIN_HIT_SAMPLES
    band_grid = torch.zeros_like(used)
    band_grid[used] = in_band
    hit |= _bridges(grid_map, band_grid, (cx, cy), bin_rad, res, hit, ix0, iy0)
    empty = (counts == 0) & ~hit
    return Evidence(ix0, iy0, hit, free & empty, behind & empty)


def _bridges(grid_map: torch.Tensor, in_band: torch.Tensor, camera_xy: tuple[float, float], bin_rad: float,
             res: float, hit: torch.Tensor, ix0: int, iy0: int) -> torch.Tensor:
    """Cells between neighbouring samples of a row where one surface runs on between two rays.

    Rays are a stride apart, so a far wall's columns fall a few cells apart. Two samples side by
    side in the stride grid are joined when both lie in the band, in hit cells (one stray sample
    starts no wall), and within twice the rays' spacing at their range (at most BRIDGE_MAX_M) of
    each other: a larger step between them is an edge, not a surface.
    """
    out = torch.zeros_like(hit)
    a, b = grid_map[:, :-1, :2], grid_map[:, 1:, :2]
    pair = in_band[:, :-1] & in_band[:, 1:]
    if not bool(pair.any()):
        return out
    a, b = a[pair], b[pair]
    cam = torch.tensor(camera_xy, dtype=a.dtype, device=a.device)
    rng = 0.5 * ((a - cam).norm(dim=1) + (b - cam).norm(dim=1))
    reach = (2.0 * rng * bin_rad).clamp(min=2.0 * res, max=BRIDGE_MAX_M)
    ia, ib = torch.floor(a / res).long(), torch.floor(b / res).long()
    link = ((b - a).norm(dim=1) <= reach) & hit[ia[:, 1] - iy0, ia[:, 0] - ix0] & hit[ib[:, 1] - iy0, ib[:, 0] - ix0]
    if not bool(link.any()):
        return out
    a, b = a[link], b[link]
    t = torch.linspace(0.0, 1.0, math.ceil(2.0 * BRIDGE_MAX_M / res) + 1, device=a.device)[None, :, None]
    cells = torch.floor((a[:, None, :] + t * (b - a)[:, None, :]) / res).long().view(-1, 2)
    out[cells[:, 1] - iy0, cells[:, 0] - ix0] = True
    return out


def _bin_of(dx: torch.Tensor, dy: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Polar bin of each horizontal direction, 0 .. n_bins - 1 counter-clockwise from -pi."""
    a = (torch.atan2(dy, dx) + math.pi) * (n_bins / (2.0 * math.pi))
    return a.long().clamp_(0, n_bins - 1)
