"""OccupancyGrid: keyframes in, a 2-D occupancy grid for Nav2 out, following pose corrections of any age.

Each keyframe votes once per cell it looked at (:mod:`.evidence`): a hit where its samples stand
in the obstacle band (half a hit where only the surface between two of its samples crosses), a miss
where its rays crossed the cell, a "behind" where the cell lies just behind the surface it saw on
that bearing. A cell is occupied when at least a third of its votes are hits (the counting model:
a surface a badly placed keyframe put a few centimetres behind the wall is outvoted by the
keyframes that saw the wall in front of it), free once several keyframes saw through it and
almost none hit it, unknown otherwise.

The grid keeps the integer vote counts, so taking a keyframe out is exact: the same samples at
the same pose give the same cells, which are subtracted. Each keyframe keeps its strided depth
(2 bytes a sample) and its pose, so a correction of any age moves it; corrections are only
recorded by ``update_pose`` (``update_poses`` for the thousands a loop closure corrects at once) and
applied when the grid is next read, so a keyframe corrected by many windows in a row (a sliding pose
graph, a loop closure) is recomputed once. Over
``keep_keyframes`` the oldest are frozen.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from mapany_ros.core.geometry import invert, is_rigid, rotation_angle
from mapany_ros.core.occupancy.config import OccupancyConfig
from mapany_ros.core.occupancy.evidence import FULL_HIT, Band, Evidence, keyframe_evidence

ImageLike = torch.Tensor | np.ndarray

#: A cell is occupied when at least this fraction of the votes of the keyframes that looked at it (hit
#: it, saw through it, or saw a surface just in front of it) are hits: the counting model of
#: occupancy, robust to a keyframe whose depth or pose is a few centimetres off.
OCCUPIED_FRACTION = 1.0 / 3.0
#: A cell is free once this many keyframes saw through it and fewer than FREE_MAX_FRACTION of its
#: looks found a surface: one keyframe's leak past an edge is no free space.
FREE_MIN_MISSES = 3
FREE_MAX_FRACTION = 0.1
#: Weight of a keyframe's miss and "behind" votes, as of its full hit (evidence.FULL_HIT): a cell
#: only a surface between two samples crossed is a hit of one vote.
FULL_VOTE = FULL_HIT
#: Values of nav_msgs/OccupancyGrid.
OCCUPIED, FREE, UNKNOWN = 100, 0, -1
#: Growing the grid, add this many cells on each side beyond what is needed, so it grows rarely.
_GROW_MARGIN = 64
#: The vote arrays cover the explored rectangle, 12 bytes a cell: at most this many cells (768 MB,
#: 400 m x 400 m at 5 cm); a keyframe that would grow them beyond is refused.
MAX_CELLS = 64_000_000


@dataclass(frozen=True)
class GridSnapshot:
    """The grid as Nav2 reads it: ``data[row, col]`` with row 0 at the lowest y, origin = lower-left corner.

    ``data`` int8 (height, width): 100 occupied, 0 free, -1 unknown; cell (row, col) covers
    x in origin_x + [col, col + 1) * resolution and y in origin_y + [row, row + 1) * resolution,
    in the map frame. ``version`` changes whenever the grid may have changed.
    """

    data: np.ndarray
    origin_xy: tuple[float, float]
    resolution: float
    version: int

    @property
    def width(self) -> int:
        return int(self.data.shape[1])

    @property
    def height(self) -> int:
        return int(self.data.shape[0])

    def cell_of(self, x: float, y: float) -> tuple[int, int]:
        """(row, col) of the cell holding map point (x, y); may lie outside the grid."""
        return (math.floor((y - self.origin_xy[1]) / self.resolution),
                math.floor((x - self.origin_xy[0]) / self.resolution))


@dataclass
class _Keyframe:
    """What a keyframe needs to be cast again at a corrected pose."""

    depth: torch.Tensor  # (h, w) float16 metres on the stride grid, NaN where unused
    K: np.ndarray  # intrinsics of the stride grid
    T_map_camera: np.ndarray  # the pose its votes are at
    T_camera_base: np.ndarray | None  # the floor is base_height_m below this frame

    @property
    def nbytes(self) -> int:
        return self.depth.numel() * self.depth.element_size()


class OccupancyGrid:
    """Hit / miss votes per cell of a growing 2-D grid in the map frame; see the module doc.

    ``integrate`` and ``update_pose`` are meant for one worker thread, ``snapshot`` for another:
    every public method holds the grid's lock.
    """

    def __init__(self, config: OccupancyConfig | None = None, device: torch.device | str = "cpu") -> None:
        self.config = config if config is not None else OccupancyConfig()
        self.device = torch.device(device)
        c = self.config
        self._band = Band(c.resolution_m, c.min_height_m, c.max_height_m)
        self._lock = threading.Lock()
        self._rays: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._clear()

    def _clear(self) -> None:
        self._hits = torch.zeros((0, 0), dtype=torch.int32, device=self.device)
        self._misses = torch.zeros((0, 0), dtype=torch.int32, device=self.device)
        self._behind = torch.zeros((0, 0), dtype=torch.int32, device=self.device)
        self._ix0 = self._iy0 = 0  # absolute index of cell [0, 0] of the vote arrays
        self._keyframes: OrderedDict[Hashable, _Keyframe] = OrderedDict()
        self._pending: dict[Hashable, np.ndarray] = {}
        self._version = 0
        self._integrated = 0
        self._reposed = 0

    # ----------------------------------------------------------------- diagnostics

    @property
    def version(self) -> int:
        """Changes whenever the grid may have changed (for publishing only on change)."""
        return self._version

    @property
    def keyframes_integrated(self) -> int:
        return self._integrated

    @property
    def keyframes_reposed(self) -> int:
        """Keyframes moved to a corrected pose (counted when the move is applied)."""
        return self._reposed

    @property
    def num_movable_keyframes(self) -> int:
        """Keyframes update_pose can still move (at most keep_keyframes)."""
        return len(self._keyframes)

    @property
    def memory_bytes(self) -> int:
        """Bytes of the vote arrays (12 a cell of the explored rectangle) and of the kept keyframes' samples."""
        with self._lock:
            votes = sum(a.numel() * a.element_size() for a in (self._hits, self._misses, self._behind))
            return votes + sum(kf.nbytes for kf in self._keyframes.values())

    @property
    def keyframe_bytes(self) -> int:
        """Bytes kept so that keyframes can be moved: 2 a sample on the stride grid."""
        with self._lock:
            return sum(kf.nbytes for kf in self._keyframes.values())

    # ----------------------------------------------------------------- keyframes

    def integrate(
        self,
        key: Hashable,
        depth: ImageLike,
        K: np.ndarray,
        T_map_camera: np.ndarray,
        confidence: ImageLike | None = None,
        valid: ImageLike | None = None,
        *,
        T_base_camera: np.ndarray | None = None,
    ) -> None:
        """Cast one keyframe: z-depth (h, w) metres (NaN = none), camera-to-map pose, optional confidence / valid.

        ``T_base_camera`` (base -> optical) puts the floor base_height_m below the keyframe's
        base; without it, below the camera. ``key`` (e.g. (camera, stamp_ns)) names it for
        update_pose.
        """
        K = _check_K(K)
        T = _check_pose(T_map_camera, "T_map_camera")
        T_camera_base = None if T_base_camera is None else invert(_check_pose(T_base_camera, "T_base_camera"))
        with self._lock:
            if key in self._keyframes:
                raise ValueError(f"keyframe {key!r} is already in the grid; move it with update_pose")
            self._check_reach(T[None, :2, 3])
            kf = _Keyframe(*self._samples(depth, K, confidence, valid), T, T_camera_base)
            self._add(self._evidence(kf, T), +1)
            self._integrated += 1
            self._version += 1
            if self.config.keep_keyframes > 0:
                self._keyframes[key] = kf
                while len(self._keyframes) > self.config.keep_keyframes:
                    old_key, old = self._keyframes.popitem(last=False)
                    self._move(old, self._pending.pop(old_key, None))  # frozen where it was last put

    def update_pose(self, key: Hashable, T_map_camera: np.ndarray) -> bool:
        """Record a keyframe's corrected pose; True when its votes will move (on the next read).

        False when the keyframe is unknown or frozen, or when the pose is within a quarter cell
        (and a rotation that moves nothing within max_range_m by more than half a cell) of the
        pose its votes are at: small corrections add up until they count.
        """
        T = _check_pose(T_map_camera, "T_map_camera")
        with self._lock:
            kf = self._keyframes.get(key)
            if kf is None:
                return False
            self._check_reach(T[None, :2, 3])
            if self._moved(kf.T_map_camera, T):
                self._pending[key] = T
                self._version += 1
                return True
            if self._pending.pop(key, None) is not None:
                self._version += 1
            return False

    def update_poses(self, poses: Mapping[Hashable, np.ndarray]) -> int:
        """:meth:`update_pose` for many keyframes at once (a loop closure's corrections, any age): one
        lock and vectorised checks however many. Returns how many keyframes' votes will move; unknown
        and frozen keys are skipped. Every pose is checked before any is recorded: one bad pose is a
        ValueError and changes nothing.
        """
        if not poses:
            return 0
        keys = list(poses)
        T = np.asarray([np.asarray(poses[k], dtype=np.float64) for k in keys])
        _check_poses(T, "T_map_camera")
        with self._lock:
            rows = [i for i, k in enumerate(keys) if k in self._keyframes]
            if not rows:
                return 0
            keys, T = [keys[i] for i in rows], T[rows]
            self._check_reach(T[:, :2, 3])
            old = np.asarray([self._keyframes[k].T_map_camera for k in keys])
            moved = self._moved_many(old, T)
            changed = False
            for key, T_new, move in zip(keys, T, moved, strict=True):
                if move:
                    self._pending[key] = T_new
                    changed = True
                elif self._pending.pop(key, None) is not None:
                    changed = True
            if changed:
                self._version += 1
            return int(moved.sum())

    def reset(self) -> None:
        """Forget every vote and keyframe."""
        with self._lock:
            version = self._version
            self._clear()
            self._version = version + 1

    # ----------------------------------------------------------------- output

    def snapshot(self) -> GridSnapshot:
        """The grid over the cells any keyframe saw, as host arrays (pending corrections applied first)."""
        with self._lock:
            self._apply_pending()
            seen = (self._hits > 0) | (self._misses > 0) | (self._behind > 0)
            res = self.config.resolution_m
            if not bool(seen.any()):
                return GridSnapshot(np.zeros((0, 0), np.int8), (0.0, 0.0), res, self._version)
            rows = torch.nonzero(seen.any(dim=1), as_tuple=True)[0]
            cols = torch.nonzero(seen.any(dim=0), as_tuple=True)[0]
            r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
            hits = self._hits[r0:r1, c0:c1]
            misses = self._misses[r0:r1, c0:c1]
            looks = (hits + misses + self._behind[r0:r1, c0:c1]).float()
            data = torch.full(hits.shape, UNKNOWN, dtype=torch.int8, device=self.device)
            data[(misses >= FREE_MIN_MISSES * FULL_VOTE) & (hits < FREE_MAX_FRACTION * looks)] = FREE
            data[(hits > 0) & (hits >= OCCUPIED_FRACTION * looks)] = OCCUPIED
            origin = ((self._ix0 + c0) * res, (self._iy0 + r0) * res)
            return GridSnapshot(data.cpu().numpy(), origin, res, self._version)

    # ----------------------------------------------------------------- internals

    def _samples(self, depth: ImageLike, K: np.ndarray, confidence: ImageLike | None,
                 valid: ImageLike | None) -> tuple[torch.Tensor, np.ndarray]:
        """The keyframe's usable depth on the stride grid (float16, NaN elsewhere) and that grid's K."""
        s, cfg = self.config.pixel_stride, self.config
        d = torch.as_tensor(depth)
        if d.dim() != 2 or not d.is_floating_point():
            raise ValueError(f"depth must be a floating-point (h, w) image, got {d.dtype} of shape {tuple(d.shape)}")
        h, w = d.shape
        d = d[::s, ::s].to(self.device, non_blocking=True).float()
        ok = d > 0  # False for NaN too
        if valid is not None:
            ok &= _strided("valid", valid, (h, w), (torch.bool,), s, self.device)
        if confidence is not None:
            conf = _strided("confidence", confidence, (h, w), (torch.float16, torch.float32, torch.float64), s,
                            self.device).float()
            ok &= conf > 0
            if bool(ok.any()):
                ok &= conf >= cfg.min_confidence * conf[ok].median()
        Ks = np.diag([1.0 / s, 1.0 / s, 1.0]) @ K  # pixel (u, v) of the stride grid is (s u, s v) of the image
        rays = self._rays_for(Ks, *d.shape)
        ok &= (d * rays.norm(dim=-1)) <= cfg.max_range_m
        return torch.where(ok, d, torch.nan).half(), Ks

    def _rays_for(self, K: np.ndarray, h: int, w: int) -> torch.Tensor:
        """(h, w, 3) camera rays with z = 1 of a stride grid, cached per camera."""
        key = (K.tobytes(), h, w)
        rays = self._rays.get(key)
        if rays is None:
            v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                  indexing="ij")
            pix = torch.stack([u, v, torch.ones_like(u)], dim=-1)
            rays = (pix @ torch.as_tensor(np.linalg.inv(K)).T).float().to(self.device)
            self._rays[key] = rays
            while len(self._rays) > 16:
                self._rays.popitem(last=False)
        return rays

    def _evidence(self, kf: _Keyframe, T: np.ndarray) -> Evidence | None:
        d = kf.depth.float()
        points = self._rays_for(kf.K, *d.shape) * d[..., None]  # NaN where unused
        T_base = T if kf.T_camera_base is None else T @ kf.T_camera_base
        floor_z = float(T_base[2, 3]) - self.config.base_height_m
        bin_rad = 1.0 / float(kf.K[0, 0])  # about the angle between two rays
        return keyframe_evidence(points, T, floor_z, self._band, bin_rad)

    def _add(self, ev: Evidence | None, sign: int) -> None:
        if ev is None:
            return
        ny, nx = ev.shape
        self._cover(ev.ix0, ev.iy0, nx, ny)
        r, c = ev.iy0 - self._iy0, ev.ix0 - self._ix0
        self._hits[r:r + ny, c:c + nx] += ev.hit.to(torch.int32) * sign
        self._misses[r:r + ny, c:c + nx] += ev.free.to(torch.int32) * (FULL_VOTE * sign)
        self._behind[r:r + ny, c:c + nx] += ev.behind.to(torch.int32) * (FULL_VOTE * sign)

    def _cover(self, ix0: int, iy0: int, nx: int, ny: int) -> None:
        """Grow the vote arrays (with a margin) until they hold the window's cells."""
        h, w = self._hits.shape
        if h and ix0 >= self._ix0 and iy0 >= self._iy0 and ix0 + nx <= self._ix0 + w and iy0 + ny <= self._iy0 + h:
            return
        if h:
            x0, y0 = min(ix0, self._ix0), min(iy0, self._iy0)
            x1, y1 = max(ix0 + nx, self._ix0 + w), max(iy0 + ny, self._iy0 + h)
        else:
            x0, y0, x1, y1 = ix0, iy0, ix0 + nx, iy0 + ny
        x0, y0, x1, y1 = x0 - _GROW_MARGIN, y0 - _GROW_MARGIN, x1 + _GROW_MARGIN, y1 + _GROW_MARGIN
        hits = torch.zeros((y1 - y0, x1 - x0), dtype=torch.int32, device=self.device)
        misses, behind = torch.zeros_like(hits), torch.zeros_like(hits)
        if h:
            r, c = self._iy0 - y0, self._ix0 - x0
            hits[r:r + h, c:c + w] = self._hits
            misses[r:r + h, c:c + w] = self._misses
            behind[r:r + h, c:c + w] = self._behind
        self._hits, self._misses, self._behind, self._ix0, self._iy0 = hits, misses, behind, x0, y0

    def _check_reach(self, xy: np.ndarray) -> None:
        """ValueError when cameras at map positions ``xy`` (n, 2) could grow the vote arrays beyond
        MAX_CELLS (a pose far off)."""
        res, reach = self.config.resolution_m, self.config.max_range_m + self.config.resolution_m
        lo, hi = xy.min(axis=0), xy.max(axis=0)
        x0, y0 = math.floor((lo[0] - reach) / res), math.floor((lo[1] - reach) / res)
        x1, y1 = math.floor((hi[0] + reach) / res) + 1, math.floor((hi[1] + reach) / res) + 1
        h, w = self._hits.shape
        if h:
            x0, y0 = min(x0, self._ix0), min(y0, self._iy0)
            x1, y1 = max(x1, self._ix0 + w), max(y1, self._iy0 + h)
        nx, ny = x1 - x0 + 2 * _GROW_MARGIN, y1 - y0 + 2 * _GROW_MARGIN
        if nx * ny > MAX_CELLS:
            far = xy[np.argmax(np.abs(xy).max(axis=1))]
            raise ValueError(f"a camera at ({far[0]:.0f}, {far[1]:.0f}) m would grow the occupancy grid to "
                             f"{nx * res:.0f} m x {ny * res:.0f} m, more than {MAX_CELLS} cells: pose refused "
                             "(far off, or raise grid.resolution_m)")

    def _move(self, kf: _Keyframe, T: np.ndarray | None) -> None:
        """Take a keyframe's votes out and cast it again at ``T`` (nothing when None)."""
        if T is None:
            return
        self._add(self._evidence(kf, kf.T_map_camera), -1)
        kf.T_map_camera = T
        self._add(self._evidence(kf, T), +1)
        self._reposed += 1

    def _apply_pending(self) -> None:
        for key, T in self._pending.items():
            self._move(self._keyframes[key], T)
        self._pending.clear()

    def _moved(self, T_old: np.ndarray, T_new: np.ndarray) -> bool:
        cfg = self.config
        shift = float(np.linalg.norm(T_new[:3, 3] - T_old[:3, 3]))
        turn = rotation_angle(T_old[:3, :3].T @ T_new[:3, :3])
        return shift >= cfg.resolution_m / 4 or turn * cfg.max_range_m >= cfg.resolution_m / 2

    def _moved_many(self, T_old: np.ndarray, T_new: np.ndarray) -> np.ndarray:
        """:meth:`_moved` of (n, 4, 4) pose pairs at once, as a bool (n,) array."""
        cfg = self.config
        shift = np.linalg.norm(T_new[:, :3, 3] - T_old[:, :3, 3], axis=1)
        cos = (np.einsum("nij,nij->n", T_old[:, :3, :3], T_new[:, :3, :3]) - 1.0) / 2.0
        turn = np.arccos(np.clip(cos, -1.0, 1.0))
        return (shift >= cfg.resolution_m / 4) | (turn * cfg.max_range_m >= cfg.resolution_m / 2)


