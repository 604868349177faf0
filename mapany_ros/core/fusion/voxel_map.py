"""VoxelMap: keyframes in, a bounded coloured voxel map out that follows every pose correction.

Keyframes are fused into submaps of ``submap_keyframes`` keyframes each. A submap keeps its voxels
(per voxel: summed normalised confidence, weighted offset from the voxel centre, weighted colour,
last update) in its own frame, and each of its keyframes its pose in that frame. Each keyframe's
depth pixels, less its depth edges (where flying pixels are: :mod:`mapany_ros.core.depth_edges`),
go out along the camera model's rays. A correction of any keyframe, however old, re-anchors its
submap (a robust rigid fit of its keyframes' corrected poses, :mod:`.anchors`): nothing is
integrated again, and thousands of corrections cost a few vectorised operations.

The published map is the union of the submaps, each at its anchor, with the voxels of different
submaps that fall into one map voxel merged (confidence-weighted): a revisited surface is one
surface. The union is kept up to date incrementally when it is read: a submap that moved is taken
out at its old anchor and put in at its new one (or, when much moved, the union is rebuilt), and
the submap still being filled is added on the fly. Over ``max_voxels`` (all submaps together), far
(or stale) voxels are dropped, and submaps left empty with them.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mapany_ros.core.camera_rays import plane_rays
from mapany_ros.core.depth_edges import depth_edges
from mapany_ros.core.frames import CameraModel
from mapany_ros.core.fusion.anchors import KeyframeTable, probe_points
from mapany_ros.core.fusion.config import MAX_PIXEL_WEIGHT, FusionConfig
from mapany_ros.core.fusion.grid import (
    COORD_OFFSET,
    Contribution,
    VoxelGrid,
    reduce_samples,
    unpack,
    voxel_means,
)
from mapany_ros.core.fusion.ply import read_ply, write_ply
from mapany_ros.core.geometry import invert, transform_points

#: An eviction shrinks the map to this fraction of max_voxels, so it runs once in many keyframes, not each.
_EVICT_TO = 0.9
#: When the submaps that moved hold more than this fraction of the union's voxels, it is rebuilt whole.
_REBUILD_FRACTION = 0.25
#: The union drops its emptied voxels when they are more than this fraction of it.
_EMPTIED_FRACTION = 0.25

ImageLike = torch.Tensor | np.ndarray
_EYE = np.eye(4)


@dataclass
class _Submap:
    """Voxels in the submap's own frame and where that frame is in the map."""

    index: int
    grid: VoxelGrid
    anchor: np.ndarray  # T_map_submap now; the identity until a correction moves the submap
    merged: np.ndarray | None = None  # the anchor it is published at: in the union once closed (None: not yet)
    corners: np.ndarray | None = None  # (8, 3) bounding box in the submap frame, once closed
    keyframes: int = 0
    open: bool = True
    shown: tuple[tuple[int, int], Contribution] | None = None  # the open submap as last published


