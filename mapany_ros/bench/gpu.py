"""``python -m mapany_ros.bench.gpu``: the MapAnything path measured on whatever device torch sees.

Timing needs no trained weights (compute does not depend on weight values), so the model is
upstream's own architecture built with random weights from the installed package's Hydra configs
(``configs/train.yaml`` composed with ``model=mapanything``: ``full`` is the published 1.23 B
parameter model, ``reduced`` a small one for CPUs). It is saved as config.json + model.safetensors
and loaded through the adapter's real, offline loading path. Windows of 2, 8 and 16 synthetic
640x480 views (the model sees 518x392) with the pose and calibration priors the node feeds are then:

1. run through bare upstream ``infer`` on the adapter's prepared inputs: median rate and peak GPU
   memory, next to upstream's published rates;
2. run through :class:`MapAnythingBackend`: its overhead is its total minus bare ``infer``;
3. run through the core :class:`Pipeline` (windows, placement, fusion, host copies): time per
   window and its overhead over bare ``infer``;

and 4. fusion of a 640x480 keyframe at 5 cm voxels is timed on the device (``bench_fusion``); 5. the
placement stage per window of 8 views at 518x392 once the map holds 2000 keyframes, with the model
simulator's errors and every check on, predicted on the device (``bench.placement.bench_window_cost``).
CUDA runs bf16 autocast with memory-efficient inference, CPU fp32, as the node does. Timings are
medians of fixed repeats after a warm-up, with ``torch.cuda.synchronize`` around each.

With purely random weights upstream masks every pixel: its edge masking (numpy, on the CPU) is then
skipped and nothing reaches placement or fusion, so the path would look faster than it is. The
dense head's last layer is therefore set so that every pixel is valid at about 3 m (one 1x1
convolution's values; the compute is unchanged). Placement runs with its rejection checks off, as
random poses would fail them where a trained model's pass.

Without upstream, its configs or the DINOv2 hub code the command exits with status 2 and names
what to install.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import io
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mapany_ros.bench.fusion import bench_fusion
from mapany_ros.bench.placement import bench_window_cost
from mapany_ros.core.backends.base import BackendError, resolve_device
from mapany_ros.core.backends.mapanything import (
    DINOV2_HUB_DIR,
    INSTALL_HINT,
    MapAnythingBackend,
    MapAnythingConfig,
    _offline_torch_hub,
    _prepare_hub,
    sanitize_model_config,
)
from mapany_ros.core.frames import Frame
from mapany_ros.core.fusion import FusionConfig
from mapany_ros.core.pipeline import Pipeline, PipelineConfig
from mapany_ros.core.placement import PlacementConfig
from mapany_ros.sim.scene import SyntheticSequence, make_sequence

WIDTH, HEIGHT = 640, 480  # 4:3, which upstream's preprocess maps to 518x392
DEFAULT_VIEWS = (2, 8, 16)
#: Upstream's published rates (profiling plots: 518x518, bf16, GPU not named).
PUBLISHED_HZ = {2: 25.0, 8: 7.5, 16: 3.3}
UPSTREAM_INSTALL = "pip install git+https://github.com/facebookresearch/map-anything"
#: Hydra overrides on top of configs/model/mapanything.yaml: ViT-S encoder with 4 blocks, 4
#: alternating-attention layers at dim 384, DPT feature dim 64 (88.5 M parameters).
REDUCED_OVERRIDES = (
    "model.encoder.size=small",
    "model.encoder.name=dinov2_small_4_layers",
    "model.encoder.keep_first_n_layers=4",
    "model.info_sharing.module_args.depth=4",
    "model.info_sharing.module_args.dim=384",
    "model.info_sharing.module_args.num_heads=6",
    "model.info_sharing.module_args.indices=[1,2]",
    "model.pred_head.feature_head.feature_dim=64",
)
SIZES: dict[str, tuple[str, ...]] = {"full": (), "reduced": REDUCED_OVERRIDES}
SIZE_NOTES = {
    "full": "the published architecture: DINOv2-G encoder (first 24 blocks), 16 alternating-attention layers "
            "at dim 1536, DPT, pose and scale heads",
    "reduced": "ViT-S encoder with 4 blocks, 4 alternating-attention layers at dim 384, DPT feature dim 64",
}
#: Dense head channels of "raydirs+depth+pose+confidence+mask": ray (3), log depth, confidence, mask logit.
DENSE_ADAPTOR = "raydirs+depth+pose+confidence+mask"
DENSE_BIAS = (0.0, 0.0, 1.0, math.log(3.0), 0.0, 4.0)


class SetupError(Exception):
    """Something to install or prepare before measuring: reported with exit status 2."""


# --------------------------------------------------------------------------------------------
# The model


def find_configs(explicit: str | Path | None = None) -> Path:
    """Upstream's Hydra ``configs/``: the given folder, else the one beside the installed package.

    Upstream reads them from its source tree; a non-editable pip install does not ship them.
    """
    try:
        import mapanything
    except Exception as exc:  # ImportError, or a broken torchvision/cv2 raising RuntimeError
        raise SetupError(f"upstream MapAnything does not import ({exc!r}): {UPSTREAM_INSTALL}; {INSTALL_HINT}") from exc
    candidates = [Path(explicit).expanduser()] if explicit else []
    if not explicit and getattr(mapanything, "__file__", None):
        candidates.append(Path(mapanything.__file__).resolve().parents[1] / "configs")
    for path in candidates:
        if (path / "train.yaml").is_file() and (path / "model" / "mapanything.yaml").is_file():
            return path.resolve()
    where = ", ".join(str(p) for p in candidates) or "beside the installed package"
    raise SetupError(
        f"upstream's Hydra configs (train.yaml, model/mapanything.yaml) are not in {where}: pass "
        "--configs DIR with the configs/ folder of a facebookresearch/map-anything source checkout "
        "(a non-editable pip install does not ship it), or --model-dir with a prepared model"
    )


def compose_model_config(size: str, configs_dir: Path) -> tuple[str, dict[str, Any]]:
    """(model_str, model_config) as upstream composes them, sanitised so nothing is downloaded."""
    try:
        import mapanything.models as upstream_models
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra
        from omegaconf import OmegaConf
    except Exception as exc:
        raise SetupError(f"composing upstream's configs needs hydra-core and mapanything ({exc!r}): "
                         f"pip install hydra-core; {UPSTREAM_INSTALL}") from exc
    if not OmegaConf.has_resolver("special_float"):
        OmegaConf.register_new_resolver("special_float", getattr(upstream_models, "resolve_special_float", float))
    overrides = ["model=mapanything", "machine=default", *SIZES[size]]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(configs_dir), version_base=None):
            cfg = compose(config_name="train", overrides=overrides)
        model_str = str(cfg.model.model_str)
        config = OmegaConf.to_container(cfg.model.model_config, resolve=True)
    except Exception as exc:
        raise SetupError(f"upstream's configs in {configs_dir} do not compose for --size {size} ({exc!r})") from exc
    finally:
        GlobalHydra.instance().clear()
    if model_str != "mapanything" or not isinstance(config, dict) or "encoder_config" not in config:
        raise SetupError(f"configs/model/mapanything.yaml in {configs_dir} does not describe a MapAnything model")
    return model_str, sanitize_model_config(config)


def make_outputs_valid(model: torch.nn.Module) -> bool:
    """Set the dense head's last 1x1 convolution so every pixel is valid at about 3 m.

    Random weights make upstream mask every pixel, which skips its edge masking and leaves
    nothing to place or fuse; the compute of the network itself is unchanged. False when the
    head is not the one this was written for (the model is then left as it is).
    """
    config = getattr(model, "pred_head_config", {}) or {}
    head = getattr(model, "dpt_regressor_head", None)
    if config.get("adaptor_type") != DENSE_ADAPTOR or head is None:
        return False
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs or convs[-1].out_channels != len(DENSE_BIAS) or convs[-1].bias is None:
        return False
    with torch.no_grad():
        convs[-1].weight.mul_(0.01)
        convs[-1].bias.copy_(torch.tensor(DENSE_BIAS))
    return True


def prepare_hub(cache_dir: str) -> Path:
    """The offline DINOv2 hub code (TORCH_HOME set from ``cache_dir`` as the node does); SetupError if absent."""
    hub_code = _prepare_hub(MapAnythingConfig(cache_dir=cache_dir))
    if not (hub_code / "hubconf.py").is_file():
        raise SetupError(
            f"the DINOv2 hub code is missing at {hub_code} (upstream builds its encoder through torch.hub): "
            f"run `mapany-ros prefetch --cache-dir DIR` where there is internet and pass --cache-dir DIR, or "
            f"put a copy of github.com/facebookresearch/dinov2 at $TORCH_HOME/hub/{DINOV2_HUB_DIR}"
        )
    return hub_code


def build_random_model(model_dir: Path, size: str, configs_dir: Path) -> dict[str, Any]:
    """Write config.json + model.safetensors of upstream's model with random weights.

    Built with upstream's own factory (``mapanything.models.init_model``) while torch.hub is
    pinned to the cached DINOv2 code without weights.
    """
    model_str, config = compose_model_config(size, configs_dir)
    from mapanything.models import init_model
    from omegaconf import OmegaConf
    from safetensors.torch import save_model

    t0 = time.perf_counter()
    with _offline_torch_hub(), contextlib.redirect_stdout(io.StringIO()):
        model = init_model(model_str, OmegaConf.create(copy.deepcopy(config)))  # it mutates its config
    valid = make_outputs_valid(model)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config))
    save_model(model, str(model_dir / "model.safetensors"))  # drops tied aliases, which the loader expects
    info = {
        "size": size,
        "source": f"upstream's configs/model/mapanything.yaml: {SIZE_NOTES[size]}",
        "configs": str(configs_dir),
        "overrides": ["model=mapanything", *SIZES[size]],
        "dense_head_set_valid": valid,
        "build_s": time.perf_counter() - t0,
    }
    del model
    gc.collect()
    return info


def load_backend(model_dir: Path, cache_dir: str, device: torch.device) -> MapAnythingBackend:
    """The node's backend on ``model_dir``, loaded offline through the real ``load_model``."""
    config = MapAnythingConfig(model_path=str(model_dir), cache_dir=cache_dir, device=str(device), warmup=False)
    try:
        return MapAnythingBackend(config)
    except BackendError as exc:
        raise SetupError(str(exc)) from exc


