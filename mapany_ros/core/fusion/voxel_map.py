"""VoxelMap: keyframes in, a bounded, pose-correctable coloured voxel map out.

Each keyframe's depth pixels, less its depth edges (where flying pixels are:
:mod:`mapany_ros.core.depth_edges`), are back-projected and summed per voxel: weight (normalised
confidence), weighted offset from the voxel centre, weighted colour, sample count. Sums make
integration exact to undo, so a recent keyframe whose pose the pose graph corrects is taken out
and added again at its new pose from its own samples, which the map keeps for the last
keep_keyframes keyframes. Older keyframes are frozen. Over the voxel budget, far (or stale)
voxels are dropped, so memory stays bounded however long the robot drives.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mapany_ros.core.camera_rays import plane_rays
from mapany_ros.core.depth_edges import depth_edges
from mapany_ros.core.frames import CameraModel
from mapany_ros.core.fusion.config import MAX_PIXEL_WEIGHT, FusionConfig
from mapany_ros.core.fusion.grid import COORD_OFFSET, Contribution, VoxelGrid, nbytes, reduce_samples, unpack
from mapany_ros.core.fusion.ply import read_ply, write_ply
from mapany_ros.core.geometry import is_rigid, rotation_angle

#: An eviction shrinks the map to this fraction of max_voxels, so it runs once in many keyframes, not each.
_EVICT_TO = 0.9

ImageLike = torch.Tensor | np.ndarray


@dataclass
class _Keyframe:
    """A recent keyframe's samples in its camera frame, to integrate it again at a corrected pose."""

    points_cam: torch.Tensor  # (n, 3) float32
    weights: torch.Tensor  # (n,) float32, normalised confidence
    colors: torch.Tensor  # (n, 3) uint8
    T_map_camera: np.ndarray
    contribution: Contribution  # what it added to the map, less evicted voxels

    @property
    def nbytes(self) -> int:
        return nbytes(self.points_cam, self.weights, self.colors) + self.contribution.nbytes


