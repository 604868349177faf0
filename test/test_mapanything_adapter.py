"""MapAnythingBackend against a contract-enforcing double that uses its priors.

The adapter answers in the model's own frame (placement moves windows into the map), so these
tests check what the adapter is responsible for: every view of a window in one consistent frame
(relative poses, metric depth, points = pose * (depth * ray)), masked and cropped pixels NaN,
the model grid and its K, distortion handed over as rays, the view order, OOM splits that still
give one frame, and loading offline from safetensors only. The double answers like upstream
(anchored on view 0 as predicted, random offset, masked pixels zeroed) and follows the poses,
depth and calibration it is given, so a wrong hand-over shows up as wrong geometry here.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from mapanything_double import (
    DoubleEnv,
    MapAnythingDouble,
    PlaneScene,
    double_env,
    make_backend,
    model_config,
    project_pixels,
    state_dict,
    true_rays,
    write_model_dir,
)
from scipy.spatial.transform import Rotation

from mapany_ros.core.backends.base import BackendError, ViewPrediction, WindowPrediction
from mapany_ros.core.backends.mapanything import MapAnythingBackend, MapAnythingConfig, share_out
from mapany_ros.core.frames import CameraModel, Frame
from mapany_ros.core.geometry import invert, is_rigid, make_pose

PINHOLE = CameraModel(160, 120, np.array([[120.0, 0, 79.5], [0, 120.0, 59.5], [0, 0, 1]]))
WIDE = CameraModel(200, 120, np.array([[110.0, 0, 99.5], [0, 110.0, 59.5], [0, 0, 1]]))
CHECK_SCENE = PlaneScene.room()


@pytest.fixture
def env(tmp_path, monkeypatch, request) -> DoubleEnv:
    return double_env(tmp_path, monkeypatch, request, MapAnythingDouble(seed=1))


def random_pose(rng: np.random.Generator) -> np.ndarray:
    """A camera inside PlaneScene.room() looking roughly along +z."""
    R = Rotation.from_euler(
        "yxz", [rng.uniform(-0.35, 0.35), rng.uniform(-0.15, 0.15), rng.uniform(-0.08, 0.08)]
    )
    return make_pose(R.as_matrix(), [rng.uniform(-1, 1), rng.uniform(-0.3, 0.3), rng.uniform(-1, 1)])


def make_frames(
    env: DoubleEnv,
    n: int,
    camera: CameraModel = PINHOLE,
    posed: bool | list[bool] = True,
    depth_prior: bool = False,
    seed: int = 0,
    prior_frame: np.ndarray | None = None,
) -> tuple[list[Frame], list[np.ndarray]]:
    """Frames with registered truth; pose priors are the truth, expressed in ``prior_frame`` if given."""
    rng = np.random.default_rng(seed)
    posed = [posed] * n if isinstance(posed, bool) else posed
    frames, truth = [], []
    for i in range(n):
        T = random_pose(rng)
        image = rng.integers(0, 256, (camera.height, camera.width, 3), dtype=np.uint8)
        env.double.register(image, camera, T)
        depth = CHECK_SCENE.depth_z(camera, T) if depth_prior else None
        prior = (prior_frame @ T if prior_frame is not None else T) if posed[i] else None
        frames.append(Frame(image, 1_000_000 * i, "cam", "cam_optical", camera, prior, depth))
        truth.append(T)
    return frames, truth


def camera_points(camera: CameraModel, depth: np.ndarray) -> np.ndarray:
    """(H, W, 3) camera-frame points of a z-depth map along the camera's true rays."""
    v, u = np.mgrid[0 : camera.height, 0 : camera.width].astype(np.float64)
    rays = true_rays(camera, u.ravel(), v.ravel()).reshape(camera.height, camera.width, 3)
    return rays / rays[..., 2:3] * depth[..., None]


def in_camera(view: ViewPrediction) -> np.ndarray:
    """The view's points carried back into its own camera frame through its own pose."""
    T = invert(view.T_world_camera)
    return view.points_world.double().numpy() @ T[:3, :3].T + T[:3, 3]