def _strided(
    name: str, x: ImageLike, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...], stride: int, device: torch.device
) -> torch.Tensor:
    """Every ``stride``-th pixel of ``x`` on ``device``, once its shape and dtype are checked (ValueError naming it)."""
    t = torch.as_tensor(x)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (the depth grid), got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be of dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    return t[::stride, ::stride].to(device, non_blocking=True)


def _check_K(K: np.ndarray) -> np.ndarray:
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3) or not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f"K must be a finite 3x3 pinhole matrix with positive focal lengths, got {K.tolist()}")
    if not np.allclose(K[2], [0.0, 0.0, 1.0]):
        raise ValueError(f"K's last row must be [0, 0, 1], got {K[2].tolist()}")
    return K


def _check_poses(T: np.ndarray, name: str) -> None:
    """ValueError unless every (n, 4, 4) pose is a finite rigid transform (as :func:`_check_pose`)."""
    if T.ndim != 3 or T.shape[1:] != (4, 4):
        raise ValueError(f"{name} must be finite 4x4 rigid transforms, got shape {T.shape[1:]}")
    R = T[:, :3, :3]
    with np.errstate(invalid="ignore"):
        rigid = (np.isfinite(T).all(axis=(1, 2))
                 & (np.abs(R @ R.transpose(0, 2, 1) - np.eye(3)).max(axis=(1, 2)) <= 1e-3 + 1e-5)
                 & (np.abs(np.linalg.det(np.nan_to_num(R)) - 1.0) < 1e-3)
                 & (np.abs(T[:, 3] - (0.0, 0.0, 0.0, 1.0)).max(axis=1) <= 1e-5))
    if not rigid.all():
        raise ValueError(f"{name} must be a finite 4x4 rigid transform (orthonormal rotation, last row 0 0 0 1)")


def _check_pose(T: np.ndarray, name: str) -> np.ndarray:
    T = np.asarray(T, dtype=np.float64)
    if not is_rigid(T):
        raise ValueError(f"{name} must be a finite 4x4 rigid transform (orthonormal rotation, last row 0 0 0 1)")
    return T