class VoxelMap:
    """Confidence-weighted point voxel map of keyframes, with pose corrections and a voxel budget.

    ``integrate`` and ``update_pose`` are meant for one worker thread, ``points`` and ``save_ply``
    for another: every public method holds the map's lock.
    """

    def __init__(self, config: FusionConfig | None = None, device: torch.device | str = "cpu") -> None:
        self.config = config if config is not None else FusionConfig()
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._clear()

    def _clear(self) -> None:
        self._grid = VoxelGrid(self.device, self.config.max_voxels)
        self._recent: OrderedDict[Hashable, _Keyframe] = OrderedDict()
        self._camera_xyz = np.zeros(3)  # newest keyframe's camera: the centre of radius eviction
        self._integrated = 0
        self._reposed = 0
        self._evicted = 0

    # ----------------------------------------------------------------- diagnostics

    @property
    def num_voxels(self) -> int:
        """Voxels stored (the budget counts these), including any emptied by update_pose until evicted."""
        return self._grid.size

    @property
    def memory_bytes(self) -> int:
        """Bytes of the tensors the map owns: voxel arrays, index and the recent keyframes' samples."""
        with self._lock:
            return self._grid.nbytes + sum(kf.nbytes for kf in self._recent.values())

    @property
    def keyframes_integrated(self) -> int:
        return self._integrated

    @property
    def keyframes_reposed(self) -> int:
        """update_pose calls that moved a keyframe."""
        return self._reposed

    @property
    def voxels_evicted(self) -> int:
        return self._evicted

    @property
    def num_recent_keyframes(self) -> int:
        """Keyframes update_pose can still move (at most keep_keyframes)."""
        return len(self._recent)

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
            if key in self._recent:
                raise ValueError(f"keyframe {key!r} is already in the map; move it with update_pose")
            points_cam, weights, rgb = self._samples(depth, camera, colors, confidence, valid)
            contribution = self._reduce(points_cam, weights, rgb, T)
            self._integrated += 1
            self._camera_xyz = T[:3, 3].copy()
            self._grid.add(contribution, self._integrated)
            if self.config.keep_keyframes > 0:
                self._recent[key] = _Keyframe(points_cam, weights, rgb, T, contribution)
                if len(self._recent) > self.config.keep_keyframes:
                    self._recent.popitem(last=False)
            self._enforce_budget()

    def update_pose(self, key: Hashable, T_map_camera: np.ndarray) -> bool:
        """Move a recent keyframe's contribution to its corrected pose; True when it was moved.

        False when the keyframe is unknown or frozen (older than keep_keyframes), or moved less
        than both repose thresholds; its integrated pose then stays the reference, so small
        corrections add up until they count.
        """
        T = self._check_pose(T_map_camera)
        with self._lock:
            kf = self._recent.get(key)
            if kf is None or not self._moved(kf.T_map_camera, T):
                return False
            self._grid.subtract(kf.contribution)
            kf.contribution = self._reduce(kf.points_cam, kf.weights, kf.colors, T)
            kf.T_map_camera = T
            if next(reversed(self._recent)) == key:
                self._camera_xyz = T[:3, 3].copy()
            self._grid.add(kf.contribution, self._integrated)
            self._reposed += 1
            self._enforce_budget()
            return True

    def reset(self) -> None:
        """Forget every voxel, keyframe and counter."""
        with self._lock:
            self._clear()

    # ----------------------------------------------------------------- output

    def points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The voxels with at least min_weight, as host arrays: mean position, mean colour, evidence.

        xyz float32 (N, 3) in the map frame, RGB uint8 (N, 3), and confidence float32 (N,): the
        summed normalised confidence of the voxel's samples.
        """
        with self._lock:
            g, n = self._grid, self._grid.size
            w = g.sums[:n, 0]
            keep = (w >= self.config.min_weight) & (w > 0) & (g.counts[:n] > 0)
            sums, keys = g.sums[:n][keep], g.keys[:n][keep]
            w = sums[:, :1]
            centre = unpack(keys).double() + 0.5
            xyz = ((centre + sums[:, 1:4].double() / w) * self.config.voxel_size_m).float()
            rgb = (sums[:, 4:7] / w).round_().clamp_(0, 255).to(torch.uint8)
            return xyz.cpu().numpy(), rgb.cpu().numpy(), w[:, 0].cpu().numpy()

    def save_ply(self, path: str | Path) -> int:
        """Write points() as a binary PLY (x y z red green blue confidence); returns the point count."""
        xyz, rgb, confidence = self.points()
        write_ply(path, xyz, rgb, confidence)
        return len(xyz)

    def load_ply(self, path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Replace the map by a PLY's points, each one sample weighted by its confidence; returns them.

        A map saved with save_ply gives the same points() again. Loaded voxels belong to no
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
            self._grid.add(contribution, 0)
            self._enforce_budget()
        return xyz, rgb, confidence

    # ----------------------------------------------------------------- internals

    def _check_pose(self, T: np.ndarray) -> np.ndarray:
        T = np.asarray(T, dtype=np.float64)
        if not is_rigid(T):
            raise ValueError(
                "T_map_camera must be a finite 4x4 rigid transform (orthonormal rotation, last row 0 0 0 1)"
            )
        reach = (COORD_OFFSET - 1) * self.config.voxel_size_m - self.config.max_depth_m
        if np.linalg.norm(T[:3, 3]) > reach:
            raise ValueError(f"T_map_camera lies {np.linalg.norm(T[:3, 3]):.0f} m from the map origin; "
                             f"voxel keys reach {reach:.0f} m at voxel_size_m={self.config.voxel_size_m}")
        return T

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
        """Camera-frame samples at pose T summed per map voxel."""
        R = torch.as_tensor(T[:3, :3], dtype=torch.float32, device=self.device)
        t = torch.as_tensor(T[:3, 3], dtype=torch.float32, device=self.device)
        points_map = (R @ points_cam.T).T + t  # faster than points_cam @ R.T for (n, 3) on CPU
        return reduce_samples(points_map, weights, rgb, self.config.voxel_size_m)

    def _moved(self, T_old: np.ndarray, T_new: np.ndarray) -> bool:
        cfg = self.config
        shift = float(np.linalg.norm(T_new[:3, 3] - T_old[:3, 3]))
        turn = math.degrees(rotation_angle(T_old[:3, :3].T @ T_new[:3, :3]))
        return shift >= cfg.repose_translation_m or turn >= cfg.repose_rotation_deg

    def _enforce_budget(self) -> None:
        """Over max_voxels: drop emptied voxels, then far (or stale) ones, down to _EVICT_TO of the budget."""
        cfg, g = self.config, self._grid
        n = g.size
        if n <= cfg.max_voxels:
            return
        n_drop = n - int(cfg.max_voxels * _EVICT_TO)
        if cfg.evict_radius_m > 0:
            centre = torch.as_tensor(self._camera_xyz / cfg.voxel_size_m - 0.5, dtype=torch.float32, device=g.device)
            score = (unpack(g.keys[:n]).float() - centre).square_().sum(1)  # squared distance in voxels
            n_drop = max(n_drop, int((score > (cfg.evict_radius_m / cfg.voxel_size_m) ** 2).sum()))
        else:
            score = -g.stamps[:n].float()  # least recently updated first
        score = torch.where(g.counts[:n] > 0, score, torch.inf)
        keep = torch.ones(n, dtype=torch.bool, device=g.device)
        keep[torch.topk(score, n_drop, sorted=False).indices] = False
        removed = g.remove(keep)
        self._evicted += n_drop
        for kf in self._recent.values():
            kf.contribution = kf.contribution.without(removed)


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