def assert_depth_close(depth: np.ndarray, truth: np.ndarray, rtol: float = 5e-3) -> None:
    """Bulk tight (median), creases and the half-pixel crop edge loose (max)."""
    rel = np.abs(depth - truth) / truth
    assert np.median(rel) < 5e-5 and np.percentile(rel, 99) < 2e-3 and rel.max() < rtol, (
        np.median(rel),
        np.percentile(rel, 99),
        rel.max(),
    )


def check_view(view: ViewPrediction, camera: CameraModel, T: np.ndarray, scale: float, rtol: float) -> None:
    """Depth of an input-resolution view is ``scale`` x the ray-cast truth; its points are its depth
    along its rays, placed by its pose; invalid pixels are NaN.

    Bilinear resampling is exact on a plane up to curvature of 1/z; only the creases where two
    planes meet deviate more, so the bulk tolerance is tight and the worst-case one loose.
    """
    assert view.depth.shape == (camera.height, camera.width)
    assert is_rigid(view.T_world_camera) and view.T_world_camera.dtype == np.float64
    truth = scale * CHECK_SCENE.depth_z(camera, T)
    depth = view.depth.numpy()
    valid = view.valid.numpy()
    assert valid.mean() > 0.6
    assert np.all(np.isnan(depth[~valid])) and np.all(np.isfinite(depth[valid]))
    assert_depth_close(depth[valid], truth[valid], rtol)
    pts = in_camera(view)
    err = np.linalg.norm(pts[valid] - camera_points(camera, truth)[valid], axis=-1)
    assert np.median(err) < 5e-4 * scale and np.percentile(err, 99) < 2e-2 and err.max() < rtol * 10
    assert np.all(np.isnan(view.points_world.numpy()[~valid]))


def check_relative_poses(
    out: WindowPrediction, truth: list[np.ndarray], scale: float = 1.0, atol: float = 1e-4
) -> None:
    """Every view's pose relative to view 0 is the truth's, translations at the window's scale."""
    P0, T0 = out.views[0].T_world_camera, truth[0]
    for view, T in zip(out.views, truth, strict=True):
        rel, rel_true = invert(P0) @ view.T_world_camera, invert(T0) @ T
        assert np.allclose(rel[:3, :3], rel_true[:3, :3], atol=1e-5)
        assert np.allclose(rel[:3, 3], scale * rel_true[:3, 3], atol=atol)


def check_window(
    out: WindowPrediction, frames: list[Frame], truth: list[np.ndarray], scale: float = 1.0, rtol: float = 5e-3
) -> None:
    """The whole window in one model frame at ``scale`` (1: metres), consistent with the truth."""
    assert len(out.views) == len(frames)
    check_relative_poses(out, truth, scale)
    for view, frame, T in zip(out.views, frames, truth, strict=True):
        check_view(view, frame.camera_model, T, scale, rtol)


def model_grid_truth(camera: CameraModel, K_model: np.ndarray, h: int, w: int, T: np.ndarray):
    """Depth and camera-frame points of the model grid, from the pixel map the returned K implies."""
    A = camera.K @ np.linalg.inv(K_model)
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    rays = true_rays(camera, (A[0, 0] * u + A[0, 2]).ravel(), (A[1, 1] * v + A[1, 2]).ravel())
    t = CHECK_SCENE.ray_distance(T[:3, 3], rays @ T[:3, :3].T)
    return (rays[:, 2] * t).reshape(h, w), (rays * t[:, None]).reshape(h, w, 3)


# --------------------------------------------------------------------------------------------
# One model frame


