"""MapAnything backend: the adapter between our Frames and upstream ``MapAnything.infer``.

Verified upstream behaviour this module is built around (shared/notes/mapanything-contract.md):

Loading, offline and without unpickling
    ``MapAnything.from_pretrained`` always builds the DINOv2 encoder through ``torch.hub.load``,
    which asks GitHub for the default branch and downloads DINOv2 weights only to overwrite them.
    We instead read ``config.json`` ourselves, force every ``torch_hub_pretrained`` off and every
    ``pretrained_checkpoint_path`` (a ``torch.load`` of a pickle) to None, build the model while
    ``torch.hub.load`` is pinned to the cached ``facebookresearch/dinov2:main`` code (no network,
    no weights), then load ``model.safetensors`` with safetensors. Importing upstream sets
    ``torch.backends.cuda.matmul.allow_tf32 = True`` process-wide; we leave it (the model was
    validated that way) and do not restore it.

Distortion
    Upstream ``preprocess_inputs`` turns ``ray_directions`` into a *pinhole* K (least-squares fit)
    before crop and resize, so handing it the rays of a distorted camera silently drops the
    distortion. We always give ``preprocess_inputs`` the camera's K (that fixes the crop, and the
    K it returns is the exact input->model pixel map ``M = K_model @ inv(K)``), then, for a
    distorted camera, replace the returned ``intrinsics`` by ``ray_directions`` computed on the
    model grid: each model pixel is mapped back to its input pixel with ``inv(M)`` and unprojected
    through the ROS distortion model (Newton inversion, :mod:`mapany_ros.core.camera_rays`).
    ``infer`` accepts (B, h, w, 3) ray directions at the model resolution directly. Pixels whose
    ray cannot be recovered are invalid in the outputs. Outputs for a distorted camera are on a
    distorted grid: ``ViewPrediction.K`` is then the pinhole part only, and ``points_world`` are
    back-projected along the true distorted rays.

Frame of the outputs
    Upstream discards the caller's world frame: outputs are anchored on view 0 as predicted, in
    metres. The adapter returns them in that frame, as every backend returns its own; the core's
    placement stage (:mod:`mapany_ros.core.placement`) puts every window into the map, for every
    backend alike. Poses are handed to the model relative to the first posed view, in float64
    before the cast to float32, so large odometry coordinates lose no precision. A posed frame is
    moved to view 0 whenever the model gets any pose (upstream requires it); outputs come back in
    input order.

Outputs
    ``depth`` is z-depth in metres, NaN where
    upstream's mask is false (upstream ZEROES those pixels). With ``output_resolution="input"``
    depth, confidence and validity are resampled onto the input camera's pixel grid through ``M``
    (bilinear, a pixel is valid only if every contributing model pixel is), the centre-cropped
    border is NaN and ``K`` is the input camera's K. ``points_world`` are back-projected from that
    depth with the known camera rays, so depth, K, pose and points always agree.

Memory
    CUDA: bf16 autocast and memory-efficient heads; on ``torch.cuda.OutOfMemoryError`` the cache is
    emptied and the window is split in halves that each start with the window's reference view;
    each part is carried into the first part's frame through the pose and depth it predicts for
    that shared view, so the window still comes back whole, in one frame. Only a pair that still
    does not fit raises. The split is remembered: the most views that fitted below the smallest
    count that ran out becomes the limit of one model call, and later windows are split up front
    into as few balanced parts as keep under it (each with the reference view), so they do not run
    out of memory first. After ``oom_probe_windows`` windows that ran split without running out,
    the limit grows by one view (memory freed elsewhere is used again); a probe that runs out sets
    it back.
    :meth:`WindowPrediction.to_host` copies a prediction to pinned host memory with one
    synchronisation.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mapany_ros.core.alignment import Sim3, rigidify
from mapany_ros.core.backends.base import BackendError, ViewPrediction, WindowPrediction, resolve_device
from mapany_ros.core.camera_rays import grid_rays, pixel_rays
from mapany_ros.core.frames import CameraModel, Frame
from mapany_ros.core.geometry import invert
from mapany_ros.core.geometry import pixel_rays as pinhole_rays

log = logging.getLogger(__name__)

DINOV2_HUB_REPO = "facebookresearch/dinov2"
DINOV2_HUB_DIR = "facebookresearch_dinov2_main"
MODEL_FILES = ("config.json", "model.safetensors")
INSTALL_HINT = (
    "install MapAnything from its source repository facebookresearch/map-anything on GitHub "
    "(it is not on PyPI) together with uniception==0.1.7 and a torchvision matching your torch"
)


@dataclass
class MapAnythingConfig:
    """Parameters of :class:`MapAnythingBackend` (one ROS parameter each)."""

    model_id: str = "facebook/map-anything-apache"
    #: Directory with config.json + model.safetensors; wins over model_id when set.
    model_path: str = ""
    #: Root of the offline caches: <cache_dir>/huggingface (HF hub) and <cache_dir>/torch (TORCH_HOME).
    cache_dir: str = ""
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    use_calibration_prior: bool = True
    use_pose_prior: bool = True
    use_depth_prior: bool = True
    output_resolution: str = "input"  # "input" | "model"
    apply_mask: bool = True
    mask_edges: bool = True
    edge_normal_threshold: float = 5.0
    edge_depth_threshold: float = 0.03
    apply_confidence_mask: bool = False
    confidence_percentile: float = 10.0
    #: Pixels with confidence below this are invalid (upstream confidence is >= 1); 0 disables.
    min_confidence: float = 0.0
    memory_efficient: bool = True
    #: After a CUDA OOM: windows run split without running out before one more view per model call is tried.
    oom_probe_windows: int = 16
    depth_interpolation: str = "bilinear"  # "bilinear" | "nearest", for output_resolution="input"
    warmup: bool = True

    def validate(self) -> None:
        """Raise BackendError naming the parameter when a value is out of range."""
        if self.output_resolution not in ("input", "model"):
            raise BackendError(
                f"output_resolution must be 'input' or 'model', got {self.output_resolution!r}"
            )
        if self.depth_interpolation not in ("bilinear", "nearest"):
            raise BackendError(
                f"depth_interpolation must be 'bilinear' or 'nearest', got {self.depth_interpolation!r}"
            )
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise BackendError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.min_confidence < 0:
            raise BackendError(f"min_confidence must be >= 0, got {self.min_confidence}")
        if not self.model_path and not self.model_id:
            raise BackendError("set model_path or model_id")
        if self.oom_probe_windows < 1:
            raise BackendError(f"oom_probe_windows must be >= 1, got {self.oom_probe_windows}")


# --------------------------------------------------------------------------------------------
# Loading


def hf_cache_dir(cache_dir: str) -> Path:
    """Where the Hugging Face snapshot lives under ``cache_dir``."""
    return Path(cache_dir).expanduser() / "huggingface"


def torch_home(cache_dir: str) -> Path:
    """TORCH_HOME under ``cache_dir`` (the DINOv2 hub code is in its hub/ folder)."""
    return Path(cache_dir).expanduser() / "torch"


def _prefetch_hint(config: MapAnythingConfig) -> str:
    cache = config.cache_dir or "DIR"
    return (
        f"run `mapany-ros prefetch --cache-dir {cache} --model-id {config.model_id}` where there is internet"
    )


def sanitize_model_config(value: Any) -> Any:
    """Copy of an upstream model config that can neither download nor unpickle anything.

    Every ``pretrained_checkpoint_path`` (loaded with ``torch.load(weights_only=False)`` by
    uniception modules) becomes None, every ``torch_hub_pretrained`` False, reloads are off.
    """
    if isinstance(value, dict):
        out = {k: sanitize_model_config(v) for k, v in value.items()}
        if "pretrained_checkpoint_path" in out:
            out["pretrained_checkpoint_path"] = None
        if "load_specific_pretrained_submodules" in out:
            out["load_specific_pretrained_submodules"] = False
        if "torch_hub_force_reload" in out:
            out["torch_hub_force_reload"] = False
        if out.get("uses_torch_hub") or "torch_hub_pretrained" in out:
            out["torch_hub_pretrained"] = False
        return out
    if isinstance(value, list):
        return [sanitize_model_config(v) for v in value]
    return value


@contextlib.contextmanager
def _offline_torch_hub() -> Iterator[None]:
    """Pin ``torch.hub.load`` of DINOv2 to the cached ``:main`` code, without weights.

    Without a ref, torch.hub asks GitHub for the default branch (a blocking connection on an
    offline robot); with ``pretrained=True`` it downloads weights that our safetensors replace.
    """
    original = torch.hub.load

    def load(repo_or_dir: str, model: str, *args: Any, **kwargs: Any) -> Any:
        if repo_or_dir == DINOV2_HUB_REPO:
            repo_or_dir = f"{DINOV2_HUB_REPO}:main"
            kwargs["pretrained"] = False
            kwargs["force_reload"] = False
            kwargs["skip_validation"] = True
            kwargs.setdefault("trust_repo", True)
        return original(repo_or_dir, model, *args, **kwargs)

    torch.hub.load = load
    try:
        yield
    finally:
        torch.hub.load = original


def _import_upstream() -> tuple[type, Callable[..., list[dict[str, Any]]]]:
    try:
        from mapanything.models import MapAnything
        from mapanything.utils.image import preprocess_inputs
    except Exception as exc:  # ImportError, or a broken torchvision/cv2 raising RuntimeError
        raise BackendError(
            f"backend 'mapanything' cannot import MapAnything ({exc!r}); {INSTALL_HINT}"
        ) from exc
    return MapAnything, preprocess_inputs


def resolve_model_dir(config: MapAnythingConfig) -> Path:
    """Local directory holding config.json + model.safetensors (model_path, else the HF cache)."""
    if config.model_path:
        path = Path(config.model_path).expanduser()
        hint = f"point model_path at a directory with {' + '.join(MODEL_FILES)}, or {_prefetch_hint(config)}"
    else:
        try:
            from huggingface_hub import snapshot_download
        except ImportError as exc:
            raise BackendError(
                f"model_id needs huggingface_hub to find the cached snapshot ({exc}); "
                "pip install huggingface_hub, or set model_path"
            ) from exc
        try:
            path = Path(
                snapshot_download(
                    config.model_id,
                    cache_dir=str(hf_cache_dir(config.cache_dir)) if config.cache_dir else None,
                    local_files_only=True,
                    allow_patterns=list(MODEL_FILES),
                )
            )
        except Exception as exc:
            where = hf_cache_dir(config.cache_dir) if config.cache_dir else "the default Hugging Face cache"
            raise BackendError(
                f"model {config.model_id!r} is not in {where} ({type(exc).__name__}); "
                f"{_prefetch_hint(config)} and copy the cache directory, or set model_path"
            ) from exc
        hint = _prefetch_hint(config)
    if not path.is_dir():
        raise BackendError(f"model directory {path} does not exist; {hint}")
    missing = [name for name in MODEL_FILES if not (path / name).is_file()]
    if missing:
        present = sorted(p.name for p in path.iterdir())[:8]
        raise BackendError(
            f"model directory {path} lacks {', '.join(missing)} (has {present}); only safetensors "
            f"checkpoints are loaded; {hint}"
        )
    return path


def _prepare_hub(config: MapAnythingConfig) -> Path:
    """Offline caches: HF_HUB_OFFLINE, TORCH_HOME and the hub dir; returns the DINOv2 code dir."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    if config.cache_dir:
        home = torch_home(config.cache_dir)
        os.environ["TORCH_HOME"] = str(home)
        torch.hub.set_dir(str(home / "hub"))
    return Path(torch.hub.get_dir()) / DINOV2_HUB_DIR


