"""The occupancy grid against the synthetic scene's exact obstacles.

Ground truth is analytic, on the grid's own cells (the scene's floor is z = 0, its world frame
the map frame of exact odometry):

- a cell is **truly occupied** when its square meets the footprint of an obstacle (box, cylinder)
  reaching into the height band, or the room's wall line;
- a cell is **truly free** when its square lies inside the room and meets no such footprint;
- a cell is **seen occupied** when a keyframe's true depth puts a surface sample in the band
  there, within the grid's range, at a pixel the backend gave depth for (obstacle cells nobody
  saw, such as the inside of a tall box, or that the backend left blank, cannot be asked of any
  map);
- a cell is **seen floor** when a keyframe's true depth puts a floor sample there (same pixels).

Scores: occupied recall (seen occupied cells with a grid obstacle within one cell), occupied
precision (grid obstacles with a true one within one cell), free precision (grid free cells that
are truly free, no tolerance) and free coverage (truly free seen floor cells the grid calls free).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_dilation

from mapany_ros.core.occupancy import FREE, OCCUPIED, GridSnapshot
from mapany_ros.sim.scene import SyntheticScene

#: The grid's targets (issue "Occupancy grid for Nav2").
TARGETS = {"occupied_recall": 0.85, "occupied_precision": 0.90, "free_precision": 0.95}
#: Samples per cell edge for the footprint tests (edges included).
_SUB = 5


@dataclass(frozen=True)
class TrueView:
    """A keyframe's true camera pose and true z-depth on the backend's output grid (K), and the pixels the
    backend gave depth for (None: all), for the seen-cell sets."""

    T_world_camera: np.ndarray
    K: np.ndarray
    depth: np.ndarray
    valid: np.ndarray | None = None


@dataclass(frozen=True)
class Lattice:
    """A block of grid cells by absolute index: cell (r, c) is absolute (ix0 + c, iy0 + r)."""

    ix0: int
    iy0: int
    nx: int
    ny: int
    resolution: float

    def index(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, col, inside) of map points."""
        c = np.floor(x / self.resolution).astype(np.int64) - self.ix0
        r = np.floor(y / self.resolution).astype(np.int64) - self.iy0
        return r, c, (r >= 0) & (r < self.ny) & (c >= 0) & (c < self.nx)


def truth(scene: SyntheticScene, lattice: Lattice, min_height_m: float, max_height_m: float
          ) -> tuple[np.ndarray, np.ndarray]:
    """(truly occupied, truly free) boolean (ny, nx) over the lattice; see the module doc."""
    res = lattice.resolution
    t = np.linspace(0.0, 1.0, _SUB)
    xs = (lattice.ix0 + np.arange(lattice.nx)[:, None] + t[None, :]) * res  # (nx, SUB)
    ys = (lattice.iy0 + np.arange(lattice.ny)[:, None] + t[None, :]) * res  # (ny, SUB)
    X = np.broadcast_to(xs[None, :, None, :], (lattice.ny, lattice.nx, _SUB, _SUB))
    Y = np.broadcast_to(ys[:, None, :, None], (lattice.ny, lattice.nx, _SUB, _SUB))
    room = scene.room
    inside = (np.abs(X) < room.half_x) & (np.abs(Y) < room.half_y)
    in_room = inside.all(axis=(2, 3))
    wall = inside.any(axis=(2, 3)) & ~in_room  # the square crosses the wall line
    obstacle = np.zeros(X.shape, bool)
    for box in scene.boxes:
        bottom, top = box.center[2] - box.half_extents[2], box.center[2] + box.half_extents[2]
        if top < min_height_m or bottom > max_height_m:
            continue
        c, s = math.cos(box.yaw_rad), math.sin(box.yaw_rad)
        lx = (X - box.center[0]) * c + (Y - box.center[1]) * s
        ly = -(X - box.center[0]) * s + (Y - box.center[1]) * c
        obstacle |= (np.abs(lx) <= box.half_extents[0]) & (np.abs(ly) <= box.half_extents[1])
    for cyl in scene.cylinders:
        if cyl.height < min_height_m:
            continue
        obstacle |= np.hypot(X - cyl.center_xy[0], Y - cyl.center_xy[1]) <= cyl.radius
    hit = obstacle.any(axis=(2, 3))
    return hit | wall, in_room & ~hit