# --------------------------------------------------------------------------------------------
# Measurements


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of ``fn`` with the device's queued work included."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def synthetic_sequence(n_frames: int, seed: int = 0) -> SyntheticSequence:
    """640x480 frames 0.25 m apart (2 Hz at 0.5 m/s): every frame is a keyframe."""
    return make_sequence(seed, WIDTH, HEIGHT, n_frames, 2.0, supersample=1)


def _bare_infer(backend: MapAnythingBackend, frames: list[Frame]) -> tuple[float, tuple[int, int]]:
    """Seconds of upstream ``infer`` alone on the adapter's prepared views, and the model grid (w, h).

    ``_run_model`` is the adapter's single call of ``model.infer`` with the node's arguments.
    """
    prepared = backend._prepare(frames, backend._order(frames))
    views = [dict(p.view) for p in prepared]
    h, w = (int(s) for s in views[0]["img"].shape[-2:])
    seconds, _ = _timed(lambda: backend._run_model(views), backend.device)
    return seconds, (w, h)


def measure_windows(backend: MapAnythingBackend, frames: list[Frame], views: Sequence[int],
                    repeats: int) -> list[dict[str, Any]]:
    """Per window size: bare ``infer`` (rate, peak memory) and the adapter's total on the same frames."""
    device = backend.device
    rows = []
    for n in views:
        window = frames[:n]
        row: dict[str, Any] = {"views": n, "published_hz": PUBLISHED_HZ.get(n)}
        try:
            backend.infer(window)  # warm-up: lazy CUDA set-up, allocator, caches
            _bare_infer(backend, window)
            bare, total, pre, post, peaks = [], [], [], [], []
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                seconds, grid = _bare_infer(backend, window)
                bare.append(seconds)
                if device.type == "cuda":
                    peaks.append(torch.cuda.max_memory_allocated(device))
                seconds, out = _timed(lambda w=window: backend.infer(w), device)
                total.append(seconds)
                pre.append(out.timings_s["preprocess"])
                post.append(out.timings_s["postprocess"])
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({**row, "error": "out of GPU memory"})
            continue
        infer_s = statistics.median(bare)
        overhead_s = statistics.median(t - b for t, b in zip(total, bare))
        rows.append({
            **row,
            "model_grid": f"{grid[0]}x{grid[1]}",
            "infer_ms": infer_s * 1e3,
            "infer_hz": 1.0 / infer_s,
            "peak_memory_gib": max(peaks) / 2**30 if peaks else None,
            "adapter_ms": statistics.median(total) * 1e3,
            "adapter_overhead_ms": overhead_s * 1e3,
            "adapter_overhead_fraction": overhead_s / infer_s,
            "preprocess_ms": statistics.median(pre) * 1e3,
            "postprocess_ms": statistics.median(post) * 1e3,
        })
    return rows


