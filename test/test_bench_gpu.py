"""``mapany_ros.bench.gpu`` keeps working without a GPU or upstream MapAnything.

The measurements run on CPU against the contract double (test/mapanything_double.py) loaded
through the adapter's real loader from a prepared model directory: the report must hold one real,
measured number for every figure, and the pipeline section must include placement and fusion.
Without upstream, its configs or the DINOv2 hub code the command exits 2 naming what to install,
never with a traceback. Where upstream is installed (marker ``mapanything``) the reduced model is
also built from its own configs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mapanything_double import MapAnythingDouble, double_env

from mapany_ros.bench import gpu as bench_gpu

REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALL = "pip install git+https://github.com/facebookresearch/map-anything"


@pytest.fixture
def env(tmp_path, monkeypatch, request):
    return double_env(tmp_path, monkeypatch, request, MapAnythingDouble(seed=0))


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_report_on_a_prepared_model(env, tmp_path, capsys):
    md, js = tmp_path / "gpu.md", tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--views", "2", "3", "--repeats", "1", "--fusion-keyframes", "2",
            "--placement-keyframes", "24", "--model-dir", str(env.model_dir),
            "--cache-dir", str(env.cache), "--out", str(md), "--json", str(js)]
    assert bench_gpu.main(argv) == 0
    report = json.loads(js.read_text())

    assert report["machine"]["device"] == "cpu" and report["machine"]["torch"]
    assert report["settings"]["model_grid"] == "518x392" and report["settings"]["input"] == "640x480"
    assert report["model"]["parameters"] > 0 and _positive(report["model"]["load_s"])
    windows = {r["views"]: r for r in report["windows"]}
    assert sorted(windows) == [2, 3]
    for r in windows.values():
        for key in ("infer_ms", "infer_hz", "adapter_ms", "preprocess_ms", "postprocess_ms"):
            assert _positive(r[key]), (key, r[key])
        assert math.isfinite(r["adapter_overhead_ms"]) and math.isfinite(r["adapter_overhead_fraction"])
        assert r["peak_memory_gib"] is None  # no GPU: n/a, not a made-up figure
        assert r["infer_hz"] == pytest.approx(1e3 / r["infer_ms"])
    assert windows[2]["published_hz"] == 25.0 and windows[3]["published_hz"] is None

    pipeline = {p["views"]: p for p in report["pipeline"]}
    assert sorted(pipeline) == [2, 3]
    for p in pipeline.values():
        assert p["windows"] == 1 and p["overlap"] == min(2, p["views"] - 1)
        for key in ("window_ms", "bare_infer_ms", "backend_ms", "placement_ms", "fusion_ms"):
            assert _positive(p[key]), (key, p[key])
        assert p["window_ms"] >= p["backend_ms"] + p["placement_ms"]
        assert math.isfinite(p["overhead_ms"]) and math.isfinite(p["overhead_fraction"])
        assert p["views_placed"] >= 1 and p["voxels"] > 0  # placement accepted views and fusion made voxels

    fusion = report["fusion"]
    for key in ("integrate_ms", "integrate_max_ms", "update_pose_ms", "points_ms", "num_voxels"):
        assert _positive(fusion[key]), (key, fusion[key])
    placement = report["placement"]
    assert "error" not in placement, placement["error"]
    assert placement["keyframes"] == 24 and placement["resolution"] == "518x392"
    for mode in ("odometry", "overlap"):
        stages = placement[mode]["stages_ms"]
        assert {"view checks", "refinement", "local check"} <= set(stages), stages
        assert all(_positive(v) for k, v in stages.items() if k in ("view checks", "refinement")), stages
        assert placement[mode]["window_ms"] >= sum(stages.values()) * 0.99  # the stages lie within the window

    text = md.read_text()
    assert text.startswith("## MapAnything path (cpu)")
    assert "published rate" in text and "~25 Hz" in text and "placement" in text and "fusion" in text.lower()
    assert "Placement per window of 8 views at 518x392, 24 keyframes in the map, on cpu" in text
    assert "| **the window** (target <= 15 ms) |" in text
    rows = [line for line in text.splitlines() if line.startswith(("| 2 |", "| 3 |"))]
    assert len(rows) == 4 and not any("nan" in row or "inf" in row.split("|")[2] for row in rows)
    assert capsys.readouterr().out.strip() == text.strip()  # stdout is the report alone

    # The same report as a GPU run fills it (CI has no GPU to run that branch).
    report["machine"].update(device="cuda", gpu="Some GPU", gpu_memory_gib=80.0, cuda="12.8")
    report["model"]["weights_memory_gib"] = 4.6
    for r in report["windows"]:
        r["peak_memory_gib"] = 7.3
    gpu_text = "\n".join(bench_gpu.render_markdown(report))
    assert gpu_text.startswith("## MapAnything path (cuda, Some GPU)") and "7.3 GiB" in gpu_text
    assert "4.6 GiB on the GPU" in gpu_text and "CUDA 12.8" in gpu_text


def test_without_upstream_exits_2_with_the_install_hint(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mapanything", None)  # import mapanything -> ImportError
    assert bench_gpu.main(["--size", "reduced", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert INSTALL in captured.err and "Traceback" not in captured.err + captured.out
    assert captured.out == ""


@pytest.mark.skipif(importlib.util.find_spec("mapanything") is not None, reason="upstream is installed here")
def test_cli_without_upstream_exits_2():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "mapany_ros.bench.gpu", "--size", "reduced", "--device", "cpu"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert INSTALL in proc.stderr and "Traceback" not in proc.stderr and proc.stdout == ""


def test_missing_configs_and_hub_code_exit_2(env, tmp_path, capsys):
    # The double has no source tree beside it, as a non-editable pip install of upstream.
    assert bench_gpu.main(["--size", "reduced", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--configs" in err and "Traceback" not in err

    configs = tmp_path / "configs"
    (configs / "model").mkdir(parents=True)
    (configs / "train.yaml").write_text("defaults: []\n")
    (configs / "model" / "mapanything.yaml").write_text("model_str: mapanything\n")
    empty_cache = tmp_path / "empty_cache"
    argv = ["--size", "reduced", "--device", "cpu", "--configs", str(configs), "--cache-dir", str(empty_cache)]
    assert bench_gpu.main(argv) == 2
    err = capsys.readouterr().err
    assert "facebookresearch_dinov2_main" in err and "mapany-ros prefetch" in err and "Traceback" not in err


def test_bad_arguments_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_gpu.main(["--views", "1"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        bench_gpu.main(["--placement-keyframes", "-1"])
    assert exc.value.code == 2


@pytest.mark.mapanything
@pytest.mark.skipif(importlib.util.find_spec("mapanything") is None, reason="mapanything is not installed")
def test_reduced_model_from_upstream_configs(tmp_path):
    """Upstream's configs compose into the 88.5 M reduced model, built offline and loadable by the adapter."""
    try:
        configs = bench_gpu.find_configs(os.environ.get("MAPANY_BENCH_CONFIGS"))
        bench_gpu.prepare_hub(os.environ.get("MAPANY_TEST_CACHE_DIR", ""))
    except bench_gpu.SetupError as exc:
        pytest.skip(str(exc))
    import torch

    info = bench_gpu.build_random_model(tmp_path / "reduced", "reduced", configs)
    assert info["dense_head_set_valid"]
    config = json.loads((tmp_path / "reduced" / "config.json").read_text())
    assert config["encoder_config"]["torch_hub_pretrained"] is False
    backend = bench_gpu.load_backend(tmp_path / "reduced", os.environ.get("MAPANY_TEST_CACHE_DIR", ""),
                                     torch.device("cpu"))
    assert sum(p.numel() for p in backend._model.parameters()) == pytest.approx(88.5e6, rel=0.01)
