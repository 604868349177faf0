"""The fused voxel map: accuracy on the synthetic scene, exact pose correction, the budget, PLY, inputs."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from mapany_ros.bench.fusion import (
    SyntheticKeyframe,
    synthetic_keyframes,
    true_surface_samples,
)
from mapany_ros.core.camera_rays import grid_rays
from mapany_ros.core.frames import CameraModel
from mapany_ros.core.fusion import FusionConfig, VoxelMap, read_ply, write_ply
from mapany_ros.core.geometry import make_pose
from mapany_ros.scoring.metrics import gt_points, map_quality
from mapany_ros.sim.drive import drive
from mapany_ros.sim.model_simulator import ModelSimulator
from mapany_ros.sim.odometry import DriftingOdometry, OdometryErrors
from mapany_ros.sim.scene import SyntheticScene, make_camera_model, render_depth

W, H = 64, 48
K_SMALL = make_camera_model(W, H).K
#: A strongly barrel-distorted camera (k1 = -0.3) and a fisheye, both 90 degrees across.
DISTORTED = {
    "plumb_bob": ("plumb_bob", np.array([-0.3, 0.08, 0.0, 0.0, 0.0])),
    "equidistant": ("equidistant", np.array([-0.05, 0.01, 0.0, 0.0])),
}


def distorted_camera(name: str, width: int = 160, height: int = 120) -> CameraModel:
    model, D = DISTORTED[name]
    return CameraModel(width, height, make_camera_model(width, height, 90.0).K, model, D)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def synthetic():
    """20 keyframes 0.5 m apart around the seed-0 room, 160x120, 1 % depth noise."""
    return synthetic_keyframes(160, 120, 20, spacing_s=1.0, noise=0.01)


def integrate(vmap: VoxelMap, K: np.ndarray, kf: SyntheticKeyframe, T: np.ndarray | None = None) -> None:
    pose = kf.T_map_camera if T is None else T
    vmap.integrate(kf.key, kf.depth, K, pose, kf.rgb, kf.confidence)


def look_at(eye: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """Optical camera (x right, y down, z forward) at ``eye`` looking along horizontal ``forward``."""
    z = forward / np.linalg.norm(forward)
    y = np.array([0.0, 0.0, -1.0])
    return make_pose(np.stack([np.cross(y, z), y, z], axis=1), eye)


def wall(distance: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Depth and random colours of a fronto-parallel wall filling a W x H view."""
    rgb = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    return np.full((H, W), distance, dtype=np.float32), rgb