def load_model(config: MapAnythingConfig, device: torch.device) -> tuple[torch.nn.Module, Callable[..., Any]]:
    """Build the upstream model from a local directory, offline, with safetensors weights only."""
    MapAnything, preprocess_inputs = _import_upstream()
    model_dir = resolve_model_dir(config)
    hub_code = _prepare_hub(config)
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise BackendError(f"cannot read {model_dir / 'config.json'}: {exc}") from exc
    kwargs = raw if "encoder_config" in raw else raw.get("model_config", raw)
    if not isinstance(kwargs, dict) or "encoder_config" not in kwargs:
        raise BackendError(f"{model_dir / 'config.json'} is not a MapAnything config (no encoder_config)")
    kwargs = sanitize_model_config(kwargs)
    accepted = inspect.signature(MapAnything.__init__).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
        dropped = sorted(set(kwargs) - set(accepted))
        if dropped:
            log.warning("ignoring config.json keys the installed MapAnything does not take: %s", dropped)
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    if kwargs["encoder_config"].get("uses_torch_hub", True) and not (hub_code / "hubconf.py").is_file():
        raise BackendError(
            f"the DINOv2 hub code is missing at {hub_code} (MapAnything builds its encoder through "
            f"torch.hub even when weights come from the checkpoint); {_prefetch_hint(config)}"
        )
    try:
        with _offline_torch_hub():
            model = MapAnything(**kwargs)
    except BackendError:
        raise
    except Exception as exc:
        raise BackendError(f"building MapAnything from {model_dir / 'config.json'} failed: {exc!r}") from exc
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise BackendError("loading the checkpoint needs safetensors: pip install safetensors") from exc
    try:
        state = load_file(str(model_dir / "model.safetensors"), device="cpu")
    except Exception as exc:
        raise BackendError(f"cannot read {model_dir / 'model.safetensors'}: {exc}") from exc
    result = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    # safetensors' save_model drops tied aliases; those are loaded through the tensor they share.
    loaded_storage = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded_storage]
    if len(missing) > len(own) // 2:
        raise BackendError(
            f"{model_dir / 'model.safetensors'} does not fit the model in config.json: "
            f"{len(missing)} of {len(own)} tensors missing (e.g. {missing[:3]})"
        )
    if missing or result.unexpected_keys:
        log.warning(
            "checkpoint mismatch: %d missing, %d unexpected tensors (e.g. %s)",
            len(missing),
            len(result.unexpected_keys),
            (missing + list(result.unexpected_keys))[:3],
        )
    model.to(device).eval()
    return model, preprocess_inputs


