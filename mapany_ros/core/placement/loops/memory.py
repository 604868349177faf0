"""What loop closure keeps of every placed keyframe: enough to show it to the model again.

Verifying a loop means running the backend on an old keyframe and a new one together, so each
keyframe keeps, per camera, its image (JPEG, at most ``image_width`` wide: ~30-90 kB instead of
~0.6-1 MB of raw pixels), the camera model of that image, the camera's place on the base, a global
descriptor for appearance search, and a small depth image (metres) to measure the verification
window's scale against. Positions come from the pose graph's latest report.

The window that places a keyframe only keeps references to its frame's image and to its placed
depth: resizing, the descriptor, the JPEG and the small depth are made when first needed - while
the backend is idle (:meth:`KeyframeMemory.settle`), by a loop search or a verification, or once
more than ``MAX_UNSETTLED_VIEWS`` views wait - from the same pixels, so they come out exactly as if
made at once.
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
from mapany_ros.core.placement.scale import OdometryCalibration

try:  # libjpeg-turbo when installed (it is a requirement of the node); Pillow otherwise
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - Pillow is the fallback
    _simplejpeg = None

JPEG_QUALITY = 90
#: Size of the depth kept per view, to measure scale against.
DEPTH_SIZE = (24, 32)
#: Views whose image waits to be resized, described and encoded (references to the frame's image and
#: placed depth each, 0.6 + 1 MB at 518x392, the depth on the model's device): beyond, the oldest are
#: settled at once (a backend that is never idle).
MAX_UNSETTLED_VIEWS = 24


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
    d = depth.detach().float()
    ok = d > 0  # NaN fails it, and the next
    ok &= d < float("inf")
    if valid is not None:
        ok &= valid
    # Depth and coverage pooled in one call (one plane each), written straight into their planes.
    planes = torch.empty(1, 2, *d.shape, dtype=d.dtype, device=d.device)
    torch.where(ok, d, torch.zeros((), dtype=d.dtype, device=d.device), out=planes[0, 0])
    planes[0, 1].copy_(ok)
    pooled = F.adaptive_avg_pool2d(planes, DEPTH_SIZE)[0]
    total, count = pooled[0], pooled[1]
    return torch.where(count > 0.25, total / count.clamp_min(1e-6), torch.nan).cpu().numpy()


class StoredView:
    """One camera frame of a stored keyframe.

    ``jpeg`` and ``descriptor`` may be made later from ``raw``, the frame's image as it came
    (``camera_model`` is already the stored image's), and the small ``depth`` from the placed
    view's (depth, valid): see the module docstring.
    """

    __slots__ = ("camera", "stamp_ns", "frame_id", "camera_model", "T_base_camera", "_depth", "_depth_src", "_jpeg",
                 "_descriptor", "_raw", "_kind")

    def __init__(self, camera: str, stamp_ns: int, frame_id: str, camera_model: CameraModel, jpeg: bytes | None,
                 T_base_camera: np.ndarray, descriptor: np.ndarray | None,
                 depth: np.ndarray | tuple[torch.Tensor, torch.Tensor | None], *,
                 raw: np.ndarray | None = None, kind: str = "gradients") -> None:
        if jpeg is None and raw is None:
            raise ValueError("a stored view needs its JPEG or the image to make it from")
        self.camera = camera
        self.stamp_ns = stamp_ns
        self.frame_id = frame_id
        self.camera_model = camera_model
        #: T_base_camera at the keyframe's reference stamp (the pose graph node's frame).
        self.T_base_camera = T_base_camera
        # (24, 32) metres, NaN where unknown; or the placed view's (depth, valid) to make it from
        self._depth, self._depth_src = (None, depth) if isinstance(depth, tuple) else (depth, None)
        self._jpeg = jpeg
        self._descriptor = descriptor
        self._raw = None if jpeg is not None else raw
        self._kind = kind

    @property
    def settled(self) -> bool:
        """JPEG, descriptor and small depth are made (the frame's image and depth are no longer held)."""
        return self._raw is None and self._depth_src is None

    @property
    def depth(self) -> np.ndarray:
        """(24, 32) depth in metres, NaN where unknown."""
        if self._depth is None:
            self._depth = small_depth(*self._depth_src)  # type: ignore[misc]
            self._depth_src = None
        return self._depth

    def settle(self) -> None:
        """Make the JPEG, the descriptor and the small depth from what is held, and let that go."""
        self.depth  # noqa: B018 - made now, while the backend is idle
        if self._raw is None:
            return
        image = _resize(self._raw, self.camera_model.width, self.camera_model.height)
        self._jpeg = encode_jpeg(image)
        if self._descriptor is None:
            self._descriptor = describe(image, self._kind)
        self._raw = None

    @property
    def jpeg(self) -> bytes:
        self.settle()
        assert self._jpeg is not None
        return self._jpeg

    @property
    def descriptor(self) -> np.ndarray:
        if self._descriptor is None:
            self.settle()
        assert self._descriptor is not None
        return self._descriptor

    def frame(self) -> Frame:
        """The frame again, without any prior: a loop is verified on the model's own evidence."""
        image = decode_jpeg(self.jpeg)
        return Frame(image, self.stamp_ns, self.camera, self.frame_id, self.camera_model,
                     T_base_camera=self.T_base_camera)

    @property
    def nbytes(self) -> int:
        """Bytes held: JPEG (or, until it is made, the frame's image), descriptor and depth."""
        image = len(self._jpeg) if self._jpeg is not None else int(self._raw.nbytes)  # type: ignore[union-attr]
        depth = self._depth.nbytes if self._depth is not None else sum(  # type: ignore[union-attr]
            t.nbytes for t in self._depth_src if t is not None)  # type: ignore[union-attr]
        return image + (self._descriptor.nbytes if self._descriptor is not None else 0) + depth


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
    #: The odometry's scale as a camera rig measured it (None: no rig measured it).
    odometry_calibration: OdometryCalibration | None = None


def stored_size(frame: Frame, width: int) -> tuple[int, int]:
    """(width, height) of the frame's image once at most ``width`` wide."""
    if frame.width <= width:
        return frame.width, frame.height
    return width, max(1, round(frame.height * width / frame.width))


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.BILINEAR))


