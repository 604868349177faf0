"""The synthetic ground truth must be right before anything is judged against it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mapany_ros.core.geometry import invert, is_rigid, make_pose
from mapany_ros.sim.scene import (
    Box,
    SyntheticScene,
    SyntheticTrajectory,
    make_camera_model,
    make_sequence,
)


@pytest.fixture(scope="module")
def scene() -> SyntheticScene:
    return SyntheticScene(0)


@pytest.fixture(scope="module")
def empty_room() -> SyntheticScene:
    return SyntheticScene(1, n_boxes=0, n_cylinders=0)


def look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """T_world_camera of an optical camera (x right, y down, z forward) at ``eye`` facing ``target``."""
    z = target - eye
    z = z / np.linalg.norm(z)
    up = np.array([0.0, 0.0, 1.0])
    if abs(z @ up) > 0.99:  # looking straight up or down: any right vector will do
        up = np.array([0.0, 1.0, 0.0])
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    return make_pose(np.stack([x, y, z], axis=1), eye)


def plane_depth(
    cam_K: np.ndarray, T_wc: np.ndarray, n_w: np.ndarray, d_w: float, h: int, w: int
) -> np.ndarray:
    """Analytic z-depth of the plane n_w . X = d_w for every pixel centre (independent of the renderer)."""
    R, t = T_wc[:3, :3], T_wc[:3, 3]
    n_c = R.T @ n_w
    d_c = d_w - n_w @ t
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(cam_K).T
    return d_c / (rays @ n_c)


# ------------------------------------------------------------------------------ rendering


def test_floor_seen_from_above_is_at_camera_height(empty_room: SyntheticScene) -> None:
    cam = make_camera_model(64, 48)
    T = look_at(np.array([0.3, -0.2, 1.25]), np.array([0.3, -0.2, 0.0]))
    rgb, depth = empty_room.render(T, cam)
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    assert depth.shape == (48, 64) and depth.dtype == np.float32
    np.testing.assert_allclose(depth, 1.25, rtol=1e-5)


@pytest.mark.parametrize("pitch_deg", [10.0, 35.0])
def test_tilted_floor_and_wall_depth_match_the_analytic_planes(
    empty_room: SyntheticScene, pitch_deg: float
) -> None:
    cam = make_camera_model(96, 72)
    room = empty_room.room
    eye = np.array([0.0, 0.0, 0.9])
    p = math.radians(pitch_deg)
    T = look_at(eye, eye + np.array([math.cos(p), 0.0, -math.sin(p)]))
    _, depth = empty_room.render(T, cam)
    floor = plane_depth(cam.K, T, np.array([0.0, 0.0, 1.0]), 0.0, cam.height, cam.width)
    wall = plane_depth(cam.K, T, np.array([1.0, 0.0, 0.0]), room.half_x, cam.height, cam.width)
    ceiling = plane_depth(cam.K, T, np.array([0.0, 0.0, 1.0]), room.height, cam.height, cam.width)
    candidates = np.stack([floor, wall, ceiling])
    expected = np.where(candidates > 0, candidates, np.inf).min(axis=0)  # nearest plane in front
    # Near the floor/wall crease the room's other walls cannot be in view (the room is wider
    # than the view), so every pixel is one of the three planes.
    np.testing.assert_allclose(depth, expected, rtol=1e-4)
    assert (np.abs(depth - floor) < 1e-4 * floor).mean() > 0.2  # the test really sees the floor


def test_box_and_pillar_faces_are_at_their_distance(scene: SyntheticScene) -> None:
    cam = make_camera_model(80, 60)
    box = scene.boxes[0]
    normal = box.R[:, 0]  # the box's +x face
    face_centre = np.asarray(box.center) + box.half_extents[0] * normal
    eye = face_centre + 0.6 * normal
    _, depth = scene.render(look_at(eye, face_centre), cam)
    centre = depth[cam.height // 2 - 1 : cam.height // 2 + 1, cam.width // 2 - 1 : cam.width // 2 + 1]
    np.testing.assert_allclose(centre, 0.6, rtol=1e-4)

    cyl = scene.cylinders[0]
    axis_xy = np.asarray(cyl.center_xy)
    target = np.array([*axis_xy, min(cyl.height, scene.room.height) / 2])
    eye = target + np.array([1.5, 0.0, 0.0])
    _, depth = scene.render(look_at(eye, target), make_camera_model(81, 61))
    np.testing.assert_allclose(depth[30, 40], 1.5 - cyl.radius, rtol=1e-4)


def test_every_pixel_hits_something_at_a_sane_depth(scene: SyntheticScene) -> None:
    cam = make_camera_model(160, 120)
    for t in np.linspace(0.0, scene.trajectory.loop_length_m / 0.5, 6, endpoint=False):
        rgb, depth = scene.render(scene.camera_pose(float(t)), cam)
        assert np.all(np.isfinite(depth)) and depth.min() > 0.3
        assert 1.0 < np.median(depth) < 6.0
        assert depth.max() < 2 * math.hypot(2 * scene.room.half_x, 2 * scene.room.half_y)


def test_render_is_deterministic_per_seed(scene: SyntheticScene) -> None:
    cam = make_camera_model(64, 48)
    T = scene.camera_pose(3.0)
    a = scene.render(T, cam)
    b = SyntheticScene(0).render(T, cam)
    c = SyntheticScene(5).render(T, cam)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert np.abs(a[0].astype(int) - c[0].astype(int)).mean() > 10


def local_std(gray: np.ndarray, k: int = 5) -> np.ndarray:
    g = torch.as_tensor(gray, dtype=torch.float32)[None, None]
    m = F.avg_pool2d(g, k, 1, k // 2, count_include_pad=False)
    m2 = F.avg_pool2d(g * g, k, 1, k // 2, count_include_pad=False)
    return (m2 - m * m).clamp_min(0).sqrt()[0, 0].numpy()


def test_texture_is_rich_enough_for_stereo(scene: SyntheticScene) -> None:
    """Small windows almost never see a flat patch, at near and far range."""
    cam = make_camera_model(320, 240)
    for t in (0.0, 5.0, 10.0):
        rgb, _ = scene.render(scene.camera_pose(t), cam)
        gray = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0
        sd = local_std(gray)
        assert np.mean(sd < 0.01) < 0.03
        assert np.median(sd) > 0.03


def test_views_agree_photometrically_through_true_depth(scene: SyntheticScene) -> None:
    """Warping one render into another with the true depth reproduces it (no view-dependent aliasing)."""
    cam = make_camera_model(320, 240)
    T_a, T_b = scene.camera_pose(4.0), scene.camera_pose(4.4)
    rgb_a, depth_a = scene.render(T_a, cam)
    rgb_b, depth_b = scene.render(T_b, cam)
    h, w = depth_a.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(cam.K).T
    T_ba = invert(T_b) @ T_a
    X = (rays * depth_a[..., None]) @ T_ba[:3, :3].T + T_ba[:3, 3]
    uv = X[..., :2] / X[..., 2:] @ cam.K[:2, :2].T + cam.K[:2, 2]
    grid = torch.as_tensor(np.stack([uv[..., 0] / (w - 1), uv[..., 1] / (h - 1)], -1) * 2 - 1).float()[None]

    def sample(img: np.ndarray, mode: str) -> np.ndarray:
        t = torch.as_tensor(np.ascontiguousarray(img), dtype=torch.float32)
        t = t.permute(2, 0, 1)[None] if t.dim() == 3 else t[None, None]
        out = F.grid_sample(t, grid, mode=mode, padding_mode="zeros", align_corners=True)[0]
        return out.permute(1, 2, 0).numpy() if img.ndim == 3 else out[0].numpy()

    inside = (uv[..., 0] > 1) & (uv[..., 0] < w - 2) & (uv[..., 1] > 1) & (uv[..., 1] < h - 2)
    visible = inside & (np.abs(sample(depth_b, "nearest") / X[..., 2] - 1) < 0.01)
    # Away from silhouettes, where a pixel mixes two surfaces differently in each view.
    edges = np.abs(np.diff(depth_a, axis=0, prepend=depth_a[:1])) + np.abs(
        np.diff(depth_a, axis=1, prepend=depth_a[:, :1])
    )
    smooth = F.max_pool2d(torch.as_tensor(edges / depth_a)[None, None], 5, 1, 2)[0, 0].numpy() < 0.02
    m = visible & smooth
    assert m.mean() > 0.5
    diff = np.abs(sample(rgb_b, "bilinear") - rgb_a.astype(np.float32))[m]
    # Observed: median ~1, mean ~2, 99th percentile ~15 grey levels out of 255.
    assert np.median(diff) < 2.0
    assert np.mean(diff) < 3.5
    assert np.percentile(diff, 99) < 25.0


def test_render_rejects_bad_input(scene: SyntheticScene) -> None:
    cam = make_camera_model(32, 24)
    distorted = type(cam)(cam.width, cam.height, cam.K, "plumb_bob", np.array([0.1, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="pinhole"):
        scene.render(np.eye(4), distorted)
    with pytest.raises(ValueError, match="supersample"):
        scene.render(np.eye(4), cam, supersample=0)
    with pytest.raises(ValueError):
        make_camera_model(1, 10)
    with pytest.raises(ValueError):
        SyntheticScene(0, texel_m=0.0)


# ------------------------------------------------------------------------------ trajectory


def test_trajectory_is_smooth_on_the_floor_at_the_set_speed() -> None:
    traj = SyntheticTrajectory(speed_mps=0.5)
    ts = np.arange(0.0, 40.0, 0.05)
    poses = np.stack([traj.base_pose(float(t)) for t in ts])
    assert all(is_rigid(T) for T in poses[::50])
    np.testing.assert_allclose(poses[:, 2, 3], 0.0)
    np.testing.assert_allclose(poses[:, 2, :3], [[0.0, 0.0, 1.0]] * len(ts), atol=1e-12)
    step = np.linalg.norm(np.diff(poses[:, :2, 3], axis=0), axis=1)
    np.testing.assert_allclose(step / 0.05, 0.5, rtol=2e-3)
    heading = np.arctan2(poses[:, 1, 0], poses[:, 0, 0])
    yaw_rate = np.degrees(np.abs(np.angle(np.exp(1j * np.diff(heading))))) / 0.05
    assert yaw_rate.max() <= traj.max_yaw_rate_dps * 1.01
    assert yaw_rate.min() > 1.0  # it always turns a little, and
    assert np.max(np.abs(np.diff(yaw_rate))) < 1.0  # smoothly
    # The robot drives forward along x of base_link (REP 103).
    motion = np.diff(poses[:, :2, 3], axis=0)
    forward = poses[:-1, :2, 0]
    assert np.all(np.sum(motion * forward, axis=1) > 0.99 * step)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_scene_trajectory_limits_and_clearance(seed: int) -> None:
    sc = SyntheticScene(seed)
    assert sc.trajectory.max_yaw_rate_dps <= 30.0
    assert len(sc.boxes) >= 5
    path = sc.trajectory.positions_xy(400)
    for box in sc.boxes:
        assert box.footprint_distance(path).min() > 0.7
    assert np.all(np.abs(path[:, 0]) < sc.room.half_x - 1.0)
    assert np.all(np.abs(path[:, 1]) < sc.room.half_y - 1.0)


def test_camera_extrinsic_is_forward_looking_optical(scene: SyntheticScene) -> None:
    T = scene.T_base_camera
    assert is_rigid(T)
    np.testing.assert_allclose(T[:3, 3], [0.3, 0.0, 0.5])
    assert T[:3, 2] @ np.array([1.0, 0.0, 0.0]) > 0.99  # optical z ~ base x (pitched down a little)
    assert T[2, 2] < 0.0  # looking slightly down
    np.testing.assert_allclose(T[:3, 0], [0.0, -1.0, 0.0], atol=1e-12)  # optical x = right = -y_base


def test_make_sequence_stamps_poses_and_images() -> None:
    seq = make_sequence(2, 64, 48, n_frames=4, rate_hz=5.0, start_s=1.0)
    assert [f.stamp_ns for f in seq.frames] == [1_000_000_000, 1_200_000_000, 1_400_000_000, 1_600_000_000]
    for f in seq.frames:
        np.testing.assert_allclose(f.T_odom_camera, f.T_odom_base @ seq.T_base_camera)
        np.testing.assert_allclose(f.T_odom_base, seq.scene.base_pose(f.stamp_ns * 1e-9))
        assert f.rgb.shape == (48, 64, 3) and f.depth.shape == (48, 64)
    frames = seq.to_frames(camera="front")
    assert frames[0].camera == "front" and frames[0].camera_model is seq.camera_model
    np.testing.assert_array_equal(frames[1].T_world_camera, seq.frames[1].T_odom_camera)
    assert all(f.T_world_camera is None for f in seq.to_frames(with_poses=False))
    with pytest.raises(ValueError):
        make_sequence(0, 64, 48, n_frames=0)


def test_box_geometry_helpers() -> None:
    box = Box((1.0, 2.0, 0.5), (0.5, 0.25, 0.5), yaw_rad=math.pi / 2)
    corners = box.corners()
    np.testing.assert_allclose(corners.min(0), [0.75, 1.5, 0.0], atol=1e-12)
    np.testing.assert_allclose(corners.max(0), [1.25, 2.5, 1.0], atol=1e-12)
    np.testing.assert_allclose(box.footprint_distance(np.array([[1.0, 2.0], [2.25, 2.0]])), [0.0, 1.0])


def test_ray_distance_agrees_with_rendered_depth():
    from mapany_ros.core.geometry import pixel_rays
    from mapany_ros.sim.scene import SyntheticScene, make_camera_model

    scene = SyntheticScene(1)
    cam = make_camera_model(64, 48)
    T = scene.camera_pose(2.0)
    _, depth = scene.render(T, cam, supersample=1)
    rays = pixel_rays(cam.K, 48, 64).numpy().reshape(-1, 3).astype(np.float64)
    norms = np.linalg.norm(rays, axis=1)
    dist = scene.ray_distance(T[:3, 3], (rays / norms[:, None]) @ T[:3, :3].T)
    np.testing.assert_allclose((dist / norms).reshape(48, 64), depth, rtol=1e-4)