def test_posed_window_comes_back_in_one_metric_model_frame(env):
    backend = make_backend(env)
    frames, truth = make_frames(env, 4)
    out = backend.infer(frames)
    check_window(out, frames, truth)
    # The model's own frame, untouched: view 0 where upstream put it, nowhere near the priors.
    scale, offset = env.double.pred_frames[-1]
    assert scale == 1.0 and np.allclose(out.views[0].T_world_camera, offset, atol=1e-5)
    assert not np.allclose(out.views[0].T_world_camera, truth[0], atol=0.1)
    for view, frame in zip(out.views, frames, strict=True):
        assert np.allclose(view.K, frame.camera_model.K)
        assert view.colors.dtype == torch.uint8 and np.array_equal(view.colors.numpy(), frame.image)
        assert view.confidence.shape == view.depth.shape
    assert out.metric and out.alignment_residual_m is None
    assert out.metric_scale == pytest.approx(1.25)
    assert set(out.timings_s) == {"preprocess", "infer", "postprocess"}
    kwargs = env.double.calls[-1]["kwargs"]
    assert kwargs["use_amp"] is False and kwargs["amp_dtype"] == "bf16"
    assert kwargs["memory_efficient_inference"] is True and kwargs["apply_mask"] is True
    for view, T in zip(env.double.preprocess_calls[-1], truth, strict=True):
        assert view["camera_poses"].dtype == np.float32 and bool(view["is_metric_scale"][0])
        assert np.allclose(view["camera_poses"], invert(truth[0]) @ T, atol=1e-5)  # relative to view 0


def test_far_odometry_coordinates_lose_no_precision(env):
    """Poses 100 km from the odometry origin: relative poses are made in float64, then cast."""
    far = make_pose(Rotation.from_euler("z", 2.0).as_matrix(), [1e5, -2e5, 3e4])
    backend = make_backend(env)
    frames, truth = make_frames(env, 3, prior_frame=far)
    out = backend.infer(frames)
    check_relative_poses(out, truth, atol=1e-5)


def test_model_resolution_output_uses_upstream_grid_and_K(env):
    backend = make_backend(env, output_resolution="model")
    frames, truth = make_frames(env, 3)
    out = backend.infer(frames)
    check_relative_poses(out, truth)
    processed = env.double.calls[-1]["views"]
    for view, frame, T, pv in zip(out.views, frames, truth, processed, strict=True):
        assert view.depth.shape == (392, 518) and view.colors.shape == (392, 518, 3)
        K_model = pv["intrinsics"][0].double().numpy()
        assert np.allclose(view.K, K_model)
        depth, points = model_grid_truth(frame.camera_model, K_model, 392, 518, T)
        valid = view.valid.numpy()
        assert 0.8 < valid.mean() < 0.99  # the double masks 1 in 13 pixels
        assert np.allclose(view.depth.numpy()[valid], depth[valid], rtol=1e-5)
        assert np.allclose(in_camera(view)[valid], points[valid], atol=1e-4)


