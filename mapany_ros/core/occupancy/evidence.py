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
#: A cell holding this many of the keyframe's samples in the band is a full hit (FULL_HIT votes); a
#: cell a surface between two neighbouring samples crosses is a hit of one vote; a lone sample with
#: no neighbour on its surface (a flier) is none.
MIN_HIT_SAMPLES = 2
FULL_HIT = 2
#: Column neighbours at the same height (within TOP_HEIGHT_M), up to TOP_GAP_M apart, lie on one top.
TOP_HEIGHT_M = 0.03
TOP_GAP_M = 0.6
#: The floor is fitted to the samples within FLOOR_SEARCH_M of where it is expected, at least
#: FLOOR_MIN_SAMPLES of them spread over FLOOR_MIN_SPREAD_M (standard deviation) both ways, refitted on
#: those within FLOOR_INLIER_M; a fit tilted beyond FLOOR_MAX_TILT_DEG is no pose error but a ramp or
#: a platform, and the expected floor is kept.
FLOOR_SEARCH_M = 0.15
FLOOR_INLIER_M = 0.03
FLOOR_MIN_SAMPLES = 30
FLOOR_MIN_SPREAD_M = 0.2
FLOOR_MAX_TILT_DEG = 4.0
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
    hit: torch.Tensor  # (ny, nx) int8 votes: FULL_HIT where MIN_HIT_SAMPLES samples stand in the band, 1 where a
    #                    surface between two neighbouring samples crosses, 0 elsewhere
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
    dx, dy = p[:, 0] - cx, p[:, 1] - cy
    slope_x, slope_y, floor_c = floor_plane(dx, dy, p[:, 2], floor_z)
    h = p[:, 2] - (floor_c + slope_x * dx + slope_y * dy)
    hc = cz - floor_c
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
    band_grid = torch.zeros_like(used)
    band_grid[used] = in_band
    surface = _bridges(grid_map, band_grid, (cx, cy), bin_rad, res, ix0, iy0, counts.shape)
    surface |= _tops(grid_map, band_grid, res, ix0, iy0, counts.shape)
    hit = torch.where(counts >= MIN_HIT_SAMPLES, FULL_HIT, surface.to(torch.int8)).to(torch.int8)
    empty = (counts == 0) & (hit == 0)
    return Evidence(ix0, iy0, hit, free & empty, behind & empty)


def _bridges(grid_map: torch.Tensor, in_band: torch.Tensor, camera_xy: tuple[float, float], bin_rad: float,
             res: float, ix0: int, iy0: int, shape: torch.Size) -> torch.Tensor:
    """Cells between neighbouring samples of an image row that lie on one surface.

    Rays are a stride apart, so a far wall's columns fall a few cells apart. Two samples side by
    side in the stride grid are joined when both lie in the band and within twice the rays' spacing
    at their range (at least two cells, at most BRIDGE_MAX_M) of each other: a larger step between
    them is an edge, not a surface.
    """
    out = torch.zeros(shape, dtype=torch.bool, device=grid_map.device)
    a, b = grid_map[:, :-1], grid_map[:, 1:]
    both = in_band[:, :-1] & in_band[:, 1:]
    a, b = a[both][:, :2], b[both][:, :2]
    cam = torch.tensor(camera_xy, dtype=a.dtype, device=a.device)
    rng = 0.5 * ((a - cam).norm(dim=1) + (b - cam).norm(dim=1))
    reach = (2.0 * rng * bin_rad).clamp(min=2.0 * res, max=BRIDGE_MAX_M)
    link = (b - a).norm(dim=1) <= reach
    _draw(out, a[link], b[link], BRIDGE_MAX_M, res, ix0, iy0)
    return out