def assert_same_points(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...], atol: float = 1e-5) -> None:
    """Same point sets (any order): positions within ``atol``, colours within 1, confidences within 1e-5."""
    assert len(a[0]) == len(b[0]) > 0
    dist, match = cKDTree(b[0]).query(a[0], k=1)
    assert dist.max() <= atol
    assert len(np.unique(match)) == len(match)
    assert np.abs(a[1].astype(int) - b[1][match].astype(int)).max() <= 1
    np.testing.assert_allclose(a[2], b[2][match], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ accuracy


def test_ground_truth_distance_is_exact_on_true_surface(synthetic) -> None:
    scene, K, kfs = synthetic
    surface = true_surface_samples(K, kfs[:3], 10.0)
    assert np.percentile(scene.surface_distance(surface), 99) < 1e-3
    behind = gt_points(kfs[0].true_depth + 0.1, K, kfs[0].T_map_camera).reshape(-1, 3)  # 10 cm deeper
    assert np.median(scene.surface_distance(behind)) > 0.05


def test_fused_synthetic_map_is_accurate_and_complete(synthetic) -> None:
    scene, K, kfs = synthetic
    vmap = VoxelMap(FusionConfig(voxel_size_m=0.05, pixel_stride=1))
    for kf in kfs:
        integrate(vmap, K, kf)
    xyz, rgb, conf = vmap.points()
    assert xyz.dtype == np.float32 and rgb.dtype == np.uint8 and conf.dtype == np.float32
    assert xyz.shape == rgb.shape == (len(conf), 3)
    assert np.all(conf >= vmap.config.min_weight)
    quality = map_quality(scene.surface_distance(xyz), xyz, true_surface_samples(K, kfs, vmap.config.max_depth_m)[::5])
    assert quality["accuracy_median_m"] <= 0.02, quality
    assert quality["completeness"] >= 0.80, quality
    assert vmap.keyframes_integrated == len(kfs)


def with_flying_pixels(depth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every pixel at a depth jump (over 3 % to a 4-neighbour) blended with that neighbour, as a model
    interpolates across an edge: anywhere between the foreground and the background."""
    d = depth.astype(np.float64)
    P = np.pad(d, 1, mode="edge")
    neighbours = np.stack([P[1:-1, 2:], P[1:-1, :-2], P[2:, 1:-1], P[:-2, 1:-1]])
    jump = np.abs(neighbours - d) / np.minimum(neighbours, d)
    other = np.take_along_axis(neighbours, jump.argmax(0)[None], 0)[0]
    t = rng.uniform(0.15, 0.85, d.shape)
    return np.where(jump.max(0) > 0.03, t * d + (1 - t) * other, d).astype(np.float32)


def test_flying_pixels_never_reach_the_map_and_surfaces_stay_complete(synthetic) -> None:
    """Flying pixels at every edge of 20 keyframes: with the edge filter the map is as close to the true
    surfaces as the map of the same depth without them, and about as complete; without it they show."""
    scene, K, kfs = synthetic
    rng = np.random.default_rng(3)
    noise = [(1 + 0.003 * rng.standard_normal(kf.true_depth.shape)).astype(np.float32) for kf in kfs]
    clean = [kf.true_depth * n for kf, n in zip(kfs, noise, strict=True)]
    flying = [with_flying_pixels(kf.true_depth, rng) * n for kf, n in zip(kfs, noise, strict=True)]
    assert np.mean([np.mean(f != c) for f, c in zip(flying, clean, strict=True)]) > 0.1
    surface = true_surface_samples(K, kfs, 10.0)[::5]
    result = {}
    for label, depths, threshold in (("clean", clean, 0.0), ("clean, filtered", clean, None),
                                     ("flying", flying, 0.0), ("flying, filtered", flying, None)):
        # 160x120 at stride 1 samples the scene as densely as 640x480 at the default stride 4
        cfg = FusionConfig(pixel_stride=1) if threshold is None else FusionConfig(pixel_stride=1, edge_threshold=0.0)
        vmap = VoxelMap(cfg)
        for kf, depth in zip(kfs, depths, strict=True):
            vmap.integrate(kf.key, depth, K, kf.T_map_camera, kf.rgb, kf.confidence)
        xyz = vmap.points()[0]
        distance = scene.surface_distance(xyz)
        result[label] = (distance.max(), np.sum(distance > 0.05), map_quality(distance, xyz, surface)["completeness"])
    assert result["flying"][0] > 0.3 and result["flying"][1] > 100, result  # what the filter is up against
    assert result["flying, filtered"][0] <= result["clean"][0] + 0.005, result
    assert result["flying, filtered"][1] <= result["clean"][1], result
    assert result["clean, filtered"][2] >= result["clean"][2] - 0.03, result  # surfaces are kept
    assert result["flying, filtered"][2] >= result["clean"][2] - 0.06, result


def test_wall_points_land_exactly_on_the_wall() -> None:
    """Back-projection through K on the stride grid: a noise-free wall gives points on the wall, edge to edge."""
    depth, rgb = wall(2.0)
    vmap = VoxelMap(FusionConfig(pixel_stride=3, min_weight=0.0))
    vmap.integrate("kf", depth, K_SMALL, look_at(np.array([1.0, -3.0, 0.5]), np.array([0, 1.0, 0])), rgb)
    xyz, _, _ = vmap.points()
    np.testing.assert_allclose(xyz[:, 1], -1.0, atol=1e-5)  # the wall plane y = -3 + 2
    u = np.arange(0, W, 3)  # sampled columns; x right = world +x, y down = world -z
    v = np.arange(0, H, 3)
    x_lo, x_hi = 1.0 + 2.0 * (u[[0, -1]] - K_SMALL[0, 2]) / K_SMALL[0, 0]
    z_hi, z_lo = 0.5 - 2.0 * (v[[0, -1]] - K_SMALL[1, 2]) / K_SMALL[1, 1]
    assert abs(xyz[:, 0].min() - x_lo) < 0.05 and abs(xyz[:, 0].max() - x_hi) < 0.05
    assert abs(xyz[:, 2].min() - z_lo) < 0.05 and abs(xyz[:, 2].max() - z_hi) < 0.05


@pytest.mark.parametrize("name", sorted(DISTORTED))
def test_distorted_depth_lands_on_the_surface_corner_pixels_included(name: str) -> None:
    """The depth of a distorted camera lies on its distorted grid: every pixel goes out along the model's ray."""
    scene = SyntheticScene(0)
    cam = distorted_camera(name)
    T = scene.camera_pose(3.0)
    depth = render_depth(scene, T, cam)
    rgb = np.zeros((cam.height, cam.width, 3), np.uint8)
    rays, _ = grid_rays(cam)
    corner = rays[0, 0].numpy()
    truth = T[:3, :3] @ (corner / corner[2] * depth[0, 0]) + T[:3, 3]  # the top-left pixel's surface point
    errors = {}
    for label, K in (("model", cam), ("pinhole K", cam.K)):
        vmap = VoxelMap(FusionConfig(voxel_size_m=0.002, pixel_stride=1, min_weight=0.0))  # ~one pixel per voxel
        vmap.integrate("kf", depth, K, T, rgb)
        xyz, _, _ = vmap.points()
        errors[label] = (scene.surface_distance(xyz).max(), np.linalg.norm(xyz - truth, axis=1).min())
    assert errors["model"][0] < 0.002, errors  # every fused point on the true surface
    assert errors["model"][1] < 0.003, errors  # the corner pixel's point where it belongs
    assert errors["pinhole K"][0] > 0.2, errors  # what the pinhole part alone gives


def test_a_distorted_camera_through_the_pipeline_maps_the_true_surfaces() -> None:
    """The backend leaves the view's camera unset; the pipeline gives it the frame's distortion."""
    scene = SyntheticScene(0)
    cam = distorted_camera("plumb_bob", 128, 96)
    sim = ModelSimulator(scene=scene, bad_view_rate=0.0, scale_sigma=0.0, pose_sigma_m=0.0, pose_sigma_deg=0.0,
                         depth_sigma=0.003)
    odometry = DriftingOdometry(scene.base_pose, OdometryErrors())
    run = drive(scene, sim, loops=0.25, odometry=odometry, camera=cam,
                fusion=FusionConfig(pixel_stride=1, voxel_size_m=0.02))
    assert all(v.camera is not None and not v.camera.is_pinhole for r in run.results for v in r.prediction.views)
    assert sum(len(r.placement.rejected_views) for r in run.results) == 0
    voxel_map = run.pipeline.map
    assert voxel_map is not None and voxel_map.keyframes_integrated >= 8
    distance = scene.surface_distance(voxel_map.points()[0])
    assert np.median(distance) < 0.005 and np.percentile(distance, 99) < 0.03, np.percentile(distance, [50, 99])


# ------------------------------------------------------------------------------ pose correction


def assert_same_surface(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...], voxel: float) -> None:
    """Two maps of the same samples binned differently (a moved submap is binned again): every point of
    each within a voxel of the other's, the same total evidence."""
    assert len(a[0]) > 0.7 * len(b[0]) and len(b[0]) > 0.7 * len(a[0]), (len(a[0]), len(b[0]))
    assert cKDTree(b[0]).query(a[0])[0].max() <= 1.2 * voxel
    assert cKDTree(a[0]).query(b[0])[0].max() <= 1.2 * voxel
    np.testing.assert_allclose(a[2].sum(), b[2].sum(), rtol=1e-4)


def test_a_correction_moves_a_submap_where_integrating_at_the_corrected_poses_puts_it(synthetic) -> None:
    """Three keyframes fused 12 cm and 4 degrees off (one submap), then corrected: the submap is
    re-anchored exactly, its surfaces land where the true poses put them, nothing is integrated again."""
    scene, K, kfs = synthetic
    cfg = FusionConfig(pixel_stride=2, min_weight=0.0)
    off = make_pose(Rotation.from_euler("xyz", [1.0, -2.0, 3.0], degrees=True).as_matrix(), [0.1, -0.07, 0.05])
    truth, corrected = VoxelMap(cfg), VoxelMap(cfg)
    for kf in kfs[:3]:
        integrate(truth, K, kf)
        integrate(corrected, K, kf, off @ kf.T_map_camera)
    assert cKDTree(truth.points()[0]).query(corrected.points()[0])[0].mean() > 0.05
    assert corrected.update_poses({kf.key: kf.T_map_camera for kf in kfs[:3]}) == 3
    assert_same_surface(corrected.points(), truth.points(), cfg.voxel_size_m)
    moved, reference = scene.surface_distance(corrected.points()[0]), scene.surface_distance(truth.points()[0])
    assert np.median(moved) <= 1.25 * np.median(reference) + 0.001
    assert corrected.keyframes_reposed == 3 and corrected.keyframes_integrated == 3


def test_a_correction_of_an_old_keyframe_moves_its_surfaces() -> None:
    """Keyframes far older than any window still follow the pose graph: their submap moves with them,
    the others stay. Unknown keys and corrections below the thresholds change nothing."""
    cfg = FusionConfig(pixel_stride=1, min_weight=0.0, submap_keyframes=4)
    vmap = VoxelMap(cfg)
    depth, rgb = wall(2.0)
    poses = {("cam", i): look_at(np.array([0.5 * i, 0.0, 0.0]), np.array([0, 1.0, 0])) for i in range(40)}
    for key, T in poses.items():
        vmap.integrate(key, depth, K_SMALL, T, rgb)
    assert vmap.num_submaps == 10
    before = vmap.points()
    up = make_pose(np.eye(3), [0.0, 0.0, 0.3])  # the first four keyframes were 30 cm too low
    old = {key: up @ poses[key] for key in list(poses)[:4]}
    assert vmap.update_poses(old) == 4
    xyz = vmap.points()[0]
    first = xyz[:, 0] < 0.5 * 3 + 0.3  # what the first four see: x up to 1.8 m (the fifth starts at 2 m - 0.7)
    assert np.all(xyz[:, 1] > 1.99) and np.all(xyz[:, 1] < 2.01)  # still on the wall
    top = before[0][:, 2].max()
    assert abs(xyz[first][:, 2].max() - (top + 0.3)) < 0.05  # its surfaces rose by 30 cm
    assert abs(xyz[xyz[:, 0] > 6.0][:, 2].max() - top) < 0.05  # newer ones did not
    assert vmap.keyframes_integrated == 40 and vmap.keyframes_reposed == 4

    snapshot = vmap.points()
    key = ("cam", 20)
    assert not vmap.update_pose(("cam", -1), poses[key])  # unknown
    nudge = make_pose(np.eye(3), [0.006, 0.0, 0.0])
    assert not vmap.update_pose(key, poses[key] @ nudge)  # 6 mm < 1 cm
    for got, want in zip(vmap.points(), snapshot, strict=True):
        np.testing.assert_array_equal(got, want)
    assert vmap.update_pose(key, poses[key] @ nudge @ nudge)  # 12 mm from the pose last counted
    assert vmap.keyframes_reposed == 5


def test_a_loop_closure_of_2000_keyframes_re_anchors_without_integrating_again() -> None:
    """Two thousand keyframes corrected at once: every submap is re-anchored from its keyframes, no depth
    is back-projected or binned again, and the map is where the corrected poses put it."""

    class CountingMap(VoxelMap):
        reductions = 0

        def _reduce(self, *args, **kwargs):  # the step that bins a keyframe's samples
            CountingMap.reductions += 1
            return super()._reduce(*args, **kwargs)

    cfg = FusionConfig(pixel_stride=1, min_weight=0.0, max_voxels=20_000)
    vmap, reference = CountingMap(cfg), VoxelMap(cfg)
    depth = np.full((6, 8), 2.0, np.float32)
    rgb = np.zeros((6, 8, 3), np.uint8)
    K = make_camera_model(8, 6).K
    # Two cameras on a robot driving a 100 m square; the poses drift by 1 % in x.
    truth = {}
    for i in range(1000):
        s = 0.1 * i
        x, y = (s, 0.0) if s < 50 else (50.0, s - 50)
        for camera, forward in (("front", [0, 1.0, 0]), ("side", [1.0, 0, 0])):
            truth[(camera, i)] = look_at(np.array([x, y, 0.0]), np.array(forward))
    drift = make_pose(np.eye(3), [0.0, 0.0, 0.0])
    for key, T in truth.items():
        drift[0, 3] = 0.01 * T[0, 3]
        vmap.integrate(key, depth, K, drift @ T, rgb)
        reference.integrate(key, depth, K, T, rgb)
    assert CountingMap.reductions == 2000 and vmap.num_voxels <= cfg.max_voxels
    vmap.points()
    known = {key: T for key, T in truth.items() if key in vmap._keyframes.rows}
    assert len(known) > 100  # the budget evicted the oldest submaps, with their keyframes
    assert cKDTree(reference.points()[0]).query(vmap.points()[0])[0].max() > 0.3  # 50 cm of drift at the end
    assert vmap.update_poses(known) > 0.5 * len(known)
    xyz = vmap.points()[0]
    assert CountingMap.reductions == 2000 and vmap.keyframes_integrated == 2000
    # Where the same depth fused at the true poses is (the same budget evicted the same old submaps).
    true_xyz = reference.points()[0]
    assert cKDTree(true_xyz).query(xyz)[0].max() <= 1.2 * cfg.voxel_size_m
    assert np.mean(cKDTree(xyz).query(true_xyz)[0] <= 1.2 * cfg.voxel_size_m) > 0.95


# ------------------------------------------------------------------------------ revisits


def test_a_revisit_after_drift_is_one_surface_once_corrected() -> None:
    """Two cameras drive 1.5 loops on poses that drift (1 % scale, 0.3 deg/m: over 30 cm where the
    loop closes), then the pose graph corrects every keyframe view: the map is as close to the true
    surfaces as the same depth fused at the true poses (median and p90 within 1.25x), no double walls."""
    scene = SyntheticScene(0)
    cam = make_camera_model(128, 96)
    yaw = make_pose(Rotation.from_euler("y", -90.0, degrees=True).as_matrix(), [0.0, 0.0, 0.0])
    extrinsics = {"front": scene.T_base_camera, "left": scene.T_base_camera @ yaw}
    odometry = DriftingOdometry(scene.base_pose, OdometryErrors(scale_error=0.01, yaw_drift_deg_per_m=0.3, seed=1))
    loop_s = scene.trajectory.loop_length_m / scene.trajectory.speed_mps
    rng = np.random.default_rng(0)
    cfg = FusionConfig(pixel_stride=1)  # 128x96 at stride 1 fuses as densely as 512x384 at the default 4
    truth, vmap = VoxelMap(cfg), VoxelMap(cfg)
    true_poses, seen = {}, []
    for t in np.arange(0.0, 1.5 * loop_s, 0.5):
        for camera, T_base_camera in extrinsics.items():
            key = (camera, int(round(t * 1e9)))
            T = scene.base_pose(t) @ T_base_camera
            rgb, depth = scene.render(T, cam, supersample=1)
            depth = depth * (1 + 0.005 * rng.standard_normal(depth.shape)).astype(np.float32)
            truth.integrate(key, depth, cam.K, T, rgb)
            vmap.integrate(key, depth, cam.K, odometry.pose(t) @ T_base_camera, rgb)
            true_poses[key] = T
            seen.append(SyntheticKeyframe(key, depth, rgb, np.ones_like(depth), T, depth))
    end = np.linalg.norm(odometry.pose(t)[:3, 3] - scene.base_pose(t)[:3, 3])
    assert end > 0.3, end

    def quality(m: VoxelMap) -> tuple[float, float]:
        distance = scene.surface_distance(m.points()[0])
        return float(np.median(distance)), float(np.percentile(distance, 90))

    reference, drifted = quality(truth), quality(vmap)
    assert drifted[1] > 3 * reference[1], (drifted, reference)  # double walls before the correction
    vmap.update_poses(true_poses)
    corrected = quality(vmap)
    assert corrected[0] <= 1.25 * reference[0] and corrected[1] <= 1.25 * reference[1], (corrected, reference)
    xyz = vmap.points()[0]
    surface = true_surface_samples(cam.K, seen[::4], cfg.max_depth_m)[::5]
    assert map_quality(scene.surface_distance(xyz), xyz, surface)["completeness"] > 0.95
# ------------------------------------------------------------------------------ budget


def test_long_path_stays_within_budget_and_keeps_the_near_map() -> None:
    cfg = FusionConfig(max_voxels=3000, pixel_stride=1, evict_radius_m=3.0)
    vmap = VoxelMap(cfg)
    depth, rgb = wall(2.0)
    n = 320
    memory = []
    for i in range(n):
        vmap.integrate(("cam", i), depth, K_SMALL, look_at(np.array([0.25 * i, 0.0, 0.0]), np.array([0, 1.0, 0])), rgb)
        assert vmap.num_voxels <= cfg.max_voxels
        if i % 10 == 0:  # published now and then, so the union of the submaps is kept too
            vmap.points()
            memory.append(vmap.memory_bytes)
    assert vmap.voxels_evicted >= n * 100  # the path adds ~170 voxels per keyframe
    assert max(memory[8:]) <= 1.2 * max(memory[:8])  # memory does not grow with the path
    # Submaps (60 B a voxel; the open one may hold twice what it uses) and their union hold at most
    # a few budgets; submaps evicted entirely take their keyframes with them.
    assert max(memory) <= 4 * (cfg.max_voxels + cfg.submap_keyframes * W * H) * 60 + 64 * 1024
    assert vmap.num_keyframes <= 64
    x_last = 0.25 * (n - 1)
    xyz, _, _ = vmap.points()
    assert xyz[:, 0].min() > x_last - 6.0  # far voxels went first
    newest = VoxelMap(FusionConfig(pixel_stride=1))
    newest.integrate("last", depth, K_SMALL, look_at(np.array([x_last, 0.0, 0.0]), np.array([0, 1.0, 0])), rgb)
    in_map = {tuple(v) for v in np.floor(xyz / cfg.voxel_size_m).astype(int)}
    seen = np.floor(newest.points()[0] / cfg.voxel_size_m).astype(int)
    assert np.mean([tuple(v) in in_map for v in seen]) > 0.99  # what the robot sees now is all there


@pytest.mark.parametrize("radius, kept_wall_y", [(4.0, 2.0), (0.0, -8.0)])
def test_eviction_drops_far_voxels_or_stale_ones(radius: float, kept_wall_y: float) -> None:
    """A near wall seen first, a far one after: radius eviction keeps the near, LRU the recent far one."""
    vmap = VoxelMap(FusionConfig(max_voxels=3500, pixel_stride=1, evict_radius_m=radius))
    origin = np.zeros(3)
    for i, (distance, forward) in enumerate([(2.0, [0, 1.0, 0])] * 3 + [(8.0, [0, -1.0, 0])] * 3):
        depth, rgb = wall(distance, seed=i)
        vmap.integrate(i, depth, K_SMALL, look_at(origin, np.array(forward)), rgb)
        assert vmap.num_voxels <= 3500
    xyz, _, _ = vmap.points()
    assert vmap.voxels_evicted > 1000
    assert np.mean(np.abs(xyz[:, 1] - kept_wall_y) < 0.1) > 0.95


def test_evicted_and_moved_voxels_leave_no_trace_in_the_published_map() -> None:
    """Eviction and corrections, interleaved with publishing: the union of the submaps holds exactly
    what the submaps hold where they are now, never a voxel where one was."""
    cfg = FusionConfig(max_voxels=30_000, pixel_stride=1, evict_radius_m=4.0, min_weight=0.0, submap_keyframes=2)
    vmap = VoxelMap(cfg)
    depth, rgb = wall(2.0)  # a wall 2 m ahead fills a submap with about 2500 voxels: a dozen fit
    poses: dict[tuple[str, int], np.ndarray] = {}
    lift = make_pose(np.eye(3), [0.0, 0.5, 0.0])

    def drive(first: int, last: int, offset: np.ndarray) -> None:
        for i in range(first, last):
            poses[("cam", i)] = offset @ look_at(np.array([0.25 * i, 0.0, 0.0]), np.array([0, 1.0, 0]))
            vmap.integrate(("cam", i), depth, K_SMALL, poses[("cam", i)], rgb)
            if i % 5 == 0:
                vmap.points()

    drive(0, 40, np.eye(4))
    assert vmap.voxels_evicted > 0
    known = [k for k in poses if k in vmap._keyframes.rows]
    vmap.update_poses({k: lift @ poses[k] for k in known})  # everything the map still holds moves
    xyz = vmap.points()[0]
    assert np.all(np.abs(xyz[:, 1] - 2.5) < 0.02), np.unique(np.round(xyz[:, 1], 2))
    drive(40, 80, lift)
    newest = [k for k in poses if k in vmap._keyframes.rows][-4:]
    # Only the newest two submaps move on (one closed: the union moves it alone, the others stay).
    assert vmap.num_submaps >= 10 and newest[0] == ("cam", 76)
    vmap.update_poses({k: lift @ poses[k] for k in newest})
    xyz = vmap.points()[0]
    back = np.abs(xyz[:, 1] - 2.5) < 0.02
    front = np.abs(xyz[:, 1] - 3.0) < 0.02
    assert np.all(back | front) and front.any() and back.any()
    assert xyz[front][:, 0].min() > 0.25 * 76 - 1.5  # what moved is what the newest keyframes see


# ------------------------------------------------------------------------------ confidence and validity


def test_confidence_scale_does_not_matter_but_low_confidence_pixels_drop() -> None:
    depth, rgb = wall(2.0)
    T = look_at(np.zeros(3), np.array([0, 1.0, 0]))
    conf = np.ones((H, W), np.float32)
    conf[:, : W // 4] = 0.01  # a quarter of the image far below the median
    maps = []
    for scale in (0.5, 100.0):  # plane sweep's [0, 1] vs MapAnything's >= 1
        vmap = VoxelMap(FusionConfig(pixel_stride=1))
        vmap.integrate("kf", depth, K_SMALL, T, rgb, confidence=conf * scale)
        maps.append(vmap.points())
    assert_same_points(*maps)
    xyz = maps[0][0]
    x_left = 2.0 * (W // 4 - K_SMALL[0, 2]) / K_SMALL[0, 0]  # where the confident pixels begin
    assert xyz[:, 0].min() > x_left - 0.06
    valid = np.ones((H, W), bool)
    valid[:, W // 2 :] = False
    vmap = VoxelMap(FusionConfig(pixel_stride=1))
    vmap.integrate("kf", torch.from_numpy(depth), K_SMALL, T, torch.from_numpy(rgb), valid=torch.from_numpy(valid))
    assert vmap.points()[0][:, 0].max() < 0.06


# ------------------------------------------------------------------------------ PLY, reset


def test_ply_round_trip_gives_the_same_points(synthetic, tmp_path) -> None:
    _, K, kfs = synthetic
    vmap = VoxelMap(FusionConfig(pixel_stride=2))
    for kf in kfs[:3]:
        integrate(vmap, K, kf)
    path = tmp_path / "map.ply"
    assert vmap.save_ply(path) == len(vmap.points()[0])
    assert path.read_bytes().startswith(b"ply\nformat binary_little_endian 1.0\nelement vertex ")
    for got, want in zip(read_ply(path), vmap.points()):
        np.testing.assert_array_equal(got, want)
    loaded = VoxelMap(FusionConfig(pixel_stride=2))
    xyz, _, _ = loaded.load_ply(path)
    assert len(xyz) == len(vmap.points()[0])
    assert_same_points(loaded.points(), vmap.points())


def test_read_ply_refuses_what_it_cannot_read_faithfully(tmp_path) -> None:
    ascii_ply = tmp_path / "ascii.ply"
    ascii_ply.write_bytes(b"ply\nformat ascii 1.0\nelement vertex 0\nend_header\n")
    with pytest.raises(ValueError, match="binary_little_endian"):
        read_ply(ascii_ply)
    no_conf = tmp_path / "noconf.ply"
    header = "ply\nformat binary_little_endian 1.0\nelement vertex 1\n"
    header += "".join(f"property float {a}\n" for a in "xyz") + "".join(f"property uchar {c}\n" for c in "rgb")
    no_conf.write_bytes((header + "end_header\n").encode() + bytes(15))
    with pytest.raises(ValueError, match="confidence"):
        read_ply(no_conf)
    far = tmp_path / "far.ply"
    write_ply(far, np.array([[0.0, 0.0, 1e6]]), np.zeros((1, 3), np.uint8), np.ones(1))
    with pytest.raises(ValueError, match="beyond the voxel keys"):
        VoxelMap(FusionConfig()).load_ply(far)


def test_reset_empties_the_map(synthetic) -> None:
    _, K, kfs = synthetic
    vmap = VoxelMap(FusionConfig(pixel_stride=2))
    integrate(vmap, K, kfs[0])
    full_bytes = vmap.memory_bytes
    vmap.reset()
    xyz, rgb, conf = vmap.points()
    assert xyz.shape == (0, 3) and rgb.shape == (0, 3) and conf.shape == (0,)
    assert vmap.num_voxels == vmap.keyframes_integrated == vmap.num_keyframes == vmap.num_submaps == 0
    assert vmap.memory_bytes < full_bytes
    integrate(vmap, K, kfs[0])  # the same key is new again
    assert vmap.num_voxels > 0


# ------------------------------------------------------------------------------ bad input


def test_config_rejects_values_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"voxel_size_m must be a number in \[0.001, 10.0\], got 0"):
        FusionConfig(voxel_size_m=0)
    with pytest.raises(ValueError, match="pixel_stride must be an integer"):
        FusionConfig(pixel_stride=1.5)
    with pytest.raises(ValueError, match="max_voxels"):
        FusionConfig(max_voxels=0)
    with pytest.raises(ValueError, match="repose_rotation_deg"):
        FusionConfig(repose_rotation_deg=float("nan"))


def _bad_inputs() -> list[tuple[dict, str]]:
    depth, rgb = wall(2.0)
    T = np.eye(4)
    T_nan = T.copy()
    T_nan[0, 3] = np.nan
    T_sheared = T.copy()
    T_sheared[0, 1] = 0.5
    ok = dict(key="kf", depth=depth, K=K_SMALL, T_map_camera=T, colors=rgb)
    return [
        ({**ok, "depth": np.stack([depth] * 2)}, "depth must be a floating-point \\(h, w\\) image"),
        ({**ok, "depth": depth.astype(np.int32)}, "depth must be a floating-point"),
        ({**ok, "colors": rgb[:-1]}, r"colors must have shape \(48, 64, 3\)"),
        ({**ok, "colors": rgb.astype(np.float32)}, "colors must be of dtype torch.uint8"),
        ({**ok, "confidence": np.ones((H, W + 1), np.float32)}, "confidence must have shape"),
        ({**ok, "valid": np.ones((H, W), np.uint8)}, "valid must be of dtype torch.bool"),
        ({**ok, "K": K_SMALL[:2]}, "K must be a finite 3x3"),
        ({**ok, "K": -K_SMALL}, "positive focal lengths"),
        ({**ok, "T_map_camera": T_nan}, "T_map_camera must be a finite 4x4 rigid transform"),
        ({**ok, "T_map_camera": T_sheared}, "T_map_camera must be a finite 4x4 rigid transform"),
        ({**ok, "T_map_camera": make_pose(np.eye(3), [1e6, 0, 0])}, "voxel keys reach"),
    ]


@pytest.mark.parametrize("kwargs, message", _bad_inputs())
def test_bad_input_is_a_clear_value_error(kwargs: dict, message: str) -> None:
    vmap = VoxelMap(FusionConfig())
    with pytest.raises(ValueError, match=message):
        vmap.integrate(**kwargs)
    assert vmap.num_voxels == 0 and vmap.keyframes_integrated == 0


def test_a_keyframe_without_valid_depth_adds_nothing() -> None:
    depth, rgb = wall(2.0)
    vmap = VoxelMap(FusionConfig())
    vmap.integrate("nan", np.full_like(depth, np.nan), K_SMALL, np.eye(4), rgb)
    vmap.integrate("far", depth + 100.0, K_SMALL, np.eye(4), rgb)  # beyond max_depth_m
    vmap.integrate("unsure", depth, K_SMALL, np.eye(4), rgb, confidence=np.zeros_like(depth))
    assert vmap.keyframes_integrated == 3 and vmap.num_voxels == 0
    assert vmap.update_pose("nan", make_pose(np.eye(3), [1.0, 0, 0]))


def test_duplicate_key_and_bad_corrected_pose_are_refused() -> None:
    depth, rgb = wall(2.0)
    vmap = VoxelMap(FusionConfig())
    vmap.integrate("kf", depth, K_SMALL, np.eye(4), rgb)
    with pytest.raises(ValueError, match="already in the map"):
        vmap.integrate("kf", depth, K_SMALL, np.eye(4), rgb)
    with pytest.raises(ValueError, match="T_map_camera must be a finite"):
        vmap.update_pose("kf", np.full((4, 4), np.inf))


# ------------------------------------------------------------------------------ threads, devices


def test_points_from_another_thread_while_integrating(synthetic) -> None:
    _, K, kfs = synthetic
    cfg = FusionConfig(pixel_stride=2, submap_keyframes=3, min_weight=0.0)
    vmap = VoxelMap(cfg)
    errors: list[BaseException] = []
    shift = make_pose(np.eye(3), [0.02, 0, 0])  # after the first keyframe the pose graph moves the map 2 cm

    def worker() -> None:
        try:
            for i, kf in enumerate(kfs[:8]):
                integrate(vmap, K, kf, kf.T_map_camera if i == 0 else shift @ kf.T_map_camera)
                vmap.update_poses({k.key: shift @ k.T_map_camera for k in kfs[: i + 1]})
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    running = True
    while running:
        running = thread.is_alive()
        xyz, rgb, conf = vmap.points()
        assert len(xyz) == len(rgb) == len(conf)
    thread.join()
    assert not errors
    reference = VoxelMap(cfg)
    for kf in kfs[:8]:
        integrate(reference, K, kf, shift @ kf.T_map_camera)
    assert_same_surface(vmap.points(), reference.points(), cfg.voxel_size_m)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_map_matches_cpu_map(synthetic) -> None:
    _, K, kfs = synthetic
    cfg = FusionConfig(pixel_stride=2)
    cpu, gpu = VoxelMap(cfg, "cpu"), VoxelMap(cfg, "cuda")
    for kf in kfs[:5]:
        integrate(cpu, K, kf)
        gpu.integrate(kf.key, torch.as_tensor(kf.depth, device="cuda"), K, kf.T_map_camera,
                      torch.as_tensor(kf.rgb, device="cuda"), torch.as_tensor(kf.confidence, device="cuda"))
    assert gpu.update_pose(kfs[4].key, kfs[4].T_map_camera @ make_pose(np.eye(3), [0.05, 0, 0]))
    assert cpu.update_pose(kfs[4].key, kfs[4].T_map_camera @ make_pose(np.eye(3), [0.05, 0, 0]))
    assert_same_points(gpu.points(), cpu.points(), atol=1e-4)
    corrections = {kf.key: make_pose(np.eye(3), [0.0, 0.1, 0.0]) @ kf.T_map_camera for kf in kfs[:5]}
    assert gpu.update_poses(corrections) == cpu.update_poses(corrections) == 5
    assert_same_points(gpu.points(), cpu.points(), atol=1e-4)