# --------------------------------------------------------------------------------------------
# Per-window state


@dataclass
class _Prepared:
    """One frame as handed to the model, and how its model grid relates to its own pixels."""

    camera: CameraModel  # the frame's camera at the image's resolution
    view: dict[str, Any]  # processed view for model.infer
    K_model: np.ndarray  # float64 K of the model grid (upstream's, from preprocess_inputs)
    M: np.ndarray  # 3x3 input pixel -> model pixel (homogeneous, OpenCV pixel centres)
    model_ray_valid: torch.Tensor | None  # (h, w) bool on device, distorted cameras only


@dataclass
class _Part:
    """One model call: the frame indices it covered and upstream's per-view outputs."""

    indices: list[int]
    outputs: list[dict[str, Any]]


@dataclass
class _CallSizes:
    """View counts of one window's model calls: those that fitted in GPU memory and those that did not."""

    fitted: set[int]
    out_of_memory: set[int]


def share_out(rest: Sequence[int], anchored: set[int], parts: int) -> list[list[int]]:
    """``rest`` dealt into ``parts`` balanced groups (sizes differ by at most one), in their own order.

    Posed views are dealt first, so every group keeps as many pose anchors as it can.
    """
    groups: list[list[int]] = [[] for _ in range(parts)]
    dealt = [i for i in rest if i in anchored] + [i for i in rest if i not in anchored]
    for j, i in enumerate(dealt):
        groups[j % parts].append(i)
    position = {i: k for k, i in enumerate(rest)}
    return [sorted(g, key=position.__getitem__) for g in groups if g]


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Frame.image as contiguous (H, W, 3) uint8: upstream corrupts float arrays silently."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise BackendError(f"Frame.image must be uint8 RGB, got {image.dtype} (convert in the ROS layer)")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        image = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise BackendError(f"Frame.image must be (H, W, 3), got shape {image.shape}")
    return np.ascontiguousarray(image)