def pipeline_config(n: int) -> PipelineConfig:
    """Windows of ``n`` keyframes (overlap 2, or 1 for pairs), every frame a keyframe, no flush by
    latency, placement without rejection checks, the node's fusion."""
    # Random poses: no view check, no residual limit, view sigmas so wide that the graph keeps every view.
    placement = PlacementConfig(max_residual_m=0.0, view_consistency=0.0, max_depth_m=0.0, view_sigma_m=10.0,
                                view_sigma_deg=180.0)
    return PipelineConfig(
        cameras=("camera",), window_size=n, window_overlap=min(2, n - 1), min_translation_m=0.0,
        thin_keyframes=False, max_window_latency_s=1e6, placement=placement, fusion=FusionConfig(),
    )


def measure_pipeline(backend: MapAnythingBackend, seq: SyntheticSequence, n: int, repeats: int) -> dict[str, Any]:
    """The core pipeline on windows of ``n`` views against bare ``infer`` on the same windows.

    The first window warms up; each of the next ``repeats`` is followed by bare ``infer`` on its
    frames, so every overhead is a paired difference.
    """
    overlap = min(2, n - 1)
    needed = n + repeats * (n - overlap)
    if len(seq.frames) < needed:
        raise ValueError(f"pipeline with {n} views needs {needed} frames, got {len(seq.frames)}")
    results: list[Any] = []
    errors: list[Exception] = []
    clock = [0]
    pipeline = Pipeline(pipeline_config(n), backend, results.append, errors.append, clock=lambda: clock[0])
    pipeline.set_extrinsic("camera", seq.T_base_camera)
    frames = seq.to_frames(camera="camera", frame_id="camera_optical_frame", with_poses=False)
    rows = []
    for frame, truth in zip(frames[:needed], seq.frames[:needed]):
        clock[0] = frame.stamp_ns
        pipeline.add_odometry(frame.stamp_ns, truth.T_odom_base)
        pipeline.add_frame(frame)
        done = len(results)
        seconds, _ = _timed(pipeline.process_ready, backend.device)
        if errors:
            raise RuntimeError(f"pipeline window with {n} views failed: {errors[0]!r}") from errors[0]
        if len(results) == done:
            continue
        s, result = pipeline.stats, results[-1]
        warm = bool(rows)
        rows.append({"views": len(result.frames), "window_s": seconds, "backend_s": s.backend_time_s,
                     "placement_s": s.placement_time_s, "fusion_s": s.fusion_time_s,
                     "placed": sum(result.placement.accepted),
                     "bare_s": _bare_infer(backend, list(result.frames))[0] if warm else math.nan})
    timed = [r for r in rows[1:] if r["views"] == n]
    if not timed:
        raise RuntimeError(f"the pipeline produced no timed window of {n} views ({len(rows)} windows in all)")
    out: dict[str, Any] = {"views": n, "overlap": overlap, "windows": len(timed)}
    for key in ("window", "bare", "backend", "placement", "fusion"):
        out[f"{key if key != 'bare' else 'bare_infer'}_ms"] = statistics.median(r[f"{key}_s"] for r in timed) * 1e3
    out["overhead_ms"] = statistics.median(r["window_s"] - r["bare_s"] for r in timed) * 1e3
    out["overhead_fraction"] = out["overhead_ms"] / out["bare_infer_ms"]
    out["views_placed"] = statistics.median(r["placed"] for r in timed)
    out["voxels"] = pipeline.map.num_voxels if pipeline.map is not None else 0
    return out