def resized(frame: Frame, width: int) -> tuple[np.ndarray, CameraModel]:
    """The frame's image at most ``width`` wide and its camera model at that size."""
    w, h = stored_size(frame, width)
    return _resize(frame.image, w, h), frame.camera_model.scaled(w, h)


class KeyframeMemory:
    """Stored keyframes by id, with their descriptors stacked for search (one row per view)."""

    def __init__(self, image_width: int = 512, descriptor: str = "gradients") -> None:
        self.image_width = image_width
        self.descriptor = descriptor
        self.keyframes: dict[int, StoredKeyframe] = {}
        self._rows: list[StoredView] = []  # per row: its view
        self._row_kid = np.zeros(0, dtype=np.int64)
        self._matrix: np.ndarray | None = None  # (capacity, d) descriptors; row r valid once _filled[r]
        self._filled = np.zeros(0, dtype=bool)
        self._unsettled: list[StoredView] = []  # oldest first (some may have settled since)

    def __len__(self) -> int:
        return len(self.keyframes)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for kf in self.keyframes.values() for v in kf.views)

    def add(self, kid: int, stamp_ns: int, views: Iterable[tuple[Frame, np.ndarray, torch.Tensor, torch.Tensor]],
            descriptors: np.ndarray | None = None) -> StoredKeyframe:
        """Keep a keyframe: per camera (frame, T_base_camera, placed depth in metres, valid).

        ``descriptors`` (one row per view) are the backend's own, when it offers them. The image's
        JPEG and descriptor, and the small depth, are made later (see the module docstring)."""
        kf = self.keyframes.get(kid) or StoredKeyframe(kid, stamp_ns)
        for n, (frame, T_base_camera, depth, valid) in enumerate(views):
            w, h = stored_size(frame, self.image_width)
            d = None if descriptors is None else np.asarray(descriptors[n], np.float32)
            view = StoredView(frame.camera, frame.stamp_ns, frame.frame_id, frame.camera_model.scaled(w, h), None,
                              np.asarray(T_base_camera, dtype=np.float64), d, (depth, valid),
                              raw=frame.image, kind=self.descriptor)
            kf.views.append(view)
            self._append_row(kid, view)
            self._unsettled.append(view)
        self.keyframes[kid] = kf
        if len(self._unsettled) > MAX_UNSETTLED_VIEWS:
            self.settle(len(self._unsettled) - MAX_UNSETTLED_VIEWS)
        return kf

    def insert(self, kf: StoredKeyframe) -> None:
        """Keep an already stored keyframe (a loaded map's), with its descriptors."""
        self.keyframes[kf.kid] = kf
        for v in kf.views:
            self._append_row(kf.kid, v)

    @property
    def unsettled(self) -> int:
        """Views whose JPEG, descriptor or small depth are still to be made."""
        self._unsettled = [v for v in self._unsettled if not v.settled]
        return len(self._unsettled)

    def settle(self, limit: int | None = None) -> int:
        """Make the JPEG, descriptor and small depth of the oldest ``limit`` waiting views (all: None); how many."""
        todo = [v for v in self._unsettled if not v.settled]
        todo = todo if limit is None else todo[:limit]
        for v in todo:
            v.settle()
        self._unsettled = [v for v in self._unsettled if not v.settled]
        return len(todo)

    def _append_row(self, kid: int, view: StoredView) -> None:
        n = len(self._rows)
        if n == len(self._row_kid):  # grow by doubling: appending stays O(1) however many keyframes
            cap = max(64, 2 * n)
            self._row_kid = np.resize(self._row_kid, cap)
            self._filled = np.concatenate([self._filled[:n], np.zeros(cap - n, dtype=bool)])
            if self._matrix is not None:
                grown = np.zeros((cap, self._matrix.shape[1]), np.float32)
                grown[:n] = self._matrix[:n]
                self._matrix = grown
        self._rows.append(view)
        self._row_kid[n] = kid
        self._filled[n] = False

    def _fill(self, rows: np.ndarray) -> None:
        """Descriptors of the given rows into the search matrix (made now where still missing)."""
        for r in rows[~self._filled[rows]]:
            d = np.asarray(self._rows[r].descriptor, np.float32)
            if self._matrix is None:
                self._matrix = np.zeros((len(self._row_kid), d.size), np.float32)
            self._matrix[r] = d
            self._filled[r] = True

    @property
    def rows(self) -> int:
        """Descriptor rows stored so far (one per view, in the order stored)."""
        return len(self._rows)

    def similar(self, descriptors: np.ndarray, before_kid: int, top: int, rows: int | None = None
                ) -> list[tuple[int, float]]:
        """Stored keyframes older than ``before_kid`` most alike any of ``descriptors``: (kid, cosine),
        best first (ties: the older first), one entry per keyframe.

        Cosines are centred on the mean of the stored descriptors (:func:`.descriptors.similarities`).
        ``rows``: only the first that many rows count, for that mean too (a search made later sees the
        memory as it was when its window asked; None: all)."""
        n = len(self._rows) if rows is None else min(rows, len(self._rows))
        if top <= 0 or n == 0:
            return []
        kids = self._row_kid[:n]
        order = np.argsort(kids, kind="stable")
        keep = order[kids[order] < before_kid]
        if len(keep) == 0:
            return []
        self._fill(np.arange(n))  # the mean is over every stored row, not only the older ones
        assert self._matrix is not None
        sims = similarities(np.asarray(descriptors, np.float32), self._matrix[:n])[:, keep].max(axis=0)
        # Rows best first, ties in row order (that is, the older keyframe first); a keyframe's first
        # row is its best.
        best: list[tuple[int, float]] = []
        seen: set[int] = set()
        for r in np.lexsort((np.arange(len(keep)), -sims)):
            k = int(kids[keep[r]])
            if k not in seen:
                seen.add(k)
                best.append((k, float(sims[r])))
                if len(best) == top:
                    break
        return best