def _tops(grid_map: torch.Tensor, in_band: torch.Tensor, res: float, ix0: int, iy0: int, shape: torch.Size
          ) -> torch.Tensor:
    """Cells between neighbouring samples of an image column on one horizontal surface in the band.

    The top of a box lower than the camera is seen at a grazing angle: its rows land far apart in
    range. Two samples one above the other in the stride grid, both in the band, at the same height
    (within TOP_HEIGHT_M) and at most TOP_GAP_M apart, lie on that top; a column that leaves a top
    goes on down to the floor or a wall at another height.
    """
    out = torch.zeros(shape, dtype=torch.bool, device=grid_map.device)
    a, b = grid_map[:-1], grid_map[1:]
    both = in_band[:-1] & in_band[1:]
    a, b = a[both], b[both]
    link = (torch.abs(a[:, 2] - b[:, 2]) <= TOP_HEIGHT_M) & ((b[:, :2] - a[:, :2]).norm(dim=1) <= TOP_GAP_M)
    _draw(out, a[link, :2], b[link, :2], TOP_GAP_M, res, ix0, iy0)
    return out


def _draw(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, longest: float, res: float, ix0: int, iy0: int
          ) -> None:
    """Mark in ``out`` every cell the segments a[i] -> b[i] (map xy, at most ``longest`` long) cross."""
    if a.shape[0] == 0:
        return
    t = torch.linspace(0.0, 1.0, math.ceil(2.0 * longest / res) + 1, device=a.device)[None, :, None]
    cells = torch.floor((a[:, None, :] + t * (b - a)[:, None, :]) / res).long().view(-1, 2)
    out[cells[:, 1] - iy0, cells[:, 0] - ix0] = True


def floor_plane(dx: torch.Tensor, dy: torch.Tensor, z: torch.Tensor, floor_z: float) -> tuple[float, float, float]:
    """The floor as this keyframe saw it: z = c + sx dx + sy dy around the camera (dx, dy from it).

    A keyframe whose pose is tilted by a degree (or whose depth is a few percent off) sees the floor
    tilted (or shifted) by as much, and a tilt of 1 degree lifts the floor 7 cm at 4 m: heights are
    measured from the floor plane fitted to its own samples near the expected floor ``floor_z``
    (least squares, refitted on the samples within FLOOR_INLIER_M). Where the keyframe sees too
    little floor, or the fit leaves the bounds a pose error can explain, the expected floor is kept.
    """
    near = torch.abs(z - floor_z) <= FLOOR_SEARCH_M
    if int(near.sum()) < FLOOR_MIN_SAMPLES:
        return 0.0, 0.0, floor_z
    # float64 on the host: the same samples always give the same plane (a keyframe is taken out exactly)
    A = torch.stack([dx[near], dy[near], z[near]], dim=1).double().cpu().numpy()
    keep = np.ones(len(A), bool)
    for _ in range(3):
        if keep.sum() < FLOOR_MIN_SAMPLES:
            return 0.0, 0.0, floor_z
        X = np.column_stack([A[keep, 0], A[keep, 1], np.ones(int(keep.sum()))])
        (sx, sy, c), *_ = np.linalg.lstsq(X, A[keep, 2], rcond=None)
        keep = np.abs(A[:, 2] - (c + sx * A[:, 0] + sy * A[:, 1])) <= FLOOR_INLIER_M
    spread = np.linalg.eigvalsh(np.cov(A[keep, :2].T)) if keep.sum() >= FLOOR_MIN_SAMPLES else np.zeros(2)
    tilt = math.degrees(math.atan(math.hypot(sx, sy)))
    if tilt > FLOOR_MAX_TILT_DEG or abs(c - floor_z) > FLOOR_SEARCH_M or spread.min() < FLOOR_MIN_SPREAD_M**2:
        return 0.0, 0.0, floor_z
    return float(sx), float(sy), float(c)


def _bin_of(dx: torch.Tensor, dy: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Polar bin of each horizontal direction, 0 .. n_bins - 1 counter-clockwise from -pi."""
    a = (torch.atan2(dy, dx) + math.pi) * (n_bins / (2.0 * math.pi))
    return a.long().clamp_(0, n_bins - 1)