def measure_fusion(device: torch.device, repeats: int, keyframes: int = 8) -> dict[str, Any]:
    """Fusion of a 640x480 keyframe at 5 cm voxels on ``device`` (:func:`bench_fusion.bench_fusion`)."""
    r = bench_fusion(str(device), WIDTH, HEIGHT, 0.05, repeats=repeats, keyframes=keyframes, prefill_voxels=0)
    return {k: r[k] for k in ("integrate_ms", "integrate_max_ms", "update_pose_ms", "points_ms", "num_voxels",
                              "pixel_stride", "keyframes")}


def measure_placement(device: torch.device, keyframes: int, repeats: int) -> dict[str, Any]:
    """Placement per 8-view 518x392 window at ``keyframes`` keyframes on ``device``, with and without
    odometry (:func:`bench_window_cost`, torch's default threads, no loop job): window wall ms and
    its stages'. A failure is reported, not raised: the measurements before it stand."""
    try:
        threads = torch.get_num_threads()
        cost = bench_window_cost(keyframes=keyframes, repeats=repeats, threads=(threads,), device=device,
                                 loop_job=False)
    except Exception as exc:  # noqa: BLE001 - a report of what failed, after the other measurements
        return {"keyframes": keyframes, "error": f"{type(exc).__name__}: {exc}"}
    out: dict[str, Any] = {"keyframes": keyframes, "resolution": cost["resolution"], "threads": threads}
    for mode in ("odometry", "overlap"):
        row = cost[mode][threads]
        stages = {k[len("wall "):]: v * 1e3 for k, v in row.items() if k.startswith("wall ") and k != "wall idle"}
        out[mode] = {"window_ms": row["wall"] * 1e3, "stages_ms": stages}
    return out


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
                            "cpu_threads": torch.get_num_threads(), "gpu": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda)
    return info


