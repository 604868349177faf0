"""The one small interface every reconstruction backend implements."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np
import torch

from mapany_ros.core.frames import CameraModel, Frame
from mapany_ros.core.geometry import transform_points_fast


class BackendError(RuntimeError):
    """A backend cannot run: missing package, checkpoint, or input it needs (message says fix)."""


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cpu``, ``cuda``, ``cuda:N`` as given.

    A CUDA request without a usable GPU is a :class:`BackendError` naming the fix; any other
    value is a ValueError.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {device!r} requested but torch sees no CUDA GPU: set device: cpu (or auto)")
    return dev


class _Owed(NamedTuple):
    """Points and the 4x4 affine they still owe."""

    points: torch.Tensor
    T: np.ndarray


class _PointsField:
    """:attr:`ViewPrediction.points_world`: a tensor, or a tensor and the transform it still owes,
    applied on the first read (once) so that every reader gets the moved points."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj: ViewPrediction | None, objtype: type | None = None) -> torch.Tensor:
        if obj is None:
            raise AttributeError(self.slot)  # a required dataclass field: no default
        value = obj.__dict__[self.slot]
        if isinstance(value, _Owed):
            value = transform_points_fast(value.points, value.T)
            obj.__dict__[self.slot] = value
        return value

    def __set__(self, obj: ViewPrediction, value: torch.Tensor | _Owed) -> None:
        obj.__dict__[self.slot] = value


@dataclass
class ViewPrediction:
    """The backend's estimate for one input frame, on the backend's output grid.

    A backend predicts in a frame of its own choosing ("window frame": a real model anchors its
    first view, at its own scale); the core's placement stage then moves every view into the
    map. Tensors live on the backend's device; the ROS layer moves them to the host once.
    ``depth`` is z-depth in window units (metres when the window is metric; NaN where invalid);
    ``valid`` marks the pixels worth publishing; ``points_world`` are the back-projected pixels
    in the window frame; ``T_world_camera`` is the camera in the window frame. ``camera`` is the output
    grid's camera model with its distortion (K = ``K``); a backend may leave it None, and the pipeline
    then fills it from the frame (:meth:`WindowPrediction.with_cameras`): the output grid of a distorted
    camera is that camera's own grid, scaled. Placement may leave ``points_world`` owing a transform
    (:meth:`owing`): it is applied when they are first read, so every reader gets the moved points.
    """

    depth: torch.Tensor  # (h, w) float32, window units, NaN where invalid
    confidence: torch.Tensor  # (h, w) float32, higher is better
    valid: torch.Tensor  # (h, w) bool
    points_world: torch.Tensor = _PointsField()  # type: ignore[assignment]  # (h, w, 3) float32
    colors: torch.Tensor  # (h, w, 3) uint8 RGB
    T_world_camera: np.ndarray  # (4, 4) float64 camera-to-window, OpenCV optical
    K: np.ndarray  # (3, 3) float64 intrinsics of the output grid
    camera: CameraModel | None = None  # the output grid's camera model, distortion included

    def owing(self, T: np.ndarray, **changes) -> ViewPrediction:
        """The view (with ``changes``, as :func:`dataclasses.replace`) whose ``points_world`` are these
        under the 4x4 affine ``T``, moved only when first read: placement moves every view's
        full-resolution points into the map, and most are read, if at all, when published."""
        raw = self.__dict__["_points_world"]
        owed = _Owed(raw.points, np.asarray(T, dtype=np.float64) @ raw.T) if isinstance(raw, _Owed) \
            else _Owed(raw, np.asarray(T, dtype=np.float64))
        return dataclasses.replace(self, points_world=owed, **changes)

    def points_at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``points_world[rows, cols]``, moving only those pixels' points when a transform is owed."""
        raw = self.__dict__["_points_world"]
        if isinstance(raw, _Owed):
            return transform_points_fast(raw.points[rows, cols], raw.T)
        return raw[rows, cols]

    @property
    def points_device(self) -> torch.device:
        """The device of ``points_world``, without moving owed points."""
        raw = self.__dict__["_points_world"]
        return raw.points.device if isinstance(raw, _Owed) else raw.device

    @property
    def height(self) -> int:
        return int(self.depth.shape[0])

    @property
    def width(self) -> int:
        return int(self.depth.shape[1])

    @property
    def grid_camera(self) -> CameraModel:
        """The camera model of the output grid: ``camera`` when set, else the pinhole ``K``."""
        if self.camera is not None:
            return self.camera
        return CameraModel(self.width, self.height, np.asarray(self.K, dtype=np.float64))


