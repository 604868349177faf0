"""What loop closure keeps of every placed keyframe: enough to show it to the model again.

Verifying a loop means running the backend on an old keyframe and a new one together, so each
keyframe keeps, per camera, its image (JPEG, at most ``image_width`` wide: ~30 kB instead of
~1 MB of raw pixels), the camera model of that image, the camera's place on the base, a global
descriptor for appearance search, and a small depth image (metres) to measure the verification
window's scale against. Positions come from the pose graph's latest report.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mapany_ros.core.frames import CameraModel, Frame
from mapany_ros.core.placement.loops.descriptors import describe, similarities

try:  # libjpeg-turbo when installed (it is a requirement of the node); Pillow otherwise
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - Pillow is the fallback
    _simplejpeg = None

JPEG_QUALITY = 90
#: Size of the depth kept per view, to measure scale against.
DEPTH_SIZE = (24, 32)


def encode_jpeg(rgb: np.ndarray) -> bytes:
    rgb = np.ascontiguousarray(rgb)
    if _simplejpeg is not None:
        return _simplejpeg.encode_jpeg(rgb, quality=JPEG_QUALITY, colorspace="RGB")
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    if _simplejpeg is not None:
        return _simplejpeg.decode_jpeg(data, colorspace="RGB")
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def small_depth(depth: torch.Tensor, valid: torch.Tensor | None = None) -> np.ndarray:
    """(24, 32) float32 depth, the mean of each cell's valid pixels (NaN where none)."""
    d = depth.detach().float().clone()
    ok = torch.isfinite(d) & (d > 0)
    if valid is not None:
        ok &= valid
    d[~ok] = 0.0
    total = F.adaptive_avg_pool2d(d[None, None], DEPTH_SIZE)[0, 0]
    count = F.adaptive_avg_pool2d(ok.float()[None, None], DEPTH_SIZE)[0, 0]
    return torch.where(count > 0.25, total / count.clamp_min(1e-6), torch.nan).cpu().numpy()


@dataclass
class StoredView:
    """One camera frame of a stored keyframe."""

    camera: str
    stamp_ns: int
    frame_id: str
    camera_model: CameraModel
    jpeg: bytes
    #: T_base_camera at the keyframe's reference stamp (the pose graph node's frame).
    T_base_camera: np.ndarray
    descriptor: np.ndarray
    depth: np.ndarray  # (24, 32) metres, NaN where unknown

    def frame(self) -> Frame:
        """The frame again, without any prior: a loop is verified on the model's own evidence."""
        image = decode_jpeg(self.jpeg)
        return Frame(image, self.stamp_ns, self.camera, self.frame_id, self.camera_model,
                     T_base_camera=self.T_base_camera)

    @property
    def nbytes(self) -> int:
        return len(self.jpeg) + self.descriptor.nbytes + self.depth.nbytes


@dataclass
class StoredKeyframe:
    kid: int
    stamp_ns: int
    views: list[StoredView] = field(default_factory=list)

    @property
    def descriptors(self) -> np.ndarray:
        return np.stack([v.descriptor for v in self.views])


@dataclass
class SavedKeyframes:
    """Stored keyframes with their map poses (T_map_base), as a map folder holds them."""

    keyframes: list[StoredKeyframe]
    poses: dict[int, np.ndarray]
    map_frame: str = "map"


def resized(frame: Frame, width: int) -> tuple[np.ndarray, CameraModel]:
    """The frame's image at most ``width`` wide and its camera model at that size."""
    if frame.width <= width:
        return frame.image, frame.camera_model.scaled(frame.width, frame.height)
    height = max(1, round(frame.height * width / frame.width))
    image = np.asarray(Image.fromarray(np.ascontiguousarray(frame.image)).resize((width, height), Image.BILINEAR))
    return image, frame.camera_model.scaled(width, height)


class KeyframeMemory:
    """Stored keyframes by id, with their descriptors stacked for search."""

    def __init__(self, image_width: int = 512, descriptor: str = "gradients") -> None:
        self.image_width = image_width
        self.descriptor = descriptor
        self.keyframes: dict[int, StoredKeyframe] = {}
        self._desc: list[np.ndarray] = []  # per stored view
        self._desc_kid: list[int] = []
        self._stack: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keyframes)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for kf in self.keyframes.values() for v in kf.views)

    def add(self, kid: int, stamp_ns: int, views: Iterable[tuple[Frame, np.ndarray, torch.Tensor, torch.Tensor]],
            descriptors: np.ndarray | None = None) -> StoredKeyframe:
        """Keep a keyframe: per camera (frame, T_base_camera, placed depth in metres, valid).

        ``descriptors`` (one row per view) are the backend's own, when it offers them."""
        kf = self.keyframes.get(kid) or StoredKeyframe(kid, stamp_ns)
        for n, (frame, T_base_camera, depth, valid) in enumerate(views):
            image, model = resized(frame, self.image_width)
            d = descriptors[n] if descriptors is not None else describe(image, self.descriptor)
            kf.views.append(StoredView(frame.camera, frame.stamp_ns, frame.frame_id, model, encode_jpeg(image),
                                       np.asarray(T_base_camera, dtype=np.float64), np.asarray(d, np.float32),
                                       small_depth(depth, valid)))
            self._desc.append(np.asarray(d, np.float32))
            self._desc_kid.append(kid)
            self._stack = None
        self.keyframes[kid] = kf
        return kf

    def insert(self, kf: StoredKeyframe) -> None:
        """Keep an already stored keyframe (a loaded map's), with its descriptors."""
        self.keyframes[kf.kid] = kf
        for v in kf.views:
            self._desc.append(np.asarray(v.descriptor, np.float32))
            self._desc_kid.append(kf.kid)
        self._stack = None

    def similar(self, descriptors: np.ndarray, before_kid: int, top: int) -> list[tuple[int, float]]:
        """Stored keyframes older than ``before_kid`` most alike any of ``descriptors``: (kid, cosine),
        best first, one entry per keyframe."""
        n = sum(1 for k in self._desc_kid if k < before_kid)
        if n == 0:
            return []
        if self._stack is None:
            self._stack = np.stack(self._desc)
        order = np.argsort(self._desc_kid, kind="stable")
        kids = np.asarray(self._desc_kid)[order]
        keep = order[kids < before_kid]
        sims = similarities(np.asarray(descriptors, np.float32), self._stack)[:, keep].max(axis=0)
        best: dict[int, float] = {}
        for i, s in zip(keep, sims, strict=True):
            k = self._desc_kid[i]
            if s > best.get(k, -2.0):
                best[k] = float(s)
        return sorted(best.items(), key=lambda kv: -kv[1])[:top]
