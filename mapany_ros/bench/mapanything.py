"""MapAnything adapter overhead for `make bench`: our pre/post-processing vs upstream `infer`.

Runs only where upstream MapAnything is installed and ``MAPANY_BENCH_MODEL_PATH`` (or
``MAPANY_TEST_MODEL_PATH``) names a model folder (config.json + model.safetensors); a reduced
random-weight model gives real timings of the code path since compute does not depend on weight
values. Elsewhere the section says what was not measured instead of inventing figures.
"""

from __future__ import annotations

import os
import statistics

VIEWS = (2, 8, 16)


def bench_adapter(width: int = 640, height: int = 480, repeats: int = 2) -> list[str]:
    """Markdown lines: per window size, preprocess / infer / postprocess medians and the overhead ratio."""
    lines = ["## MapAnything adapter overhead per window", ""]
    model_path = os.environ.get("MAPANY_BENCH_MODEL_PATH") or os.environ.get("MAPANY_TEST_MODEL_PATH")
    try:
        import mapanything  # noqa: F401
    except ImportError:
        return lines + ["Not measured in this run: upstream MapAnything is not installed in this environment. "
                        "docs/bench_gpu.md (make bench-gpu) holds the last measurement of the MapAnything path.", ""]
    if not model_path:
        return lines + ["Not measured in this run: set MAPANY_BENCH_MODEL_PATH to a model folder.", ""]
    import torch

    from mapany_ros.core.backends.mapanything import MapAnythingBackend, MapAnythingConfig
    from mapany_ros.sim.scene import make_sequence

    cache = os.environ.get("MAPANY_BENCH_CACHE_DIR") or os.environ.get("MAPANY_TEST_CACHE_DIR", "")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = MapAnythingBackend(MapAnythingConfig(model_path=model_path, cache_dir=cache, device=device))
    n_params = sum(p.numel() for p in backend._model.parameters())
    seq = make_sequence(0, width, height, max(VIEWS), 10.0)
    frames = seq.to_frames(camera="camera", frame_id="camera_optical_frame")
    lines += [
        f"Model: {model_path} ({n_params / 1e6:.1f} M parameters), device {device}, input {width}x{height}, "
        f"pose + calibration priors, output at input resolution. Median of {repeats} windows after one warm-up.",
        "",
        "| views | preprocess ms | infer ms | postprocess ms | adapter / infer |",
        "|---|---|---|---|---|",
    ]
    for n in VIEWS:
        backend.infer(frames[:n])
        runs = [backend.infer(frames[:n]).timings_s for _ in range(repeats)]
        pre = statistics.median(r["preprocess"] for r in runs)
        inf = statistics.median(r["infer"] for r in runs)
        post = statistics.median(r["postprocess"] for r in runs)
        ratio = (pre + post) / inf * 100
        lines.append(f"| {n} | {pre * 1e3:.0f} | {inf * 1e3:.0f} | {post * 1e3:.0f} | {ratio:.1f} % |")
    return lines + [""]