def test_masked_pixels_are_nan_not_points_at_the_camera(env):
    backend = make_backend(env, output_resolution="model")
    frames, _ = make_frames(env, 2)
    out = backend.infer(frames)
    v, u = np.mgrid[0:392, 0:518]
    masked = (u // 9 + v // 7) % 13 == 0
    for view in out.views:
        assert not view.valid.numpy()[masked].any()
        assert np.all(np.isnan(view.depth.numpy()[masked]))
        assert np.all(np.isnan(view.points_world.numpy()[masked]))
        centre = view.T_world_camera[:3, 3]
        finite = view.points_world.numpy()[view.valid.numpy()]
        assert np.min(np.linalg.norm(finite - centre, axis=-1)) > 1.0  # no zeroed pixel became a point


def test_centre_cropped_border_is_nan_at_input_resolution(env):
    backend = make_backend(env)
    frames, truth = make_frames(env, 2, camera=WIDE)
    out = backend.infer(frames)
    # 200x120 -> bucket 518x294: cover-resize to 518x310, 8 model rows cropped top and bottom (~3 input rows)
    for view in out.views:
        depth = view.depth.numpy()
        assert np.all(np.isnan(depth[:3])) and np.all(np.isnan(depth[-3:]))
        assert not view.valid.numpy()[:3].any() and np.all(view.confidence.numpy()[:3] == 0)
        assert np.isfinite(depth[4:-4]).mean() > 0.7
    check_window(out, frames, truth)


def test_unposed_first_frame_is_moved_behind_a_posed_one_and_order_restored(env):
    backend = make_backend(env)
    frames, truth = make_frames(env, 4, posed=[False, True, True, True])
    out = backend.infer(frames)
    call = env.double.preprocess_calls[-1]
    assert np.array_equal(call[0]["img"], frames[1].image) and np.array_equal(call[1]["img"], frames[0].image)
    assert "camera_poses" in call[0] and "camera_poses" not in call[1]
    assert np.allclose(call[0]["camera_poses"], np.eye(4), atol=1e-6)  # poses relative to the posed view 0
    check_window(out, frames, truth)
    # frames[1] was the model's view 0: it sits exactly where upstream anchored the prediction.
    assert np.allclose(out.views[1].T_world_camera, env.double.pred_frames[-1][1], atol=1e-5)


def test_without_priors_the_window_keeps_the_model_scale(env):
    backend = make_backend(env)
    frames, truth = make_frames(env, 3, posed=False)
    out = backend.infer(frames)
    scale = env.double.pred_frames[-1][0]
    assert scale != pytest.approx(1.0, abs=1e-3)  # no metric prior: the double's scale is off
    check_window(out, frames, truth, scale)
    assert "camera_poses" not in env.double.calls[-1]["views"][0]


def test_depth_prior_in_metres_makes_an_unposed_window_metric(env):
    """The depth prior is the only metric input; upstream resizes it nearest, so the bulk is looser."""
    backend = make_backend(env)
    frames, truth = make_frames(env, 3, posed=False, depth_prior=True)
    out = backend.infer(frames)
    assert env.double.pred_frames[-1][0] == 1.0
    check_relative_poses(out, truth)
    for view, T in zip(out.views, truth, strict=True):
        valid = view.valid.numpy()
        gt = CHECK_SCENE.depth_z(PINHOLE, T)
        rel = np.abs(view.depth.numpy()[valid] - gt[valid]) / gt[valid]
        assert np.median(rel) < 2e-3 and np.percentile(rel, 90) < 1e-2


def test_prior_switches_control_what_upstream_receives(env):
    frames, truth = make_frames(env, 3, depth_prior=True)
    frames[1].depth[5:9, 5:9] = np.nan
    make_backend(env).infer(frames)
    call = env.double.preprocess_calls[-1]
    for view in call:
        assert view["img"].dtype == np.uint8 and view["intrinsics"].dtype == np.float32
        assert view["depth_z"].dtype == np.float32 and view["depth_z"].shape == (120, 160)
        assert bool(view["is_metric_scale"][0]) and view["camera_poses"].dtype == np.float32
    assert np.all(call[1]["depth_z"][5:9, 5:9] == 0)  # NaN -> upstream's "missing"
    assert np.array_equal(call[0]["depth_z"], frames[0].depth.astype(np.float32))  # metres, as given
    processed = env.double.calls[-1]["views"]
    assert processed[0]["depth_z"].shape == (1, 392, 518)

    for flags, absent in (
        (dict(use_pose_prior=False), {"camera_poses"}),
        (dict(use_depth_prior=False), {"depth_z"}),
        (dict(use_calibration_prior=False), {"intrinsics", "ray_directions", "depth_z"}),
    ):
        out = make_backend(env, **flags).infer(frames)
        for view in env.double.calls[-1]["views"]:
            assert not absent & set(view), flags
        check_relative_poses(out, truth)  # every variant keeps one metric frame
        assert env.double.pred_frames[-1][0] == 1.0, flags


@pytest.mark.parametrize(
    "model, D",
    [
        ("plumb_bob", [-0.28, 0.09, 0.0008, -0.0012, -0.015]),
        ("rational_polynomial", [0.6, -0.1, 0.001, 0.0005, 0.01, 0.9, -0.05, 0.02]),
        ("equidistant", [0.08, -0.03, 0.01, -0.002]),
    ],
)
def test_distorted_camera_goes_in_as_ray_directions(env, model, D):
    camera = CameraModel(
        200, 150, np.array([[130.0, 0, 101.3], [0, 131.0, 73.9], [0, 0, 1]]), model, np.array(D)
    )
    backend = make_backend(env)
    frames, truth = make_frames(env, 3, camera=camera)
    out = backend.infer(frames)
    processed = env.double.calls[-1]["views"]
    K_given = env.double.preprocess_calls[-1][0]["intrinsics"]  # what we gave preprocess_inputs
    assert np.allclose(K_given, camera.K)
    for pv in processed:
        assert "intrinsics" not in pv and pv["ray_directions"].shape == (1, 392, 518, 3)
        assert pv["ray_directions"].dtype == torch.float32
    # Brute force: project every ray back through the textbook model; it must land on the input
    # pixel that upstream's crop + resize put under that model pixel.
    rays = processed[0]["ray_directions"][0].double().numpy().reshape(-1, 3)
    A = next(g.A for g in env.double.grids.values() if g.truth.camera is camera)
    v, u = np.mgrid[0:392, 0:518].astype(np.float64)
    uv = project_pixels(camera, rays)
    assert np.abs(uv[:, 0] - (A[0, 0] * u + A[0, 2]).ravel()).max() < 2e-3
    assert np.abs(uv[:, 1] - (A[1, 1] * v + A[1, 2]).ravel()).max() < 2e-3
    check_window(out, frames, truth)
    for view in out.views:
        assert np.allclose(view.K, camera.K)


def test_float_images_are_refused(env):
    backend = make_backend(env)
    frames, _ = make_frames(env, 2)
    frames[0].image = frames[0].image.astype(np.float32)
    with pytest.raises(BackendError, match="uint8"):
        backend.infer(frames)


# --------------------------------------------------------------------------------------------
# Robustness


def relative_poses(out: WindowPrediction) -> list[np.ndarray]:
    P0 = out.views[0].T_world_camera
    return [invert(P0) @ view.T_world_camera for view in out.views]


def test_out_of_memory_split_gives_the_frame_of_the_unsplit_window(env, caplog):
    backend = make_backend(env)
    frames, truth = make_frames(env, 7, posed=[False, True, False, True, True, False, True])
    whole = backend.infer(frames)
    env.double.oom_above = 3
    env.double.calls.clear()
    with caplog.at_level(logging.WARNING):
        split = backend.infer(frames)
    assert "out of GPU memory" in caplog.text
    sizes = [len(c["views"]) for c in env.double.calls]
    assert sizes[0] == 7 and max(sizes[1:]) <= 4 and all(s <= 3 for s in sizes if s not in (7, 4))
    ref = env.double.calls[0]["views"][0]["img"]  # the first posed frame leads every part
    assert all(torch.equal(c["views"][0]["img"], ref) for c in env.double.calls)
    for a, b in zip(relative_poses(split), relative_poses(whole), strict=True):
        assert np.allclose(a, b, atol=1e-5)
    for a, b in zip(split.views, whole.views, strict=True):
        assert torch.equal(a.valid, b.valid)
        assert torch.allclose(a.depth[a.valid], b.depth[b.valid], rtol=1e-5)
    check_window(split, frames, truth)


def test_out_of_memory_without_priors_carries_parts_to_one_scale(env):
    """Every part comes back with its own offset and scale; the reference view ties them together."""
    backend = make_backend(env)
    frames, truth = make_frames(env, 5, posed=False)
    whole = backend.infer(frames)
    env.double.oom_above = 3
    split = backend.infer(frames)
    assert len(env.double.pred_frames) == 3  # the whole window, then 3 + 3 views (OOM answers nothing)
    (s_whole, _), (s_first, _), (s_second, _) = env.double.pred_frames
    assert abs(s_first - s_second) > 1e-3
    ratio = s_first / s_whole
    for a, b in zip(relative_poses(split), relative_poses(whole), strict=True):
        assert np.allclose(a[:3, :3], b[:3, :3], atol=1e-5)
        assert np.allclose(a[:3, 3], ratio * b[:3, 3], atol=1e-4)
    for a, b in zip(split.views, whole.views, strict=True):
        assert np.nanmedian(a.depth.numpy() / b.depth.numpy()) == pytest.approx(ratio, rel=1e-5)
    check_window(split, frames, truth, s_first)


def test_out_of_memory_on_a_pair_is_a_backend_error(env):
    env.double.oom_above = 1
    backend = make_backend(env)
    frames, _ = make_frames(env, 4)
    with pytest.raises(BackendError, match="out of GPU memory"):
        backend.infer(frames)
    assert backend.max_views_per_call == 2  # remembered even though the window failed
    env.double.calls.clear()
    with pytest.raises(BackendError, match="out of GPU memory"):
        backend.infer(frames)
    assert [len(c["views"]) for c in env.double.calls] == [2]  # split up front; the first pair fails


def call_sizes(env: DoubleEnv) -> list[int]:
    """View counts of the double's calls since the last look (an OOM call counts: it was attempted)."""
    sizes = [len(c["views"]) for c in env.double.calls]
    env.double.calls.clear()
    return sizes


def test_out_of_memory_is_remembered_and_later_windows_are_split_up_front(env, caplog):
    """After an OOM the next window is split before the model is called: no call runs out again,
    and the parts, each starting with the reference view, still give the unsplit window's frame."""
    backend = make_backend(env)
    frames, truth = make_frames(env, 7, posed=[False, True, False, True, True, False, True])
    whole = backend.infer(frames)
    call_sizes(env)
    assert backend.max_views_per_call is None
    env.double.oom_above = 3
    with caplog.at_level(logging.WARNING):
        backend.infer(frames)
    first = call_sizes(env)
    assert first[0] == 7 and 4 in first  # ran out on 7 views, then on its halves of 4
    assert backend.max_views_per_call == 3 and "model calls of at most 3 views" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        split = backend.infer(frames)
    calls = list(env.double.calls)
    assert call_sizes(env) == [3, 3, 3]  # split up front into balanced parts: no OOM raised
    assert "out of GPU memory" not in caplog.text
    ref = calls[0]["views"][0]["img"]
    assert all(torch.equal(c["views"][0]["img"], ref) for c in calls)  # the first posed frame leads each part
    assert [sum("camera_poses" in v for v in c["views"]) for c in calls] == [2, 2, 2]  # pose anchors shared out
    others = [tuple(v["img"].flatten()[:8].tolist()) for c in calls for v in c["views"][1:]]
    assert len(others) == 6 and len(set(others)) == 6  # every other frame exactly once
    for a, b in zip(relative_poses(split), relative_poses(whole), strict=True):
        assert np.allclose(a, b, atol=1e-5)
    for a, b in zip(split.views, whole.views, strict=True):
        assert torch.equal(a.valid, b.valid)
        assert torch.allclose(a.depth[a.valid], b.depth[b.valid], rtol=1e-5)
    check_window(split, frames, truth)


def test_share_out_deals_posed_views_first_and_keeps_order():
    assert share_out([1, 2, 3, 4, 5, 6], {2, 4, 6}, 3) == [[1, 2], [3, 4], [5, 6]]
    assert share_out([1, 2, 3, 4, 5], {1, 2, 3}, 2) == [[1, 3, 5], [2, 4]]
    assert share_out([4, 2, 3], set(), 2) == [[4, 3], [2]]


def test_remembered_limit_is_probed_one_view_higher_after_windows_that_fit(env):
    backend = make_backend(env, oom_probe_windows=2)
    frames, _ = make_frames(env, 6)
    env.double.oom_above = 4
    runs, limits = [], []
    for _ in range(6):
        backend.infer(frames)
        runs.append(call_sizes(env))
        limits.append(backend.max_views_per_call)
    assert runs == [[6, 4, 3], [4, 3], [4, 3], [4, 3], [4, 3], [6, 4, 3]]
    # 5 views per call still splits 6 into the same two parts; at 6 the probe runs out and the limit falls back.
    assert limits == [4, 4, 5, 5, 6, 4]
    env.double.oom_above = None  # memory freed elsewhere: the probes find it
    for _ in range(5):
        backend.infer(frames)
        runs.append(call_sizes(env))
    assert runs[-5:] == [[4, 3]] * 4 + [[6]] and backend.max_views_per_call == 6


def test_windows_split_up_front_without_priors_are_carried_to_one_scale(env):
    """Four parts, each with its own offset and scale: the reference view ties them together."""
    backend = make_backend(env)
    frames, truth = make_frames(env, 5, posed=False)
    env.double.oom_above = 2
    backend.infer(frames)
    assert backend.max_views_per_call == 2
    call_sizes(env)
    split = backend.infer(frames)
    assert call_sizes(env) == [2, 2, 2, 2]
    scales = [s for s, _ in env.double.pred_frames[-4:]]
    assert max(scales) - min(scales) > 1e-3
    check_window(split, frames, truth, scales[0])


def test_infer_calls_are_serialised(env):
    env.double.delay_s = 0.2
    backend = make_backend(env)
    frames, _ = make_frames(env, 2)
    errors = []

    def run():
        try:
            backend.infer(frames)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(env.double.calls) == 2


def test_warmup_runs_once_and_to_host_keeps_cpu_tensors(env):
    backend = make_backend(env, warmup=True)
    assert len(env.double.calls) == 1 and len(env.double.calls[0]["views"]) == 2
    frames, _ = make_frames(env, 2)
    out = backend.infer(frames)
    host = out.to_host()
    assert host.views[0].depth is out.views[0].depth  # already on the host: no copy


# --------------------------------------------------------------------------------------------
# Loading and construction


def test_loading_is_offline_safetensors_only_and_without_pickles(env, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load (unpickling) must not be used")

    monkeypatch.setattr(torch, "load", forbidden)
    backend = make_backend(env)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["TORCH_HOME"] == str(env.cache / "torch")
    assert Path(torch.hub.get_dir()) == env.cache / "torch" / "hub"
    config = env.cls.constructed[-1]
    assert config["encoder_config"]["torch_hub_pretrained"] is False
    assert config["encoder_config"]["pretrained_checkpoint_path"] is None
    assert config["info_sharing_config"]["module_args"]["pretrained_checkpoint_path"] is None
    loaded = backend._model.state_dict()
    for name, value in state_dict().items():
        assert torch.equal(loaded[name], value), name
    assert not backend._model.training
    assert backend.name == "mapanything" and backend.needs_pose_priors is False


def test_constructor_takes_device_and_options_like_every_backend_plugin(env):
    backend = MapAnythingBackend(
        device=torch.device("cpu"),
        model_path=str(env.model_dir),
        cache_dir=str(env.cache),
        warmup=False,
        output_resolution="model",
    )
    assert backend.device == torch.device("cpu") and backend.config.output_resolution == "model"
    frames, _ = make_frames(env, 2)
    assert backend.infer(frames).views[0].depth.shape == (392, 518)
    with pytest.raises(BackendError, match="unknown MapAnything option.*max_residual_m"):
        MapAnythingBackend(device=torch.device("cpu"), model_path=str(env.model_dir), max_residual_m=0.5)
    with pytest.raises(BackendError, match="either a config or device"):
        MapAnythingBackend(MapAnythingConfig(model_path=str(env.model_dir)), device=torch.device("cpu"))


def test_missing_package_names_the_fix(env, monkeypatch):
    monkeypatch.setitem(sys.modules, "mapanything", None)
    monkeypatch.delitem(sys.modules, "mapanything.models")
    with pytest.raises(BackendError, match="facebookresearch/map-anything"):
        make_backend(env)


def test_missing_checkpoint_file_names_the_fix(env):
    bad = env.tmp / "pickled"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "model.pth").write_bytes(b"not loaded")
    with pytest.raises(BackendError, match=r"model\.safetensors.*prefetch"):
        make_backend(env, model_path=str(bad))
    with pytest.raises(BackendError, match="does not exist"):
        make_backend(env, model_path=str(env.tmp / "nowhere"))


def test_missing_dinov2_code_names_prefetch(env):
    empty = env.tmp / "empty-cache"
    with pytest.raises(BackendError, match=f"mapany-ros prefetch --cache-dir {empty}"):
        make_backend(env, cache_dir=str(empty))


def test_model_id_resolves_through_the_offline_hf_cache(env, monkeypatch):
    seen = {}

    def snapshot_download(repo_id, cache_dir=None, local_files_only=False, allow_patterns=None, **kw):
        seen.update(repo_id=repo_id, cache_dir=cache_dir, local_files_only=local_files_only)
        if repo_id != "facebook/map-anything-apache":
            raise FileNotFoundError("not cached")
        return str(env.model_dir)

    monkeypatch.setitem(
        sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download)
    )
    make_backend(env, model_path="")
    assert seen == dict(
        repo_id="facebook/map-anything-apache",
        cache_dir=str(env.cache / "huggingface"),
        local_files_only=True,
    )
    with pytest.raises(BackendError, match="prefetch --cache-dir .* --model-id other/model"):
        make_backend(env, model_path="", model_id="other/model")