@dataclass
class WindowPrediction:
    """Per-frame predictions, in the order of the input frames, plus window-level facts.

    ``metric`` says whether the window frame's unit is the metre (a metric model, or one that
    took metric priors); placement then fits SE(3), otherwise Sim(3). ``pose_priors_used`` says
    the window's poses lean towards the pose priors it was given (see the field). ``metric_scale`` is the
    model's own scale estimate where it reports one. ``alignment_residual_m`` is filled by the
    placement stage, not by backends.
    """

    views: list[ViewPrediction]
    metric_scale: float | None = None
    alignment_residual_m: float | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    metric: bool = True
    #: The backend was given the frames' pose priors (odometry) and its poses lean towards them,
    #: as MapAnything's do: placement then takes from the poses only what the geometry adds.
    pose_priors_used: bool = False

    def with_cameras(self, frames: Sequence[Frame]) -> WindowPrediction:
        """The same prediction with every view's ``camera`` set: where the backend left it None, the
        frame camera's distortion on the view's grid (its size and K), as the depth topics publish it."""
        views = []
        for view, frame in zip(self.views, frames, strict=True):
            if view.camera is None:
                cam = frame.camera_model
                grid = CameraModel(view.width, view.height, np.asarray(view.K, dtype=np.float64),
                                   cam.distortion_model, np.asarray(cam.D, dtype=np.float64).copy())
                view = dataclasses.replace(view, camera=grid)
            views.append(view)
        return dataclasses.replace(self, views=views)

    def to_host(self) -> WindowPrediction:
        """The same prediction with every tensor in host memory (pinned when it came from CUDA).

        All copies are queued non-blocking and waited for once, so publishing a window costs one
        synchronisation instead of one per tensor. CPU tensors are returned as they are.
        """
        views = []
        synchronize = False
        for view in self.views:
            if view.points_device.type != "cuda" and not any(
                    getattr(view, name).is_cuda for name in ("depth", "confidence", "valid", "colors")):
                views.append(view)  # owed points stay owed: moved when published
                continue
            fields: dict[str, torch.Tensor] = {}
            for name in ("depth", "confidence", "valid", "points_world", "colors"):
                tensor = getattr(view, name)
                if tensor.is_cuda:
                    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                    host.copy_(tensor, non_blocking=True)
                    synchronize = True
                else:
                    host = tensor
                fields[name] = host
            views.append(dataclasses.replace(view, **fields))
        if synchronize:
            torch.cuda.synchronize()
        return dataclasses.replace(self, views=views)


class Backend(Protocol):
    """A multi-view reconstruction model: a window of frames in, one prediction per frame out.

    The public plugin interface. Implementations are constructed with the keyword ``device``
    (a :class:`torch.device`) plus their own options, load once in ``__init__`` (failing with
    :class:`BackendError` naming the fix), are called from one worker thread at a time, and
    never see ROS types. ``infer`` may use the frames' priors (``T_world_camera`` in the odometry
    frame, ``camera_model``, ``depth``) or ignore them, and answers in a frame of its own.
    """

    name: str
    #: True when the backend cannot run without a pose prior on every frame.
    needs_pose_priors: bool

    def infer(self, frames: Sequence[Frame]) -> WindowPrediction: ...