def _depth_prior(depth: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) float32 z-depth with every missing value (NaN, inf, <= 0) as upstream's 0."""
    d = np.asarray(depth, dtype=np.float32).reshape(depth.shape[0], depth.shape[1])
    d = np.where(np.isfinite(d) & (d > 0), d, 0.0).astype(np.float32)
    if d.shape != (height, width):  # registered but at another resolution: nearest keeps values real
        d = F.interpolate(torch.from_numpy(d)[None, None], size=(height, width), mode="nearest")[0, 0].numpy()
    return np.ascontiguousarray(d)


class MapAnythingBackend:
    """Metric multi-view reconstruction with MapAnything; see the module docstring for the why."""

    name = "mapanything"
    needs_pose_priors = False

    def __init__(
        self, config: MapAnythingConfig | None = None, *, device: str | torch.device | None = None, **options: Any
    ) -> None:
        """Either a whole ``config`` or, as every backend plugin, ``device`` plus config fields."""
        if config is None:
            if device is not None:
                options["device"] = str(device)
            try:
                config = MapAnythingConfig(**options)
            except TypeError as exc:
                raise BackendError(f"unknown MapAnything option: {exc}") from exc
        elif options or device is not None:
            raise BackendError("give MapAnythingBackend either a config or device + options, not both")
        self.config = config
        self.config.validate()
        self.device = resolve_device(self.config.device)
        self._model, self._preprocess = load_model(self.config, self.device)
        self._lock = threading.Lock()
        self._ray_cache: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        #: Most views one model call may take, learnt from CUDA OOMs (None: no OOM seen yet).
        self._max_views: int | None = None
        #: Windows split to fit ``_max_views`` that ran without OOM since it last changed.
        self._fitted_windows = 0
        if self.config.warmup:
            self._warmup()

    # -- public ---------------------------------------------------------------------------

    def infer(self, frames: Sequence[Frame]) -> WindowPrediction:
        """One prediction per frame, in input order, in the model's own (view-0 anchored) frame."""
        if not frames:
            raise BackendError("infer() needs at least one frame")
        with self._lock:
            return self._infer_locked(list(frames))

    @property
    def max_views_per_call(self) -> int | None:
        """Most views one model call gets, remembered from CUDA OOMs; None while no OOM was seen."""
        return self._max_views

    # -- steps ----------------------------------------------------------------------------

    def _uses_poses(self, frames: Sequence[Frame]) -> bool:
        return self.config.use_pose_prior and any(f.T_world_camera is not None for f in frames)

    def _order(self, frames: Sequence[Frame]) -> list[int]:
        """Input order, except that the first posed frame leads when the model gets poses."""
        order = list(range(len(frames)))
        if self._uses_poses(frames) and frames[0].T_world_camera is None:
            first = next(i for i, f in enumerate(frames) if f.T_world_camera is not None)
            order.remove(first)
            order.insert(0, first)
        return order

    def _infer_locked(self, frames: list[Frame]) -> WindowPrediction:
        timings = {"preprocess": 0.0, "infer": 0.0, "postprocess": 0.0}
        t0 = time.perf_counter()
        order = self._order(frames)
        prepared = self._prepare(frames, order)
        timings["preprocess"] = time.perf_counter() - t0

        # Views the model gets a pose for: an OOM split shares them out between the halves.
        posed = self._uses_poses(frames)
        anchored = {i for i, f in enumerate(frames) if posed and f.T_world_camera is not None}
        chunks = self._split_to_fit(order, anchored)
        sizes = _CallSizes(set(), set())
        try:
            parts = [p for chunk in chunks for p in self._infer_parts(prepared, chunk, anchored, timings, sizes)]
        finally:
            self._remember_fit(sizes, split=len(chunks) > 1)

        t0 = time.perf_counter()
        chosen: dict[int, tuple[dict[str, Any], np.ndarray, float]] = {}
        ref_depth = _masked_depth(parts[0].outputs[0])
        T_ref0 = _predicted_pose(parts[0].outputs[0])
        for k, part in enumerate(parts):
            # Parts after an OOM split each start with the reference view: the pose and depth they
            # predict for it carry them into the first part's frame, so the window has one frame.
            to_first = Sim3.identity()
            if k > 0:
                scale = _depth_ratio(ref_depth, part.outputs[0]) or 1.0
                to_first = Sim3.from_pose(T_ref0) @ Sim3(np.eye(3), np.zeros(3), scale) @ Sim3.from_pose(
                    invert(_predicted_pose(part.outputs[0]))
                )
            for i, out in zip(part.indices, part.outputs, strict=True):
                if i not in chosen:
                    chosen[i] = (out, to_first.apply_pose(_predicted_pose(out)), to_first.scale)
        ref_out = parts[0].outputs[0]
        metric_scale = None
        if "metric_scaling_factor" in ref_out:
            metric_scale = float(ref_out["metric_scaling_factor"].reshape(-1)[0])
        views = [self._view_prediction(frames[i], prepared[i], *chosen[i]) for i in range(len(frames))]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timings["postprocess"] = time.perf_counter() - t0
        # MapAnything predicts metric geometry (its scale head, or the metric priors it was given).
        return WindowPrediction(views, metric_scale, None, timings, metric=True,
                                pose_priors_used=self._uses_poses(frames))

    def _prepare(self, frames: list[Frame], order: list[int]) -> list[_Prepared]:
        """Build upstream input views (in model order), run preprocess_inputs, add rays."""
        cfg = self.config
        use_poses = self._uses_poses(frames)
        T_ref = frames[order[0]].T_world_camera if use_poses else None
        raw_views: list[dict[str, Any]] = []
        cameras: dict[int, CameraModel] = {}
        for i in order:
            f = frames[i]
            image = _as_rgb_uint8(f.image)
            h, w = image.shape[:2]
            cam = f.camera_model
            if (cam.width, cam.height) != (w, h):
                cam = cam.scaled(w, h)
            cameras[i] = cam
            # K always goes in: it makes the crop deterministic and upstream returns the model K.
            view: dict[str, Any] = {"img": image, "intrinsics": cam.K.astype(np.float32)}
            metric = False
            if cfg.use_depth_prior and cfg.use_calibration_prior and f.depth is not None:
                view["depth_z"] = _depth_prior(f.depth, h, w)
                metric = True
            if use_poses and f.T_world_camera is not None:
                relative = invert(np.asarray(T_ref, dtype=np.float64)) @ np.asarray(
                    f.T_world_camera, np.float64
                )
                view["camera_poses"] = rigidify(relative).astype(np.float32)
                metric = True
            if metric:
                view["is_metric_scale"] = torch.tensor([True])
            raw_views.append(view)
        try:
            processed = self._preprocess(raw_views)
        except ValueError as exc:
            raise BackendError(f"MapAnything preprocess_inputs rejected the window: {exc}") from exc
        prepared: dict[int, _Prepared] = {}
        for i, view in zip(order, processed):
            cam = cameras[i]
            K_model = view["intrinsics"].reshape(3, 3).double().cpu().numpy()
            M = K_model @ np.linalg.inv(cam.K)
            h, w = (int(s) for s in view["img"].shape[-2:])
            ray_valid = None
            if not cfg.use_calibration_prior:
                del view["intrinsics"]
            elif not cam.is_pinhole:
                rays, ray_valid = self._model_grid_rays(cam, M, h, w)
                del view["intrinsics"]
                view["ray_directions"] = rays[None]
            if not cam.is_pinhole and ray_valid is None:
                _, ray_valid = self._model_grid_rays(cam, M, h, w)
            prepared[i] = _Prepared(cam, view, K_model, M, ray_valid)
        return [prepared[i] for i in range(len(frames))]

    def _model_grid_rays(
        self, cam: CameraModel, M: np.ndarray, h: int, w: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit rays (h, w, 3) float32 of the model grid of a distorted camera, and validity."""
        key = (
            "model",
            cam.width,
            cam.height,
            cam.K.tobytes(),
            cam.distortion_model,
            cam.D.tobytes(),
            M.tobytes(),
            h,
            w,
        )
        if key not in self._ray_cache:
            A = np.linalg.inv(M).tolist()  # model pixel -> input pixel (Python floats, not np scalars)
            v, u = torch.meshgrid(
                torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
            )
            u_in = A[0][0] * u + A[0][1] * v + A[0][2]
            v_in = A[1][0] * u + A[1][1] * v + A[1][2]
            try:
                rays, valid = pixel_rays(cam, u_in, v_in)
            except ValueError as exc:
                raise BackendError(str(exc)) from exc
            self._ray_cache[key] = (rays.float().to(self.device), valid.to(self.device))
        return self._ray_cache[key]

    def _input_grid_rays(self, cam: CameraModel) -> tuple[torch.Tensor, torch.Tensor]:
        """Plane rays (z = 1) of every input pixel and their validity (distortion included)."""
        key = ("input", cam.width, cam.height, cam.K.tobytes(), cam.distortion_model, cam.D.tobytes())
        if key not in self._ray_cache:
            if cam.is_pinhole:
                rays = pinhole_rays(cam.K, cam.height, cam.width, self.device)
                valid = torch.ones(cam.height, cam.width, dtype=torch.bool, device=self.device)
            else:
                try:
                    unit, valid = grid_rays(cam)
                except ValueError as exc:
                    raise BackendError(str(exc)) from exc
                z = unit[..., 2:3]
                rays = torch.where(z > 1e-9, unit / z.clamp_min(1e-9), torch.zeros_like(unit))
                rays, valid = rays.float().to(self.device), valid.to(self.device)
            self._ray_cache[key] = (rays, valid)
        return self._ray_cache[key]

    def _run_model(self, views: list[dict[str, Any]]) -> list[dict[str, Any]]:
        cfg = self.config
        return self._model.infer(
            views,
            memory_efficient_inference=cfg.memory_efficient,
            use_amp=self.device.type == "cuda",
            amp_dtype="bf16",
            apply_mask=cfg.apply_mask,
            mask_edges=cfg.mask_edges,
            edge_normal_threshold=cfg.edge_normal_threshold,
            edge_depth_threshold=cfg.edge_depth_threshold,
            apply_confidence_mask=cfg.apply_confidence_mask,
            confidence_percentile=cfg.confidence_percentile,
        )

    def _split_to_fit(self, order: list[int], anchored: set[int]) -> list[list[int]]:
        """The window's model calls: one, or as few balanced parts as the remembered limit allows,
        each starting with the reference view ``order[0]``."""
        limit = self._max_views
        if limit is None or len(order) <= limit:
            return [order]
        parts = math.ceil((len(order) - 1) / (limit - 1))
        return [[order[0], *group] for group in share_out(order[1:], anchored, parts)]

    def _remember_fit(self, sizes: _CallSizes, split: bool) -> None:
        """Learn the view limit from this window's OOMs, or probe one view more after enough fitted windows."""
        if sizes.out_of_memory:
            smallest = min(sizes.out_of_memory)
            # Known to fit: this window's calls and the previous limit, below the smallest count that ran out.
            fitted = [n for n in (*sizes.fitted, self._max_views or 0) if 2 <= n < smallest]
            limit = max(fitted) if fitted else max(2, smallest - 1)
            if limit != self._max_views:
                log.warning(
                    "out of GPU memory on %d views: later windows run in model calls of at most %d views, "
                    "each with the reference view (one more is tried after %d windows fit)",
                    smallest,
                    limit,
                    self.config.oom_probe_windows,
                )
            self._max_views, self._fitted_windows = limit, 0
        elif split and self._max_views is not None:
            self._fitted_windows += 1
            if self._fitted_windows >= self.config.oom_probe_windows:
                self._max_views += 1
                self._fitted_windows = 0
                log.info("%d windows fitted in GPU memory: trying model calls of up to %d views",
                         self.config.oom_probe_windows, self._max_views)

    def _infer_parts(
        self,
        prepared: list[_Prepared],
        indices: list[int],
        anchored: set[int],
        timings: dict[str, float],
        sizes: _CallSizes,
    ) -> list[_Part]:
        """Run the model on ``indices`` (reference first); split in halves on CUDA OOM.

        Both halves start with the reference view and share out the posed and the unposed views
        (:func:`share_out`), so each half keeps as many pose anchors as it can.
        """
        t0 = time.perf_counter()
        try:
            outputs = self._run_model([dict(prepared[i].view) for i in indices])
            timings["infer"] += time.perf_counter() - t0
            sizes.fitted.add(len(indices))
            return [_Part(list(indices), outputs)]
        except torch.cuda.OutOfMemoryError as exc:
            timings["infer"] += time.perf_counter() - t0
            torch.cuda.empty_cache()
            sizes.out_of_memory.add(len(indices))
            if len(indices) <= 2:
                raise BackendError(
                    f"out of GPU memory even for {len(indices)} view(s) at the model resolution; "
                    "use a smaller model, a larger GPU, or device 'cpu'"
                ) from exc
            ref = indices[0]
            first, second = share_out(indices[1:], anchored, 2)
            log.warning(
                "out of GPU memory on %d views; retrying as %d + %d views, each with the reference view",
                len(indices),
                len(first) + 1,
                len(second) + 1,
            )
        return self._infer_parts(prepared, [ref, *first], anchored, timings, sizes) + self._infer_parts(
            prepared, [ref, *second], anchored, timings, sizes
        )

    def _view_prediction(
        self, frame: Frame, prep: _Prepared, out: dict[str, Any], T_world: np.ndarray, scale: float
    ) -> ViewPrediction:
        """Upstream's per-view dict -> ViewPrediction in the model's own frame at the chosen resolution."""
        cfg = self.config
        depth = out["depth_z"].reshape(out["depth_z"].shape[-3], out["depth_z"].shape[-2])
        depth = depth.to(self.device, torch.float32)
        if "mask" in out:
            mask = out["mask"].reshape(depth.shape).to(self.device, torch.bool)
        elif "non_ambiguous_mask" in out:
            mask = out["non_ambiguous_mask"].reshape(depth.shape).to(self.device, torch.bool)
        else:
            mask = torch.ones_like(depth, dtype=torch.bool)
        conf = out["conf"].reshape(depth.shape).to(self.device, torch.float32)
        valid = mask & torch.isfinite(depth) & (depth > 0)
        if cfg.min_confidence > 0:
            valid &= conf >= cfg.min_confidence
        if prep.model_ray_valid is not None:
            valid &= prep.model_ray_valid
        depth = torch.where(valid, depth * scale, torch.full_like(depth, float("nan")))

        if cfg.output_resolution == "model":
            h, w = depth.shape
            K_out = prep.K_model.copy()
            if prep.camera.is_pinhole:
                rays = pinhole_rays(K_out, h, w, self.device)
            else:
                unit, _ = self._model_grid_rays(prep.camera, prep.M, h, w)
                rays = unit / unit[..., 2:3].clamp_min(1e-9)
            colors = (out["img_no_norm"].reshape(h, w, 3).to(self.device).float() * 255).round()
            colors = colors.clamp(0, 255).to(torch.uint8)
        else:
            depth, valid, conf = _resample_to_input(
                depth, valid, conf, prep.M, prep.camera.height, prep.camera.width, cfg.depth_interpolation
            )
            rays, ray_valid = self._input_grid_rays(prep.camera)
            if not prep.camera.is_pinhole:
                valid &= ray_valid
                depth = torch.where(ray_valid, depth, torch.full_like(depth, float("nan")))
            K_out = prep.camera.K.astype(np.float64).copy()
            colors = torch.from_numpy(_as_rgb_uint8(frame.image)).to(self.device)
        T = torch.as_tensor(T_world, dtype=torch.float32, device=self.device)
        points = (rays * depth[..., None]) @ T[:3, :3].T + T[:3, 3]
        return ViewPrediction(depth, conf, valid, points, colors, T_world, K_out)

    def _warmup(self) -> None:
        """One small call so the first real window does not pay for lazy CUDA/cuDNN set-up."""
        rng = np.random.default_rng(0)
        K = np.array([[300.0, 0, 258.5], [0, 300.0, 195.5], [0, 0, 1]], dtype=np.float32)
        views = [
            {"img": rng.integers(0, 255, (392, 518, 3), dtype=np.uint8), "intrinsics": K} for _ in range(2)
        ]
        t0 = time.perf_counter()
        with self._lock:
            try:
                self._run_model(self._preprocess(views))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                log.warning("warm-up ran out of GPU memory; continuing without warm-up")
        log.info("MapAnything warm-up took %.2f s on %s", time.perf_counter() - t0, self.device)


def _predicted_pose(out: dict[str, Any]) -> np.ndarray:
    """Upstream's (B, 4, 4) camera-to-pred pose of batch element 0 as a float64 rigid transform."""
    return rigidify(out["camera_poses"].reshape(-1, 4, 4)[0].float().cpu().numpy())


def _masked_depth(out: dict[str, Any]) -> torch.Tensor:
    """(h, w) predicted z-depth with NaN where upstream's mask is false (it zeroes those)."""
    depth = out["depth_z"].reshape(out["depth_z"].shape[-3], out["depth_z"].shape[-2]).float()
    keep = depth > 0
    if "mask" in out:
        keep &= out["mask"].reshape(depth.shape).to(depth.device, torch.bool)
    return torch.where(keep, depth, torch.full_like(depth, float("nan")))


def _depth_ratio(reference: torch.Tensor | None, out: dict[str, Any], min_pixels: int = 100) -> float | None:
    """Median ratio of a view's known depth to the same view predicted again (robust scale)."""
    if reference is None:
        return None
    ratio = reference / _masked_depth(out).to(reference.device)
    ratio = ratio[torch.isfinite(ratio) & (ratio > 0)]
    return float(ratio.median()) if ratio.numel() >= min_pixels else None


def _resample_to_input(
    depth: torch.Tensor,
    valid: torch.Tensor,
    conf: torch.Tensor,
    M: np.ndarray,
    height: int,
    width: int,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model-grid maps -> the input camera's pixel grid, undoing upstream's resize + centre crop.

    ``M`` maps input pixels to model pixels (both OpenCV, integer = pixel centre). Input pixels
    outside the crop get NaN depth, zero confidence and are invalid; inside, a pixel is valid
    only when every model pixel its interpolation touches is valid (no blending across holes).
    """
    h, w = depth.shape
    device = depth.device
    v, u = torch.meshgrid(
        torch.arange(height, dtype=torch.float32, device=device),
        torch.arange(width, dtype=torch.float32, device=device),
        indexing="ij",
    )
    um = float(M[0, 0]) * u + float(M[0, 1]) * v + float(M[0, 2])
    vm = float(M[1, 0]) * u + float(M[1, 1]) * v + float(M[1, 2])
    eps = 1e-4
    inside = (um >= -0.5 - eps) & (um <= w - 0.5 + eps) & (vm >= -0.5 - eps) & (vm <= h - 0.5 + eps)
    grid = torch.stack([(2 * um + 1) / w - 1, (2 * vm + 1) / h - 1], dim=-1)[None]
    valid_f = valid.float()
    stack = torch.stack([torch.where(valid, depth, torch.zeros_like(depth)), valid_f, conf])[None]
    sampled = F.grid_sample(stack, grid, mode=mode, padding_mode="border", align_corners=False)[0]
    valid_in = inside & (sampled[1] >= 1 - 1e-4)
    depth_in = torch.where(valid_in, sampled[0], torch.full_like(sampled[0], float("nan")))
    conf_in = torch.where(inside, sampled[2], torch.zeros_like(sampled[2]))
    return depth_in, valid_in, conf_in