def test_config_with_model_config_wrapper_and_bad_options(env):
    wrapped = env.tmp / "wrapped"
    write_model_dir(wrapped, {"model_str": "mapanything", "model_config": model_config(None)})
    make_backend(env, model_path=str(wrapped))
    (wrapped / "config.json").write_text(json.dumps({"something": "else"}))
    with pytest.raises(BackendError, match="not a MapAnything config"):
        make_backend(env, model_path=str(wrapped))
    with pytest.raises(BackendError, match="output_resolution"):
        make_backend(env, output_resolution="native")


def test_checkpoint_that_does_not_fit_the_config_is_refused(env):
    from safetensors.torch import save_file

    other = write_model_dir(env.tmp / "other")
    save_file({"unrelated.weight": torch.zeros(3)}, str(other / "model.safetensors"))
    with pytest.raises(BackendError, match="does not fit"):
        make_backend(env, model_path=str(other))


def test_the_double_refuses_what_upstream_refuses(env):
    """The double is only useful if it fails where upstream fails; check each rule once."""
    double = env.double
    backend = make_backend(env)
    model = backend._model
    frames, _ = make_frames(env, 2)
    base = [{"img": f.image, "intrinsics": f.camera_model.K.astype(np.float32)} for f in frames]
    with pytest.raises(AssertionError, match="corrupt"):
        double.preprocess_inputs([{"img": frames[0].image.astype(np.float32)}])

    def run(mutate, **kwargs):
        views = double.preprocess_inputs([dict(v) for v in base])
        mutate(views)
        return double.infer(model, views, **{"use_amp": False, **kwargs})

    run(lambda v: None)  # the baseline is accepted
    rules = [
        (lambda v: v[0].update(camera_poses=torch.eye(4, dtype=torch.float64)[None]), RuntimeError),
        (lambda v: v[0].update(depth_z=torch.ones(1, 392, 518, 1)), RuntimeError),
        (lambda v: v[0].update(confidence=torch.ones(1)), ValueError),
        (lambda v: v[1].update(camera_poses=torch.eye(4)[None]), ValueError),
        (lambda v: v[0].update(ray_directions=torch.ones(1, 392, 518, 3)), ValueError),
        (
            lambda v: v[0].update(depth_z=torch.ones(1, 392, 518), intrinsics=None) or v[0].pop("intrinsics"),
            ValueError,
        ),
        (lambda v: v[0].update(img=np.zeros((392, 518, 3), np.uint8)), TypeError),
    ]
    for mutate, error in rules:
        with pytest.raises(error):
            run(mutate)
    with pytest.raises(AssertionError, match="fp16"):
        run(lambda v: None, use_amp=True)
    out = run(lambda v: None)[0]
    assert out["depth_z"].shape == (1, 392, 518, 1) and out["mask"].shape == (1, 392, 518, 1)
    assert out["metric_scaling_factor"].shape == (1, 1) and out["camera_poses"].shape == (1, 4, 4)
    assert out["cam_quats"].shape == (1, 4) and out["cam_trans"].shape == (1, 3)
    assert torch.all(out["depth_z"][~out["mask"]] == 0) and torch.all(out["conf"] >= 1)