# --------------------------------------------------------------------------------------------
# Report


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def _ms(value: float) -> str:
    digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 1 else 2
    return f"{value:.{digits}f} ms"


def render_markdown(report: dict[str, Any]) -> list[str]:
    """The report as markdown lines (a "## MapAnything path (<device>)" section)."""
    m, model, s = report["machine"], report["model"], report["settings"]
    where = f"{m['device']}, {m['gpu']}" if m["gpu"] else m["device"]
    machine = f"GPU {m['gpu']} ({m['gpu_memory_gib']:.0f} GiB), CUDA {m['cuda']}" if m["gpu"] else "no GPU"
    lines = [
        f"## MapAnything path ({where})",
        "",
        f"Machine: {machine}, torch {m['torch']}, Python {m['python']}, {m['cpu_threads']} CPU threads.",
        f"Model: {model['size']}, {model['parameters'] / 1e6:.1f} M parameters ({model['source']}); "
        f"{model['weights']}. Loaded in {model['load_s']:.1f} s through the adapter's offline loader"
        + (f", {model['weights_memory_gib']:.1f} GiB on the GPU." if model.get("weights_memory_gib") else "."),
        f"Input: synthetic {s['input']} frames (model grid {s['model_grid']}) with pose + calibration priors; "
        f"{s['precision']}. Median of {s['repeats']} runs after a warm-up.",
        "",
        "| views | bare `infer` | rate | published rate (518x518, bf16) | peak GPU memory | adapter total "
        "| adapter overhead | adapter pre + post |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["windows"]:
        published = f"~{r['published_hz']:g} Hz" if r.get("published_hz") else "-"
        if "error" in r:
            lines.append(f"| {r['views']} | {r['error']} | | {published} | | | | |")
            continue
        lines.append(
            f"| {r['views']} | {_ms(r['infer_ms'])} | {r['infer_hz']:.2f} Hz | {published} "
            f"| {_fmt(r['peak_memory_gib'], ' GiB')} | {_ms(r['adapter_ms'])} "
            f"| {_ms(r['adapter_overhead_ms'])} ({r['adapter_overhead_fraction'] * 100:.1f} %) "
            f"| {_ms(r['preprocess_ms'] + r['postprocess_ms'])} |"
        )
    lines += [
        "",
        "Upstream's rates are read off its profiling plots (GPU not named) at 518x518: more tokens per "
        "view than 518x392. Peak memory includes the weights. Adapter overhead: its total minus bare `infer`, "
        "paired per run; pre + post: its own timings around the model call.",
        "",
        "Core pipeline end to end (windows, placement, fusion, host copies), each window followed by bare "
        "`infer` on its frames:",
        "",
        "| views | window | bare `infer` | backend (adapter) | placement | fusion + host copy | overhead "
        "| views placed | voxels |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in report["pipeline"]:
        lines.append(
            f"| {p['views']} | {_ms(p['window_ms'])} | {_ms(p['bare_infer_ms'])} | {_ms(p['backend_ms'])} "
            f"| {_ms(p['placement_ms'])} | {_ms(p['fusion_ms'])} "
            f"| {_ms(p['overhead_ms'])} ({p['overhead_fraction'] * 100:.1f} %) "
            f"| {p['views_placed']:g} / {p['views']} | {p['voxels']} |"
        )
    f = report["fusion"]
    lines += [
        "",
        f"Fusion on {m['device']}: {_ms(f['integrate_ms'])} per {s['input']} keyframe at 5 cm voxels "
        f"(pixel stride {f['pixel_stride']}, worst {_ms(f['integrate_max_ms'])}); update_pose "
        f"{_ms(f['update_pose_ms'])}, points() {_ms(f['points_ms'])}.",
        "",
    ]
    p = report.get("placement")
    if p is not None:
        head = f"Placement per window of 8 views at 518x392, {p['keyframes']} keyframes in the map, on {m['device']}"
        if "error" in p:
            lines += [f"{head}: failed ({p['error']}).", ""]
        else:
            lines += [f"{head} ({p['threads']} CPU threads; the model simulator's errors, every check on):", "",
                      "| stage | with odometry | without |", "|---|---|---|"]
            stages = list(dict.fromkeys([*p["odometry"]["stages_ms"], *p["overlap"]["stages_ms"]]))
            for stage in stages:
                lines.append(f"| {stage} | {_ms(p['odometry']['stages_ms'].get(stage, 0.0))} "
                             f"| {_ms(p['overlap']['stages_ms'].get(stage, 0.0))} |")
            odometry, overlap = (_ms(p[mode]["window_ms"]) for mode in ("odometry", "overlap"))
            lines += [f"| **the window** (target <= 15 ms) | **{odometry}** | **{overlap}** |", ""]
    return lines


# --------------------------------------------------------------------------------------------
# Command line


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement; raises SetupError for what must be installed or prepared first."""
    try:
        device = resolve_device(args.device)
    except BackendError as exc:
        raise SetupError(str(exc)) from exc
    repeats = args.repeats or (5 if device.type == "cuda" else 2)
    views = sorted(set(args.views))
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        if args.model_dir:
            model_dir = Path(args.model_dir).expanduser()
            model: dict[str, Any] = {"size": "given", "source": str(model_dir), "weights": "weights as given"}
        else:
            if args.size == "full" and device.type == "cpu":
                _log("the full model on a CPU takes about a minute per 2-view window; --size reduced takes minutes")
            configs = find_configs(args.configs)
            prepare_hub(args.cache_dir)
            model_dir = Path(tmp) / f"mapanything_{args.size}"
            _log(f"building the {args.size} model from {configs} with random weights ...")
            model = build_random_model(model_dir, args.size, configs)
            model["weights"] = "random weights" + (
                ", dense head's last layer set so every pixel is valid" if model["dense_head_set_valid"] else "")
        _log(f"loading it on {device} ...")
        t0 = time.perf_counter()
        backend = load_backend(model_dir, args.cache_dir, device)
        model["load_s"] = time.perf_counter() - t0
    model["parameters"] = sum(p.numel() for p in backend._model.parameters())
    model["weights_memory_gib"] = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None

    needed = max(n + repeats * (n - min(2, n - 1)) for n in views)  # the longest pipeline run
    _log(f"rendering {needed} synthetic {WIDTH}x{HEIGHT} frames ...")
    seq = synthetic_sequence(needed)
    frames = seq.to_frames(camera="camera", frame_id="camera_optical_frame")
    _log(f"bare infer and adapter on {views} views, {repeats} repeats ...")
    windows = measure_windows(backend, frames, views, repeats)
    bare = {r["views"]: r["infer_ms"] for r in windows if "error" not in r}
    pipeline = []
    for n in views:
        if n in bare:  # not after running out of GPU memory
            _log(f"pipeline with windows of {n} views ...")
            pipeline.append(measure_pipeline(backend, seq, n, repeats))
    _log("fusion ...")
    fusion = measure_fusion(device, repeats, args.fusion_keyframes)
    placement = None
    if args.placement_keyframes > 0:
        _log(f"placement at {args.placement_keyframes} keyframes ...")
        placement = measure_placement(device, args.placement_keyframes, repeats)
    grid = next((r["model_grid"] for r in windows if "model_grid" in r), "n/a")
    precision = ("bf16 autocast, memory-efficient inference" if device.type == "cuda"
                 else "fp32, memory-efficient inference")
    return {
        "machine": machine_info(device),
        "model": model,
        "settings": {"input": f"{WIDTH}x{HEIGHT}", "model_grid": grid, "precision": precision, "repeats": repeats,
                     "priors": ["pose", "calibration"], "views": views},
        "windows": windows,
        "pipeline": pipeline,
        "fusion": fusion,
        "placement": placement,
    }


def _log(message: str) -> None:
    print(f"[bench_gpu] {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mapany_ros.bench.gpu",
                                     description="Time the MapAnything path (upstream infer, adapter, pipeline, "
                                                 "fusion) on the device torch sees, with random weights.")
    parser.add_argument("--size", choices=sorted(SIZES), default="full",
                        help="full: the published architecture (1.23 B parameters); reduced: 88.5 M, for CPUs")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--views", type=int, nargs="+", default=list(DEFAULT_VIEWS), help="window sizes (>= 2)")
    parser.add_argument("--repeats", type=int, default=0, help="timed runs per figure (default 5 on CUDA, 2 on CPU)")
    parser.add_argument("--fusion-keyframes", type=int, default=8, help="keyframes of the fusion timing (default 8)")
    parser.add_argument("--placement-keyframes", type=int, default=2000,
                        help="keyframes in the map when placement is timed (default 2000; 0 skips it)")
    parser.add_argument("--out", type=Path, help="write the markdown section here too")
    parser.add_argument("--json", type=Path, help="write every figure as JSON here")
    parser.add_argument("--cache-dir", default="",
                        help="offline cache with torch/hub/facebookresearch_dinov2_main (default: $TORCH_HOME)")
    parser.add_argument("--configs", help="upstream's configs/ folder when it is not beside the installed package")
    parser.add_argument("--model-dir", help="use this config.json + model.safetensors instead of building one")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if any(n < 2 for n in args.views) or args.repeats < 0 or args.fusion_keyframes < 1 or args.placement_keyframes < 0:
        build_parser().error("--views must be >= 2, --repeats >= 0, --fusion-keyframes >= 1 and "
                             "--placement-keyframes >= 0")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # upstream prints progress; stdout is the report
            report = run(args)
    except SetupError as exc:
        print(f"bench_gpu: cannot measure: {exc}", file=sys.stderr)
        return 2
    lines = render_markdown(report)
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())
