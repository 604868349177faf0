"""The MapAnything hand-over of priors, checked end to end: adapter + placement against the truth.

The double trusts what it is given (poses, depth, calibration), as upstream does with metric
priors, so a prior handed over wrongly comes back as wrong geometry. The end-to-end check runs
the adapter and the core placement stage (with odometry equal to the truth) and compares the
placed depth, poses and points with the scene; each broken hand-over below must make it fail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from mapanything_double import DoubleEnv, MapAnythingDouble, PlaneScene, double_env, make_backend, true_rays
from scipy.spatial.transform import Rotation

from mapany_ros.core.backends.mapanything import MapAnythingBackend
from mapany_ros.core.frames import CameraModel, Frame
from mapany_ros.core.geometry import invert, make_pose, rotation_angle
from mapany_ros.core.placement import PlacedWindow, PlacementConfig, PlacementStatus, WindowPlacer

CAMERA = CameraModel(160, 120, np.array([[120.0, 0, 79.5], [0, 120.0, 59.5], [0, 0, 1]]))
#: base_link (x forward, z up) -> camera optical frame (z forward, y down), 60 cm up, 25 cm ahead.
T_BASE_CAMERA = make_pose(np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]), [0.25, 0.0, 0.6])
SCENE = PlaneScene.room()


@pytest.fixture
def env(tmp_path, monkeypatch, request) -> DoubleEnv:
    return double_env(tmp_path, monkeypatch, request, MapAnythingDouble(seed=2))


def trajectory(n: int) -> list[np.ndarray]:
    """Camera poses (world = odometry frame) of a robot driving and turning through the room."""
    poses = []
    for i in range(n):
        R = Rotation.from_euler("yx", [0.05 * i - 0.1, 0.02 * np.sin(i)]).as_matrix()
        poses.append(make_pose(R, [-0.8 + 0.12 * i, 0.03 * np.sin(1.3 * i), -1.5 + 0.15 * i]))
    return poses


def make_frames(env: DoubleEnv, poses: list[np.ndarray], depth_prior: bool = False) -> list[Frame]:
    """One keyframe per pose with exact odometry (T_world_base) and the camera prior it implies."""
    rng = np.random.default_rng(0)
    frames = []
    for i, T in enumerate(poses):
        image = rng.integers(0, 256, (CAMERA.height, CAMERA.width, 3), dtype=np.uint8)
        env.double.register(image, CAMERA, T)
        depth = SCENE.depth_z(CAMERA, T).astype(np.float32) if depth_prior else None
        frames.append(
            Frame(image, (i + 1) * 100_000_000, "cam", "cam_optical", CAMERA, T, depth, T @ invert(T_BASE_CAMERA))
        )
    return frames


def placer() -> WindowPlacer:
    return WindowPlacer(PlacementConfig(use_odometry=True), extrinsic=lambda camera: T_BASE_CAMERA)


def place(backend: MapAnythingBackend, frames: list[Frame], n_context: int = 0, into: WindowPlacer | None = None
          ) -> PlacedWindow:
    return (into or placer()).place([[f] for f in frames], n_context, backend.infer(frames))


def placement_problems(placed: PlacedWindow, truth: list[np.ndarray], depth_rtol: float = 1e-3) -> list[str]:
    """Why the placed window is not the truth in the map frame (map = odometry = truth here); [] if it is.

    The truth is ray-cast on each view's own grid (its size and K), so either output resolution
    is checked the same way.
    """
    problems = []
    if placed.status is PlacementStatus.REJECTED:
        problems.append(f"window rejected: {placed.message}")
    for i, (view, T, accepted) in enumerate(zip(placed.prediction.views, truth, placed.accepted, strict=True)):
        if not accepted:
            problems.append(f"view {i} not placed")
            continue
        moved = float(np.linalg.norm(view.T_world_camera[:3, 3] - T[:3, 3]))
        turned = np.degrees(rotation_angle(invert(T) @ view.T_world_camera))
        if moved > 0.01 or turned > 0.2:
            problems.append(f"view {i} pose off by {moved:.3f} m, {turned:.2f} deg")
        grid = CameraModel(view.width, view.height, view.K)
        valid = view.valid.numpy()
        gt = SCENE.depth_z(grid, T)
        depth_err = float(np.median(np.abs(view.depth.numpy()[valid] - gt[valid]) / gt[valid]))
        if not depth_err < depth_rtol:
            problems.append(f"view {i} depth off by {depth_err:.2e} (median)")
        v, u = np.mgrid[0 : grid.height, 0 : grid.width].astype(np.float64)
        rays = true_rays(grid, u.ravel(), v.ravel()).reshape(grid.height, grid.width, 3)
        points = (rays / rays[..., 2:3] * gt[..., None]) @ T[:3, :3].T + T[:3, 3]
        point_err = float(np.median(np.linalg.norm(view.points_world.double().numpy()[valid] - points[valid], axis=-1)))
        if not point_err < 0.01:
            problems.append(f"view {i} points off by {point_err:.3f} m (median)")
    return problems


# --------------------------------------------------------------------------------------------
# The double uses its priors


def run_double(env: DoubleEnv, views: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """Upstream's two calls, straight on the double, with the adapter's CPU settings."""
    model = make_backend(env)._model
    return env.double.infer(model, env.double.preprocess_inputs(views), use_amp=False)


def registered_views(env: DoubleEnv, poses: list[np.ndarray]) -> list[dict[str, Any]]:
    frames = make_frames(env, poses)
    return [{"img": f.image, "intrinsics": CAMERA.K.astype(np.float32)} for f in frames]


def predicted_relative(outputs: list[dict[str, torch.Tensor]]) -> list[np.ndarray]:
    poses = [out["camera_poses"][0].double().numpy() for out in outputs]
    return [np.linalg.inv(poses[0]) @ P for P in poses]


def masked_depth(out: dict[str, torch.Tensor]) -> np.ndarray:
    depth = out["depth_z"][0, ..., 0].double().numpy()
    return np.where(out["mask"][0, ..., 0].numpy(), depth, np.nan)


def test_double_follows_the_poses_it_is_given_not_the_truth(env):
    truth = trajectory(3)
    views = registered_views(env, truth)
    frame = make_pose(Rotation.from_euler("xyz", [0.3, -1.0, 2.0]).as_matrix(), [5.0, -3.0, 40.0])
    wrong = truth[1] @ make_pose(Rotation.from_euler("y", 0.2).as_matrix(), [0.4, -0.1, 0.3])
    for view, T in zip(views[:2], [truth[0], wrong], strict=True):
        view["camera_poses"] = (frame @ T).astype(np.float32)  # any common frame: upstream drops it
        view["is_metric_scale"] = torch.tensor([True])
    rel = predicted_relative(run_double(env, views))
    assert env.double.pred_frames[-1][0] == 1.0
    assert np.allclose(rel[1], invert(truth[0]) @ wrong, atol=1e-4)  # the given pose, not the truth
    assert np.allclose(rel[2], invert(truth[0]) @ truth[2], atol=1e-4)  # unposed: the truth

    for view in views[:2]:  # is_metric_scale False: only the directions count; the length is its own
        view["is_metric_scale"] = torch.tensor([False])
    rel = predicted_relative(run_double(env, views))
    scale = env.double.pred_frames[-1][0]
    true_length = np.linalg.norm((invert(truth[0]) @ truth[1])[:3, 3])
    given = (invert(truth[0]) @ wrong)[:3, 3]
    assert scale != 1.0
    assert np.allclose(rel[1][:3, 3], scale * true_length * given / np.linalg.norm(given), atol=1e-4)

    for view in views[:2]:  # upstream's infer defaults a missing flag to True: metric
        del view["is_metric_scale"]
    rel = predicted_relative(run_double(env, views))
    assert env.double.pred_frames[-1][0] == 1.0
    assert np.allclose(rel[1], invert(truth[0]) @ wrong, atol=1e-4)


def test_double_depth_follows_the_depth_prior(env):
    truth = trajectory(2)
    views = registered_views(env, truth)
    metres = SCENE.depth_z(CAMERA, truth[0]).astype(np.float32)
    metres[40:60, 50:90] = 0  # a hole in the prior
    for view in views:
        view["is_metric_scale"] = torch.tensor([True])
    views[0]["depth_z"] = metres
    right = masked_depth(run_double(env, views)[0])
    views[0]["depth_z"] = metres * 1000  # millimetres
    wrong = masked_depth(run_double(env, views)[0])
    assert np.nanmedian(right / model_grid_depth(env, views[0], truth[0])) == pytest.approx(1.0, abs=1e-3)
    assert np.nanmedian(wrong / right) == pytest.approx(1000.0, rel=1e-4)
    hole = np.isnan(model_grid_prior(env, views[0]))
    assert hole.any() and np.nanmedian(wrong[hole] / right[hole]) == pytest.approx(1000.0, rel=1e-3)


def model_grid_depth(env: DoubleEnv, view: dict[str, Any], T: np.ndarray) -> np.ndarray:
    """The true z-depth of the model grid of a registered image (the double's own truth)."""
    processed = env.double.preprocess_inputs([dict(view)])[0]
    K = processed["intrinsics"][0].double().numpy()
    h, w = processed["img"].shape[-2:]
    A = CAMERA.K @ np.linalg.inv(K)
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    rays = true_rays(CAMERA, (A[0, 0] * u + A[0, 2]).ravel(), (A[1, 1] * v + A[1, 2]).ravel())
    return (rays[:, 2] * SCENE.ray_distance(T[:3, 3], rays @ T[:3, :3].T)).reshape(h, w)


def model_grid_prior(env: DoubleEnv, view: dict[str, Any]) -> np.ndarray:
    """The depth prior as upstream resizes it onto the model grid, NaN where missing."""
    depth = env.double.preprocess_inputs([dict(view)])[0]["depth_z"][0].double().numpy()
    return np.where(depth > 0, depth, np.nan)


def test_double_depth_follows_the_calibration_it_is_given(env):
    """Triangulating with known poses, a focal length off by a factor gives depth off by it."""
    truth = trajectory(3)
    views = registered_views(env, truth)
    views[0]["camera_poses"] = np.eye(4, dtype=np.float32)
    views[0]["is_metric_scale"] = torch.tensor([True])
    right = run_double(env, views)
    assert np.nanmedian(masked_depth(right[1]) / model_grid_depth(env, views[1], truth[1])) == pytest.approx(
        1.0, abs=1e-5
    )
    wide = CAMERA.K.copy()
    wide[:2, :2] *= 1.5
    views[1]["intrinsics"] = wide.astype(np.float32)
    wrong = run_double(env, views)
    assert np.nanmedian(masked_depth(wrong[1]) / masked_depth(right[1])) == pytest.approx(1.5, rel=1e-5)
    # Its points follow the calibration it was given too: x / z = (u - cx) / fx of the given K.
    K_model = env.double.preprocess_inputs([dict(views[1])])[0]["intrinsics"][0].double().numpy()
    pts = wrong[1]["pts3d_cam"][0].double().numpy()
    u = np.arange(pts.shape[1])[None].repeat(pts.shape[0], 0)
    ok = pts[..., 2] > 0
    assert np.allclose(pts[ok][:, 0] / pts[ok][:, 2], (u[ok] - K_model[0, 2]) / K_model[0, 0], atol=1e-5)


def test_double_depth_follows_the_ray_directions_it_is_given(env):
    """Distorted cameras get rays: the right rays give the true depth, rays of a focal length 20 %
    too short give depth 20 % too short."""
    truth = trajectory(2)
    model = make_backend(env)._model

    def depth_with(focal_factor: float) -> np.ndarray:
        views = env.double.preprocess_inputs(registered_views(env, truth))
        K = views[0].pop("intrinsics")[0].double().numpy()
        K[:2, :2] *= focal_factor
        h, w = views[0]["img"].shape[-2:]
        v, u = np.mgrid[0:h, 0:w].astype(np.float64)
        rays = np.stack([u, v, np.ones_like(u)], axis=-1) @ np.linalg.inv(K).T
        rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
        views[0]["ray_directions"] = torch.as_tensor(rays, dtype=torch.float32)[None]
        views[0]["camera_poses"] = torch.eye(4)[None]  # metric, so the scale is 1
        views[0]["is_metric_scale"] = torch.tensor([True])
        return masked_depth(env.double.infer(model, views, use_amp=False)[0])

    right = depth_with(1.0)
    truth_depth = model_grid_depth(env, registered_views(env, truth)[0], truth[0])
    assert np.nanmedian(right / truth_depth) == pytest.approx(1.0, abs=1e-5)
    assert np.nanmedian(depth_with(0.8) / right) == pytest.approx(0.8, rel=1e-4)


def test_double_is_metric_only_with_metric_priors(env):
    env.double.scale_error = 0.2
    truth = trajectory(2)
    views = registered_views(env, truth)
    run_double(env, views)  # calibration only: the model's own scale
    scale = env.double.pred_frames[-1][0]
    assert 0.8 <= scale <= 1.2 and scale != pytest.approx(1.0, abs=1e-3)
    views[0]["camera_poses"] = np.eye(4, dtype=np.float32)
    views[0]["is_metric_scale"] = torch.tensor([True])
    run_double(env, views)
    assert env.double.pred_frames[-1][0] == 1.0


# --------------------------------------------------------------------------------------------
# Adapter + placement against the truth


def window(env: DoubleEnv, depth_prior: bool = False) -> tuple[list[Frame], list[np.ndarray]]:
    """The six keyframes every end-to-end test below places, so the broken runs differ only by the break."""
    truth = trajectory(6)
    return make_frames(env, truth, depth_prior=depth_prior), truth


@pytest.mark.parametrize("variant", ["poses", "poses and depth", "out of memory split", "model resolution"])
def test_adapter_and_placement_put_the_truth_in_the_map(env, variant):
    """The unbroken hand-over: placed poses, depth and points are the truth, map -> odom stays identity."""
    backend = make_backend(env, output_resolution="model" if variant == "model resolution" else "input")
    if variant == "out of memory split":
        env.double.oom_above = 3
    frames, truth = window(env, depth_prior=variant == "poses and depth")
    placed = place(backend, frames)
    assert placed.prediction.views[0].depth.shape == ((392, 518) if variant == "model resolution" else (120, 160))
    assert placed.status is PlacementStatus.PLACED and all(placed.accepted)
    # A nearest-resized depth prior moves depth by up to half an input pixel at creases. Without
    # one: poses that follow their priors are refined on the depth (they move by 0.05 mm at most
    # here) and the window's scale is measured again on the refined steps: 3e-4 off.
    assert placement_problems(placed, truth, 3e-3 if "depth" in variant else 1e-3) == []
    assert np.allclose(placed.T_map_odom, np.eye(4), atol=1e-3)


def test_consecutive_windows_each_land_on_the_truth(env):
    """Two model calls come back in two unrelated frames; both windows land on the same map."""
    backend = make_backend(env)
    truth = trajectory(8)
    frames = make_frames(env, truth)
    map_placer = placer()
    first = place(backend, frames[:5], into=map_placer)
    second = place(backend, frames[3:], n_context=2, into=map_placer)
    assert not np.allclose(env.double.pred_frames[0][1], env.double.pred_frames[1][1], atol=0.1)
    assert placement_problems(first, truth[:5], 1e-4) == []
    assert placement_problems(second, truth[3:], 1e-4) == []


def invert_poses(view: dict[str, Any]) -> None:
    """Relative poses the wrong way round: T_cam_ref instead of T_ref_cam."""
    if "camera_poses" in view:
        view["camera_poses"] = torch.linalg.inv(view["camera_poses"])


def depth_in_millimetres(view: dict[str, Any]) -> None:
    """A 16UC1 depth image handed over without the conversion to metres."""
    if "depth_z" in view:
        view["depth_z"] = view["depth_z"] * 1000.0


def K_of_the_input_image(view: dict[str, Any]) -> None:
    """The camera_info K of the 160x120 input, not the K of the 518x392 model grid."""
    if "intrinsics" in view:
        view["intrinsics"] = torch.as_tensor(CAMERA.K, dtype=torch.float32)[None]


def break_adapter(monkeypatch: pytest.MonkeyPatch, backend: MapAnythingBackend, breakage: Callable) -> None:
    """Make the adapter hand every view to the model with ``breakage`` applied."""
    run_model = backend._run_model

    def broken(views: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for view in views:
            breakage(view)
        return run_model(views)

    monkeypatch.setattr(backend, "_run_model", broken)


def test_inverted_relative_poses_fail_the_end_to_end_check(env, monkeypatch):
    """The same window passes unbroken (test_adapter_and_placement_put_the_truth_in_the_map[poses])."""
    frames, truth = window(env)
    backend = make_backend(env)
    break_adapter(monkeypatch, backend, invert_poses)
    out = backend.infer(frames)
    # The model followed the poses it was given; its depth alone is still right.
    rel = [invert(out.views[0].T_world_camera) @ v.T_world_camera for v in out.views]
    assert max(np.linalg.norm(r[:3, 3] - (invert(truth[0]) @ T)[:3, 3]) for r, T in zip(rel, truth, strict=True)) > 0.3
    assert np.nanmedian(out.views[2].depth.numpy() / SCENE.depth_z(CAMERA, truth[2])) == pytest.approx(1.0, abs=1e-4)
    placed = placer().place([[f] for f in frames], 0, out)
    assert placed.status is PlacementStatus.REJECTED
    assert placement_problems(placed, truth) != []
    # Even placed regardless of its disagreement with odometry, its points miss the scene.
    lenient = WindowPlacer(PlacementConfig(use_odometry=True, max_residual_m=0), lambda camera: T_BASE_CAMERA)
    problems = placement_problems(lenient.place([[f] for f in frames], 0, out), truth)
    assert any("points off" in p for p in problems), problems


def test_depth_prior_in_millimetres_fails_the_end_to_end_check(env, monkeypatch):
    """The same window passes unbroken (test_adapter_and_placement_put_the_truth_in_the_map[poses and depth])."""
    frames, truth = window(env, depth_prior=True)
    backend = make_backend(env)
    break_adapter(monkeypatch, backend, depth_in_millimetres)
    placed = place(backend, frames)
    problems = placement_problems(placed, truth, 3e-3)
    # Depth 1000x too far is implausible for a metric model: placement drops every view.
    assert problems and all("not placed" in p or "no view" in p for p in problems), problems
    depth = placed.prediction.views[2].depth.numpy()  # the backend's own output, left as it was
    assert np.nanmedian(depth / SCENE.depth_z(CAMERA, truth[2])) == pytest.approx(1000.0, rel=1e-2)


def test_K_of_another_resolution_fails_the_end_to_end_check(env, monkeypatch):
    """The same window passes unbroken (test_adapter_and_placement_put_the_truth_in_the_map[poses])."""
    frames, truth = window(env)
    backend = make_backend(env)
    break_adapter(monkeypatch, backend, K_of_the_input_image)
    prediction = backend.infer(frames)
    placed = placer().place([[f] for f in frames], 0, prediction)
    problems = placement_problems(placed, truth)
    # The window's depth, on which its leaning poses are refined, steps 3.3x further than the
    # odometry: rejected for its scale (else the map would take depth and points that far off).
    assert any("scale disagrees with odometry by a factor 3.2" in p for p in problems) or (
        any("depth off" in p for p in problems) and any("points off" in p for p in problems)), problems
    # The adapter triangulated with a focal length of 120 px instead of the model grid's 392 px.
    f_model = next(iter(env.double.grids.values())).K_model[0, 0]
    depth = prediction.views[2].depth.numpy()
    assert np.nanmedian(depth / SCENE.depth_z(CAMERA, truth[2])) == pytest.approx(CAMERA.K[0, 0] / f_model, rel=1e-3)