def seen_cells(views: list[TrueView], lattice: Lattice, min_height_m: float, max_height_m: float,
               max_range_m: float, stride: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(seen occupied, seen floor) boolean (ny, nx): cells where the views' true surface samples lie."""
    occupied = np.zeros((lattice.ny, lattice.nx), bool)
    floor = np.zeros_like(occupied)
    for view in views:
        d = view.depth.astype(np.float64)
        if view.valid is not None:
            d = np.where(view.valid, d, np.nan)
        d = d[::stride, ::stride]
        h, w = d.shape
        v, u = np.mgrid[0:h, 0:w] * stride
        rays = np.stack([u, v, np.ones_like(u)], -1).reshape(-1, 3) @ np.linalg.inv(view.K).T
        pc = rays * d.reshape(-1, 1)
        ok = np.isfinite(pc).all(1) & (np.linalg.norm(pc, axis=1) <= max_range_m)
        p = pc[ok] @ view.T_world_camera[:3, :3].T + view.T_world_camera[:3, 3]
        r, c, inside = lattice.index(p[:, 0], p[:, 1])
        band = inside & (p[:, 2] >= min_height_m) & (p[:, 2] <= max_height_m)
        low = inside & (p[:, 2] < min_height_m)
        occupied[r[band], c[band]] = True
        floor[r[low], c[low]] = True
    return occupied, floor


def score_grid(grid: GridSnapshot, scene: SyntheticScene, views: list[TrueView], min_height_m: float,
               max_height_m: float, max_range_m: float) -> dict[str, float]:
    """The scores of the module doc, plus the cell counts they come from."""
    res = grid.resolution
    gx0, gy0 = round(grid.origin_xy[0] / res), round(grid.origin_xy[1] / res)
    room = scene.room
    ix0 = min(gx0, math.floor(-room.half_x / res) - 2)
    iy0 = min(gy0, math.floor(-room.half_y / res) - 2)
    ix1 = max(gx0 + grid.width, math.floor(room.half_x / res) + 3)
    iy1 = max(gy0 + grid.height, math.floor(room.half_y / res) + 3)
    lattice = Lattice(ix0, iy0, ix1 - ix0, iy1 - iy0, res)
    data = np.full((lattice.ny, lattice.nx), -1, np.int8)
    data[gy0 - iy0:gy0 - iy0 + grid.height, gx0 - ix0:gx0 - ix0 + grid.width] = grid.data
    occupied, free = data == OCCUPIED, data == FREE
    true_occupied, true_free = truth(scene, lattice, min_height_m, max_height_m)
    seen_occupied, seen_floor = seen_cells(views, lattice, min_height_m, max_height_m, max_range_m)
    near = np.ones((3, 3), bool)
    seen_free = seen_floor & true_free

    def ratio(num: np.ndarray, den: np.ndarray) -> float:
        return float(num.sum() / den.sum()) if den.any() else math.nan

    return {
        "occupied_recall": ratio(seen_occupied & binary_dilation(occupied, near), seen_occupied),
        "occupied_precision": ratio(occupied & binary_dilation(true_occupied, near), occupied),
        "free_precision": ratio(free & true_free, free),
        "free_coverage": ratio(free & seen_free, seen_free),
        "cells_occupied": int(occupied.sum()),
        "cells_free": int(free.sum()),
        "cells_seen_occupied": int(seen_occupied.sum()),
        "cells_seen_free": int(seen_free.sum()),
    }


def passed(scores: dict[str, float]) -> bool:
    return all(scores[k] >= v for k, v in TARGETS.items())
