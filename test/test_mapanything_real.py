"""MapAnythingBackend on the real upstream code (a reduced model with random weights).

Skipped unless ``mapanything`` imports and ``MAPANY_TEST_MODEL_PATH`` names a directory with
config.json + model.safetensors; ``MAPANY_TEST_CACHE_DIR`` (optional) is the cache_dir holding
torch/hub/facebookresearch_dinov2_main. Random weights: these tests check the plumbing (shapes,
NaN borders, rigid finite poses, K sizes, points that agree with depth and pose in the model's own
frame, that upstream accepts every input we build), never accuracy; placing windows in the map is
the placement stage's job and is not run here. ``MAPANY_TEST_TIMINGS=1`` also prints adapter vs
model time for 2 and 8 views.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from saved_environ import saved_environ
from scipy.spatial.transform import Rotation

from mapany_ros.core.backends.base import resolve_device
from mapany_ros.core.backends.mapanything import MapAnythingBackend, MapAnythingConfig
from mapany_ros.core.frames import CameraModel, Frame
from mapany_ros.core.geometry import invert, is_rigid, make_pose, pixel_rays

MODEL_PATH = os.environ.get("MAPANY_TEST_MODEL_PATH", "")
CACHE_DIR = os.environ.get("MAPANY_TEST_CACHE_DIR", "")

pytestmark = [
    pytest.mark.mapanything,
    pytest.mark.skipif(
        importlib.util.find_spec("mapanything") is None, reason="mapanything is not installed"
    ),
]
needs_model = pytest.mark.skipif(
    not MODEL_PATH or not (Path(MODEL_PATH) / "model.safetensors").is_file(),
    reason="MAPANY_TEST_MODEL_PATH does not point at a model directory",
)

WIDE = CameraModel(320, 180, np.array([[200.0, 0, 159.5], [0, 200.0, 89.5], [0, 0, 1]]))
FISHEYE = CameraModel(
    320,
    240,
    np.array([[160.0, 0, 160.2], [0, 160.0, 119.7], [0, 0, 1]]),
    "equidistant",
    np.array([0.05, -0.01, 0.002, 0.0]),
)


@pytest.mark.parametrize("width, height", [(160, 120), (200, 120), (320, 180), (641, 479), (480, 640)])
def test_double_preprocess_matches_upstream(width, height):
    """The test double's preprocess_inputs is upstream's: same grid, K, pixels and depth."""
    from mapanything.utils.image import preprocess_inputs
    from mapanything_double import MapAnythingDouble

    rng = np.random.default_rng(width)
    K = np.array(
        [[0.8 * width, 0, width / 2 - 0.3], [0, 0.8 * width, height / 2 + 0.2], [0, 0, 1]], np.float32
    )
    views = [
        {
            "img": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
            "intrinsics": K,
            "depth_z": rng.uniform(1, 5, (height, width)).astype(np.float32),
        },
        {"img": rng.integers(0, 256, (height, width, 3), dtype=np.uint8)},
    ]
    real = preprocess_inputs([dict(v) for v in views])
    fake = MapAnythingDouble().preprocess_inputs([dict(v) for v in views])
    for r, f in zip(real, fake, strict=True):
        assert set(r) == set(f) and r["img"].shape == f["img"].shape and r["img"].dtype == f["img"].dtype
        assert torch.allclose(r["img"], f["img"], atol=1e-5)
    assert torch.allclose(real[0]["intrinsics"], fake[0]["intrinsics"], atol=1e-4)
    assert real[0]["intrinsics"].dtype == fake[0]["intrinsics"].dtype == torch.float32
    assert torch.equal(real[0]["depth_z"], fake[0]["depth_z"])


@pytest.fixture(scope="module")
def backends():
    """One backend per output resolution, loaded once: loading is the slow part.

    One is built from a config, the other as every backend plugin is (device + options).
    """
    old_hub = torch.hub.get_dir()
    made = {}
    try:
        with saved_environ(("HF_HUB_OFFLINE", "TORCH_HOME")):
            t0 = time.perf_counter()
            made["input"] = MapAnythingBackend(
                MapAnythingConfig(model_path=MODEL_PATH, cache_dir=CACHE_DIR, device="auto", warmup=True)
            )
            made["load_s_input"] = time.perf_counter() - t0
            made["model"] = MapAnythingBackend(
                device=resolve_device("auto"),
                model_path=MODEL_PATH,
                cache_dir=CACHE_DIR,
                output_resolution="model",
                warmup=False,
            )
            yield made
    finally:
        torch.hub.set_dir(old_hub)


def frames_for(
    camera: CameraModel, n: int, posed: bool | list[bool] = True, depth: bool = False, seed: int = 0
) -> list[Frame]:
    rng = np.random.default_rng(seed)
    posed = [posed] * n if isinstance(posed, bool) else posed
    v, u = np.mgrid[0 : camera.height, 0 : camera.width]
    frames = []
    for i in range(n):
        # Smooth texture plus noise: something for the encoder, not for accuracy.
        base = 127 + 60 * np.sin(u[..., None] / (7 + i) + v[..., None] / 11 + np.arange(3))
        image = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        R = Rotation.from_euler("y", 0.05 * i).as_matrix()
        T = make_pose(R, [0.25 * i, 0.02 * i * i, 0.1 * i]) if posed[i] else None
        d = np.full((camera.height, camera.width), 3.0, np.float32) if depth else None
        if d is not None:
            d[:10] = np.nan
        frames.append(Frame(image, i, "cam", "cam_optical", camera, T, d))
    return frames


def check_window(out, frames, resolution: str) -> None:
    """Plumbing of one window in the model's own frame: sizes, dtypes, NaN where invalid, and
    points that are the depth along the output grid's rays placed by the view's pose."""
    assert len(out.views) == len(frames)
    assert set(out.timings_s) == {"preprocess", "infer", "postprocess"}
    assert out.metric_scale is not None and np.isfinite(out.metric_scale)
    assert out.metric and out.alignment_residual_m is None  # placement, not the adapter, fills it
    for view, frame in zip(out.views, frames, strict=True):
        if resolution == "input":
            assert view.depth.shape == (frame.height, frame.width)
            assert np.allclose(view.K, frame.camera_model.K)
            assert view.colors.shape == (frame.height, frame.width, 3)
        else:
            h, w = view.depth.shape
            assert h % 14 == 0 and w % 14 == 0 and max(h, w) == 518
            assert view.colors.shape == (h, w, 3)
        assert view.K.shape == (3, 3) and view.K.dtype == np.float64
        assert view.depth.dtype == torch.float32 and view.valid.dtype == torch.bool
        assert view.points_world.shape == (*view.depth.shape, 3)
        assert view.T_world_camera.dtype == np.float64 and is_rigid(view.T_world_camera)
        depth = view.depth.float().cpu()
        valid = view.valid.cpu()
        assert torch.all(torch.isnan(depth[~valid]))
        assert torch.all(torch.isfinite(depth[valid])) and torch.all(depth[valid] > 0)
        assert torch.all(torch.isfinite(view.points_world.cpu()[valid]))
        if frame.camera_model.is_pinhole and valid.any():
            T = torch.as_tensor(invert(view.T_world_camera), dtype=torch.float32)
            local = view.points_world.float().cpu() @ T[:3, :3].T + T[:3, 3]
            h, w = depth.shape
            expected = pixel_rays(view.K, h, w) * depth[..., None]
            assert torch.allclose(local[valid], expected[valid], rtol=1e-3, atol=1e-3)


@needs_model
def test_double_outputs_match_upstream_keys_shapes_and_dtypes(backends):
    """Each output key the double returns exists upstream with the same shape and dtype."""
    from mapanything.utils.image import preprocess_inputs
    from mapanything_double import MapAnythingDouble

    frames = frames_for(WIDE, 2)
    double = MapAnythingDouble()
    for f in frames:
        double.register(f.image, f.camera_model, f.T_world_camera)
    views = [{"img": f.image, "intrinsics": f.camera_model.K.astype(np.float32)} for f in frames]
    # Every kind of prior the adapter hands over, so the double's answer to them is checked too.
    for view, f in zip(views, frames, strict=True):
        view["camera_poses"] = (invert(frames[0].T_world_camera) @ f.T_world_camera).astype(np.float32)
        view["is_metric_scale"] = torch.tensor([True])
    views[1]["depth_z"] = np.full((WIDE.height, WIDE.width), 3.0, np.float32)
    model = backends["input"]._model
    kwargs = dict(use_amp=False, memory_efficient_inference=True)
    real = model.infer(preprocess_inputs([dict(v) for v in views]), **kwargs)
    fake = double.infer(model, double.preprocess_inputs([dict(v) for v in views]), **kwargs)
    for r, f in zip(real, fake, strict=True):
        assert set(f) == set(r), set(f) ^ set(r)
        for key in f:
            assert tuple(f[key].shape) == tuple(r[key].shape) and f[key].dtype == r[key].dtype, key
        masked = ~r["mask"]
        assert torch.all(r["depth_z"][masked] == 0)  # upstream zeroes what it masks
        assert torch.all(r["conf"] >= 1)


@needs_model
def test_infer_counts_a_view_without_is_metric_scale_as_metric(backends):
    """Upstream's infer sets a missing is_metric_scale to True (the double does the same): pose
    priors without the flag give the answer of metric ones, and differ from is_metric_scale False."""
    from mapanything.utils.image import preprocess_inputs

    frames = frames_for(WIDE, 2)
    model = backends["input"]._model

    def run(flag: bool | None) -> torch.Tensor:
        views = []
        for f in frames:
            view = {"img": f.image, "intrinsics": f.camera_model.K.astype(np.float32),
                    "camera_poses": (invert(frames[0].T_world_camera) @ f.T_world_camera).astype(np.float32)}
            if flag is not None:
                view["is_metric_scale"] = torch.tensor([flag])
            views.append(view)
        out = model.infer(preprocess_inputs(views), use_amp=False, apply_mask=False, mask_edges=False)
        return torch.cat([o["pts3d"].flatten() for o in out] + [o["metric_scaling_factor"].flatten() for o in out])

    missing, metric, relative = run(None), run(True), run(False)
    assert torch.equal(missing, metric)
    assert not torch.allclose(missing, relative, rtol=1e-4, atol=1e-6)


@needs_model
def test_posed_window_at_input_resolution_has_nan_crop_border(backends):
    frames = frames_for(WIDE, 3)
    out = backends["input"].infer(frames)
    check_window(out, frames, "input")
    # 320x180 -> bucket 518x294: 518x291 does not cover, so 524x294 and 3 model columns cropped per side.
    for view in out.views:
        assert torch.all(torch.isnan(view.depth[:, 0].cpu())) and torch.all(
            torch.isnan(view.depth[:, -1].cpu())
        )


@needs_model
def test_model_resolution_unposed_first_view_and_depth_prior(backends):
    frames = frames_for(WIDE, 3, posed=[False, True, True], depth=True)
    out = backends["model"].infer(frames)
    check_window(out, frames, "model")
    assert out.views[0].depth.shape == (294, 518)


@needs_model
def test_distorted_camera_runs_through_ray_directions(backends):
    frames = frames_for(FISHEYE, 2)
    out = backends["input"].infer(frames)
    check_window(out, frames, "input")


@needs_model
def test_window_without_priors(backends):
    frames = frames_for(WIDE, 2, posed=False)
    out = backends["input"].infer(frames)
    check_window(out, frames, "input")


@needs_model
@pytest.mark.skipif(os.environ.get("MAPANY_TEST_TIMINGS") != "1", reason="set MAPANY_TEST_TIMINGS=1")
@pytest.mark.parametrize("n", [2, 8])
def test_report_timings(backends, n):
    backend = backends["input"]
    frames = frames_for(CameraModel(640, 480, np.array([[500.0, 0, 319.5], [0, 500.0, 239.5], [0, 0, 1]])), n)
    backend.infer(frames)  # first call at this size fills the ray cache
    runs = [backend.infer(frames).timings_s for _ in range(2)]
    best = {k: min(r[k] for r in runs) for k in runs[0]}
    print(
        f"\n[timings] {n} views 640x480 on {backend.device}: "
        + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in best.items())
        + f"; load {backends['load_s_input']:.1f} s"
    )