class VoxelMap:
    """Confidence-weighted point voxel map of keyframes in submaps that follow pose corrections, with a
    voxel budget.

    ``integrate`` and ``update_pose`` are meant for one worker thread, ``points`` and ``save_ply``
    for another: every public method holds the map's lock.
    """

    def __init__(self, config: FusionConfig | None = None, device: torch.device | str = "cpu") -> None:
        self.config = config if config is not None else FusionConfig()
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._clear()

    def _clear(self) -> None:
        self._submaps: dict[int, _Submap] = {}  # in order of creation
        self._open: _Submap | None = None
        self._next_index = 0
        self._keyframes = KeyframeTable()
        self._dirty: set[int] = set()  # submaps whose keyframes moved since their anchor was fitted
        self._union = VoxelGrid(self.device, self.config.max_voxels)
        self._newest: Hashable | None = None  # the newest keyframe: the centre of radius eviction
        self._integrated = 0
        self._reposed = 0
        self._evicted = 0

    # ----------------------------------------------------------------- diagnostics

    @property
    def num_voxels(self) -> int:
        """Voxels stored in all submaps (the budget counts these; a revisited surface is stored per visit)."""
        with self._lock:
            return sum(s.grid.size for s in self._submaps.values())

    @property
    def memory_bytes(self) -> int:
        """Bytes of the tensors and arrays the map owns: submaps, their union and the keyframe table."""
        with self._lock:
            shown = self._open.shown[1].nbytes if self._open is not None and self._open.shown is not None else 0
            return (sum(s.grid.nbytes for s in self._submaps.values()) + self._union.nbytes
                    + self._keyframes.nbytes + shown)

    @property
    def keyframes_integrated(self) -> int:
        return self._integrated

    @property
    def keyframes_reposed(self) -> int:
        """update_pose calls that moved a keyframe (see update_pose)."""
        return self._reposed

    @property
    def voxels_evicted(self) -> int:
        return self._evicted

    @property
    def num_submaps(self) -> int:
        return len(self._submaps)

    @property
    def num_keyframes(self) -> int:
        """Keyframes update_pose can move: all of them, except those whose submap was evicted entirely."""
        return len(self._keyframes)

    # ----------------------------------------------------------------- keyframes

    def integrate(
        self,
        key: Hashable,
        depth: ImageLike,
        K: np.ndarray | CameraModel,
        T_map_camera: np.ndarray,
        colors: ImageLike,
        confidence: ImageLike | None = None,
        valid: ImageLike | None = None,
    ) -> None:
        """Fuse one keyframe: z-depth (h, w) metres (NaN = none), RGB uint8 (h, w, 3), pose camera-to-map.

        ``K`` is the depth grid's pinhole matrix, or its :class:`CameraModel` (w x h) when the grid is a
        distorted camera's: pixels are then back-projected along the model's true rays.
        ``confidence`` (h, w) is divided by the keyframe's median valid confidence, since backends
        use different scales; None weighs every pixel 1. ``valid`` (h, w) bool drops pixels.
        ``key`` (e.g. (camera, stamp_ns)) names the keyframe for update_pose.
        """
        camera = _check_camera(K)
        T = self._check_pose(T_map_camera)
        with self._lock:
            if key in self._keyframes.rows:
                raise ValueError(f"keyframe {key!r} is already in the map; move it with update_pose")
            points_cam, weights, rgb = self._samples(depth, camera, colors, confidence, valid)
            self._refit()
            sub = self._open
            if sub is None or sub.keyframes >= self.config.submap_keyframes:
                sub = self._open_submap()
            T_submap_camera = invert(sub.anchor) @ T
            self._integrated += 1
            sub.grid.add(self._reduce(points_cam, weights, rgb, T_submap_camera), self._integrated)
            sub.keyframes += 1
            median = float(points_cam[:, 2].median()) if len(points_cam) else 1.0
            self._keyframes.add(key, sub.index, T_submap_camera, T, probe_points(median))
            self._newest = key
            self._enforce_budget()

    def update_pose(self, key: Hashable, T_map_camera: np.ndarray) -> bool:
        """Record a keyframe's corrected pose; its submap follows. True when the keyframe moved.

        Any keyframe whose submap still has voxels can be corrected, however old. The submap is
        re-anchored (lazily: when the map is next read or integrated into) to a robust rigid fit of
        its keyframes' latest poses; nothing is integrated again. True when the keyframe moved by at
        least ``repose_translation_m`` or ``repose_rotation_deg`` from the pose last counted as a
        move (small corrections add up until they count); False for an unknown keyframe. Every
        change, however small, is recorded. For many keyframes at once, :meth:`update_poses`.
        """
        T = self._check_pose(T_map_camera)
        with self._lock:
            row = self._keyframes.rows.get(key)
            if row is None:
                return False
            kf = self._keyframes
            ref = kf.T_ref[row]
            shift2 = float(np.sum((T[:3, 3] - ref[:3, 3]) ** 2))
            cos = (float(np.sum(ref[:3, :3] * T[:3, :3])) - 1.0) / 2.0
            kf.T_now[row] = T
            self._dirty.add(int(kf.submap[row]))
            moved = shift2 >= self.config.repose_translation_m**2 or cos <= self._repose_cos
            if moved:
                kf.T_ref[row] = T
                self._reposed += 1
            return moved

    def update_poses(self, poses: Mapping[Hashable, np.ndarray]) -> int:
        """:meth:`update_pose` for many keyframes at once (a loop closure): a few vectorised operations
        however many keyframes, the submaps re-anchored before it returns. Returns how many keyframes
        moved (by the repose thresholds); unknown keys are skipped. Every pose is checked before any is
        recorded: one bad pose is a ValueError and changes nothing.
        """
        if not poses:
            return 0
        keys = list(poses)
        T = np.asarray([np.asarray(poses[k], dtype=np.float64) for k in keys]) if keys else np.zeros((0, 4, 4))
        self._check_poses(T)
        with self._lock:
            kf = self._keyframes
            rows = np.fromiter((kf.rows.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))
            known = rows >= 0
            rows, T = rows[known], T[known]
            if rows.size == 0:
                return 0
            ref = kf.T_ref[rows]
            shift2 = np.sum((T[:, :3, 3] - ref[:, :3, 3]) ** 2, axis=1)
            cos = (np.einsum("nij,nij->n", ref[:, :3, :3], T[:, :3, :3]) - 1.0) / 2.0
            moved = (shift2 >= self.config.repose_translation_m**2) | (cos <= self._repose_cos)
            kf.T_now[rows] = T
            kf.T_ref[rows[moved]] = T[moved]
            self._dirty.update(np.unique(kf.submap[rows]).tolist())
            self._reposed += int(moved.sum())
            self._refit()
            return int(moved.sum())

    def reset(self) -> None:
        """Forget every voxel, keyframe and counter."""
        with self._lock:
            self._clear()

    # ----------------------------------------------------------------- output

    def points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The union's voxels with at least min_weight, as host arrays: mean position, mean colour, evidence.

        xyz float32 (N, 3) in the map frame, RGB uint8 (N, 3), and confidence float32 (N,): the
        summed normalised confidence of the voxel's samples, over all submaps.
        """
        with self._lock:
            self._sync_union()
            g, n = self._union, self._union.size
            keys, sums = g.keys[:n], g.sums[:n]
            sub = self._open
            if sub is not None and sub.grid.size:
                extra = self._shown(sub)
                slots = g.find(extra.keys)
                found = slots >= 0
                sums = sums.clone().index_add_(0, slots[found], extra.sums[found])
                keys = torch.cat([keys, extra.keys[~found]])
                sums = torch.cat([sums, extra.sums[~found]])
            w = sums[:, 0]
            keep = (w >= self.config.min_weight) & (w > 0)
            xyz, w, rgb = voxel_means(keys[keep], sums[keep], self.config.voxel_size_m)
            rgb = rgb.round_().clamp_(0, 255).to(torch.uint8)
            return xyz.cpu().numpy(), rgb.cpu().numpy(), w.cpu().numpy()

    def save_ply(self, path: str | Path) -> int:
        """Write points() as a binary PLY (x y z red green blue confidence); returns the point count."""
        xyz, rgb, confidence = self.points()
        write_ply(path, xyz, rgb, confidence)
        return len(xyz)

    def load_ply(self, path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Replace the map by a PLY's points, each one sample weighted by its confidence; returns them.

        A map saved with save_ply gives the same points() again. Loaded voxels are a submap of no
        keyframe, so update_pose never moves them.
        """
        xyz, rgb, confidence = read_ply(path)
        good = np.all(np.isfinite(xyz), axis=1) & np.isfinite(confidence) & (confidence > 0)
        reach = (COORD_OFFSET - 1) * self.config.voxel_size_m
        if good.any() and np.abs(xyz[good]).max() >= reach:
            raise ValueError(f"{path}: points lie farther than {reach:.0f} m from the origin, beyond the voxel keys")
        dev = self.device
        with self._lock:
            self._clear()
            contribution = reduce_samples(
                torch.as_tensor(xyz[good], device=dev),
                torch.as_tensor(confidence[good], device=dev),
                torch.as_tensor(rgb[good], device=dev),
                self.config.voxel_size_m,
            )
            sub = self._open_submap()
            sub.grid.add(contribution, 0)
            self._close(sub)
            self._enforce_budget()
        return xyz, rgb, confidence

    # ----------------------------------------------------------------- submaps

    @property
    def _repose_cos(self) -> float:
        return math.cos(math.radians(self.config.repose_rotation_deg))

    def _open_submap(self) -> _Submap:
        """Close the open submap and start a new one in the map frame as it is now."""
        if self._open is not None:
            self._close(self._open)
        sub = _Submap(self._next_index, VoxelGrid(self.device, self.config.max_voxels), _EYE.copy())
        self._next_index += 1
        self._submaps[sub.index] = sub
        self._open = sub
        return sub

    def _close(self, sub: _Submap) -> None:
        """No more keyframes go into ``sub``: shrink it and note its extent (it joins the union when read)."""
        sub.grid.compact()
        sub.open = False
        sub.merged = sub.shown = None
        if sub is self._open:
            self._open = None
        sub.corners = self._extent(sub)

    def _shown(self, sub: _Submap) -> Contribution:
        """The open submap's voxels binned where it is shown (kept until it changes or moves)."""
        if sub.merged is None or self._moved(sub):  # shown where it is, from a repose threshold on
            sub.merged = sub.anchor.copy()
            sub.shown = None
        version = (self._integrated, self._evicted)
        if sub.shown is None or sub.shown[0] != version:
            sub.shown = (version, self._contribution(sub, sub.merged))
        return sub.shown[1]

    def _extent(self, sub: _Submap) -> np.ndarray:
        """(8, 3) corners of the submap's bounding box in its own frame."""
        n = sub.grid.size
        if n == 0:
            return np.zeros((8, 3))
        idx = unpack(sub.grid.keys[:n])
        lo = (idx.min(0).values.double().cpu().numpy()) * self.config.voxel_size_m
        hi = (idx.max(0).values.double().cpu().numpy() + 1) * self.config.voxel_size_m
        return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])

    def _refit(self) -> None:
        """Re-anchor the submaps whose keyframes moved, all in one batched fit."""
        dirty = np.array(sorted(i for i in self._dirty if i in self._submaps), dtype=np.int64)
        self._dirty.clear()
        if dirty.size == 0:
            return
        for i, anchor in zip(dirty.tolist(), self._keyframes.fit(dirty), strict=True):
            self._submaps[i].anchor = anchor

    def _moved(self, sub: _Submap) -> bool:
        """Did the submap move, since it was published, by a repose threshold anywhere in its extent?"""
        assert sub.merged is not None
        corners = sub.corners if sub.corners is not None else self._extent(sub)
        A, B = sub.anchor, sub.merged
        shift = (corners @ A[:3, :3].T + A[:3, 3]) - (corners @ B[:3, :3].T + B[:3, 3])
        cos = (float(np.sum(A[:3, :3] * B[:3, :3])) - 1.0) / 2.0
        return bool(np.linalg.norm(shift, axis=1).max() >= self.config.repose_translation_m
                    or cos <= self._repose_cos)

    def _contribution(self, sub: _Submap, anchor: np.ndarray, subset: torch.Tensor | None = None) -> Contribution:
        """The submap's voxels (or the ``subset`` mask of them) summed per map voxel at ``anchor``.

        At the identity (a submap no correction has moved) these are its own voxels, exactly; else
        every voxel's mean is moved and binned again. Deterministic, so what went into the union can
        be computed again to take it out.
        """
        g, n = sub.grid, sub.grid.size
        keys, sums = g.keys[:n], g.sums[:n]
        if subset is not None:
            keys, sums = keys[subset], sums[subset]
        if np.array_equal(anchor, _EYE):
            order = torch.argsort(keys)
            return Contribution(keys[order], sums[order], torch.ones_like(keys, dtype=torch.int32))
        return reduce_samples(*self._moved_means(keys, sums, anchor), self.config.voxel_size_m)

    def _moved_means(self, keys: torch.Tensor, sums: torch.Tensor, anchor: np.ndarray
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Voxel means (map frame at ``anchor``), weights and mean colours of a submap's voxels."""
        xyz, w, rgb = voxel_means(keys, sums, self.config.voxel_size_m)
        return transform_points(xyz, anchor), w, rgb

    def _sync_union(self) -> None:
        """Bring the union up to date with the closed submaps: add new ones, move the ones that moved."""
        self._refit()
        closed = [s for s in self._submaps.values() if not s.open]
        stale = [s for s in closed if s.merged is None or self._moved(s)]
        if not stale:
            return
        moving = sum(s.grid.size for s in stale if s.merged is not None)
        if moving > _REBUILD_FRACTION * sum(s.grid.size for s in closed):
            self._rebuild_union(closed)
            return
        for s in stale:
            if s.merged is not None:
                self._union.subtract(self._contribution(s, s.merged))
            self._union.add(self._contribution(s, s.anchor), 0)
            s.merged = s.anchor.copy()
        n = self._union.size
        emptied = int((self._union.counts[:n] <= 0).sum())
        if emptied > _EMPTIED_FRACTION * n:
            self._union.remove(self._union.counts[:n] > 0)

    def _rebuild_union(self, closed: list[_Submap]) -> None:
        """The union from scratch: every closed submap's voxels at its anchor, binned together once.

        Per map voxel the same sums and counts as adding the submaps one by one (up to the order of
        float additions), so submaps can later be taken out of it one by one.
        """
        parts = []
        for s in closed:
            s.merged = s.anchor.copy()
            if s.grid.size:
                g = s.grid
                parts.append(self._moved_means(g.keys[: g.size], g.sums[: g.size], s.anchor))
        if not parts:
            self._union = VoxelGrid(self.device, self.config.max_voxels)
            return
        xyz, w, rgb = (torch.cat(column) for column in zip(*parts, strict=True))
        self._union = VoxelGrid.from_contribution(reduce_samples(xyz, w, rgb, self.config.voxel_size_m),
                                                  self.config.max_voxels)

    # ----------------------------------------------------------------- internals

    def _check_pose(self, T: np.ndarray) -> np.ndarray:
        """One pose, checked as :meth:`_check_poses` does, at a few microseconds (update_pose may be
        called for thousands of keyframes in a row)."""
        T = np.asarray(T, dtype=np.float64)
        if T.shape != (4, 4) or not np.isfinite(T).all():
            raise ValueError(f"T_map_camera must be a finite 4x4 rigid transform, got {T.tolist()}")
        R = T[:3, :3]
        if (np.abs(R @ R.T - _EYE[:3, :3]).max() >= 1e-3 or abs(np.linalg.det(R) - 1.0) >= 1e-3
                or np.abs(T[3] - _EYE[3]).max() > 1e-8):
            raise ValueError(
                "T_map_camera must be a finite 4x4 rigid transform (orthonormal rotation, last row 0 0 0 1)"
            )
        reach = (COORD_OFFSET - 1) * self.config.voxel_size_m - self.config.max_depth_m
        if float(T[:3, 3] @ T[:3, 3]) > reach * reach:
            raise ValueError(f"T_map_camera lies {np.linalg.norm(T[:3, 3]):.0f} m from the map origin; "
                             f"voxel keys reach {reach:.0f} m at voxel_size_m={self.config.voxel_size_m}")
        return T

    def _check_poses(self, T: np.ndarray) -> None:
        """ValueError unless every (n, 4, 4) pose is a finite rigid transform within the voxel keys' reach."""
        if T.ndim != 3 or T.shape[1:] != (4, 4):
            raise ValueError(f"T_map_camera must be a finite 4x4 rigid transform, got shape {T.shape[1:]}")
        R = T[:, :3, :3]
        with np.errstate(invalid="ignore"):
            rigid = (np.isfinite(T).all(axis=(1, 2))
                     & (np.abs(R @ R.transpose(0, 2, 1) - np.eye(3)).max(axis=(1, 2)) < 1e-3)
                     & (np.abs(np.linalg.det(np.nan_to_num(R)) - 1.0) < 1e-3)
                     & (np.abs(T[:, 3] - [0.0, 0.0, 0.0, 1.0]).max(axis=1) <= 1e-8))
        if not rigid.all():
            raise ValueError(
                "T_map_camera must be a finite 4x4 rigid transform (orthonormal rotation, last row 0 0 0 1)"
            )
        reach = (COORD_OFFSET - 1) * self.config.voxel_size_m - self.config.max_depth_m
        far = np.linalg.norm(T[:, :3, 3], axis=1)
        if (far > reach).any():
            raise ValueError(f"T_map_camera lies {far.max():.0f} m from the map origin; "
                             f"voxel keys reach {reach:.0f} m at voxel_size_m={self.config.voxel_size_m}")

    def _samples(
        self,
        depth: ImageLike,
        camera: np.ndarray | CameraModel,
        colors: ImageLike,
        confidence: ImageLike | None,
        valid: ImageLike | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The keyframe's usable pixels on the stride grid: camera-frame points, weights, colours."""
        dev, cfg, s = self.device, self.config, self.config.pixel_stride
        d = torch.as_tensor(depth)
        if d.dim() != 2 or not d.is_floating_point():
            raise ValueError(f"depth must be a floating-point (h, w) image, got {d.dtype} of shape {tuple(d.shape)}")
        h, w = d.shape
        if isinstance(camera, CameraModel) and (camera.width, camera.height) != (w, h):
            raise ValueError(f"the camera model is {camera.width}x{camera.height}, the depth {w}x{h}")
        rgb = _strided("colors", colors, (h, w, 3), (torch.uint8,), s, dev)
        valid_full = None if valid is None else _strided("valid", valid, (h, w), (torch.bool,), 1, dev)
        if cfg.edge_threshold > 0:  # flying pixels are judged at full resolution, before the stride
            full = d.to(dev, non_blocking=True).float()
            d = full[::s, ::s]
            ok = ~depth_edges(full, cfg.edge_threshold, valid_full, stride=s)
        else:
            d = d[::s, ::s].to(dev, non_blocking=True).float()
            ok = torch.ones_like(d, dtype=torch.bool)
        ok &= (d > 0) & (d <= cfg.max_depth_m)  # False for NaN too
        if valid_full is not None:
            ok &= valid_full[::s, ::s]
        if confidence is not None:
            floats = (torch.float16, torch.float32, torch.float64)
            conf = _strided("confidence", confidence, (h, w), floats, s, dev).float()
            ok &= conf > 0
        v, u = torch.nonzero(ok, as_tuple=True)
        if confidence is None:
            weights = torch.ones(v.shape, device=dev)
        else:
            weights = conf[v, u]
            if weights.numel():
                weights = (weights / weights.median()).clamp_(max=MAX_PIXEL_WEIGHT)
            keep = torch.nonzero(weights >= cfg.min_confidence, as_tuple=True)[0]
            v, u, weights = v[keep], u[keep], weights[keep]
        if isinstance(camera, CameraModel):  # distorted: the model's rays, cached per camera and stride
            rays, ray_ok = plane_rays(camera, dev, s)
            keep = torch.nonzero(ray_ok[v, u], as_tuple=True)[0]
            v, u, weights = v[keep], u[keep], weights[keep]
            return rays[v, u] * d[v, u, None], weights, rgb[v, u]
        z = d[v, u]
        x, y = (u * s).float(), (v * s).float()
        Ki = np.linalg.inv(camera)  # rows 0 and 1 map (u, v, 1) to the ray's x and y; its z is 1
        rays_x = x * Ki[0, 0] + y * Ki[0, 1] + Ki[0, 2]
        rays_y = x * Ki[1, 0] + y * Ki[1, 1] + Ki[1, 2]
        return torch.stack([rays_x * z, rays_y * z, z], dim=1), weights, rgb[v, u]

    def _reduce(
        self, points_cam: torch.Tensor, weights: torch.Tensor, rgb: torch.Tensor, T: np.ndarray
    ) -> Contribution:
        """Camera-frame samples at pose T (in a submap's frame) summed per voxel."""
        R = torch.as_tensor(T[:3, :3], dtype=torch.float32, device=self.device)
        t = torch.as_tensor(T[:3, 3], dtype=torch.float32, device=self.device)
        points = (R @ points_cam.T).T + t  # faster than points_cam @ R.T for (n, 3) on CPU
        return reduce_samples(points, weights, rgb, self.config.voxel_size_m)

    def _enforce_budget(self) -> None:
        """Over max_voxels: drop far (or stale) voxels of any submap, down to _EVICT_TO of the budget."""
        cfg = self.config
        subs = [s for s in self._submaps.values() if s.grid.size]
        total = sum(s.grid.size for s in subs)
        if total <= cfg.max_voxels:
            return
        n_drop = total - int(cfg.max_voxels * _EVICT_TO)
        # Least recently updated first: of a surface stored by several submaps, the old visits go.
        score = torch.cat([-s.grid.stamps[: s.grid.size].double() for s in subs])
        if cfg.evict_radius_m > 0:  # before them, everything beyond the radius, the farthest first
            row = self._keyframes.rows.get(self._newest)
            camera = torch.as_tensor(self._keyframes.T_now[row][:3, 3] if row is not None else np.zeros(3),
                                     dtype=torch.float32, device=self.device)
            dist2 = torch.cat([(transform_points((unpack(s.grid.keys[: s.grid.size]).float() + 0.5)
                                                 * cfg.voxel_size_m, s.anchor) - camera).square_().sum(1)
                               for s in subs]).double()
            beyond = dist2 > cfg.evict_radius_m**2
            score = torch.where(beyond, dist2 + 2.0**40, score)
            n_drop = max(n_drop, int(beyond.sum()))
        drop = torch.zeros(total, dtype=torch.bool, device=self.device)
        drop[torch.topk(score, n_drop, sorted=False).indices] = True
        start = 0
        emptied = set()
        for s in subs:
            n = s.grid.size
            gone = drop[start : start + n]
            start += n
            if not bool(gone.any()):
                continue
            if s.merged is not None and not s.open:  # take the dropped voxels out of the union first
                self._union.subtract(self._contribution(s, s.merged, gone))
            s.grid.remove(~gone)
            if s.grid.size == 0 and not s.open:
                emptied.add(s.index)
        for i in emptied:
            del self._submaps[i]
        self._keyframes.drop_submaps(emptied)
        self._evicted += n_drop


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


def _check_camera(K: np.ndarray | CameraModel) -> np.ndarray | CameraModel:
    """A pinhole K as float64, or a distorted camera model (after checking its K); a distortion-free
    model becomes its K, so pinhole cameras take the plain path whichever way they come."""
    if isinstance(K, CameraModel):
        _check_K(K.K)
        return K if not K.is_pinhole else np.asarray(K.K, dtype=np.float64)
    return _check_K(K)


def _check_K(K: np.ndarray) -> np.ndarray:
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3) or not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f"K must be a finite 3x3 pinhole matrix with positive focal lengths, got {K.tolist()}")
    if not np.allclose(K[2], [0.0, 0.0, 1.0]):
        raise ValueError(f"K's last row must be [0, 0, 1], got {K[2].tolist()}")
    return K
