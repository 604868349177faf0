"""drive(): the simulated robot through the core pipeline, with the product's defaults and a camera rig."""

from __future__ import annotations

import numpy as np
import pytest

from mapany_ros.core.geometry import invert, rotation_angle
from mapany_ros.core.pipeline import PipelineConfig
from mapany_ros.scoring.trajectory import ate
from mapany_ros.sim.drive import drive
from mapany_ros.sim.model_simulator import ModelSimulator
from mapany_ros.sim.odometry import DriftingOdometry, OdometryErrors
from mapany_ros.sim.scene import SyntheticScene

KEYFRAME_FIELDS = ("min_translation_m", "min_rotation_deg", "max_interval_s", "min_interval_s", "window_size",
                   "window_overlap", "max_window_latency_s")


@pytest.fixture(scope="module")
def scene() -> SyntheticScene:
    return SyntheticScene(0)


def keyframe_stamps(run) -> list[int]:
    return sorted({f.stamp_ns for r in run.results for f, out in zip(r.frames, r.window.output_mask, strict=True)
                   if out})


def test_drive_runs_the_pipeline_with_the_products_keyframe_and_window_defaults(scene):
    run = drive(scene, ModelSimulator(scene=scene, noise_seed=1), loops=0.5)
    product = PipelineConfig()
    for name in KEYFRAME_FIELDS:
        assert getattr(run.pipeline.config, name) == getattr(product, name), name
    assert run.pipeline.config.use_odometry is False and run.pipeline.config.thin_keyframes is False
    # Without odometry the product keeps a keyframe every max_interval_s (1 s), not every frame (0.2 s).
    gaps = np.diff(keyframe_stamps(run)) * 1e-9
    assert len(gaps) > 8 and np.all(gaps >= product.max_interval_s - 1e-6) and np.all(gaps <= 1.2 + 1e-6)


def test_with_odometry_keyframes_come_every_15_cm_or_10_deg(scene):
    odometry = DriftingOdometry(scene.base_pose, OdometryErrors())
    run = drive(scene, ModelSimulator(scene=scene, noise_seed=1), loops=0.5, rate_hz=10.0, odometry=odometry)
    stamps = keyframe_stamps(run)
    for a, b in zip(stamps, stamps[1:], strict=False):
        rel = invert(scene.base_pose(a * 1e-9)) @ scene.base_pose(b * 1e-9)
        moved = np.linalg.norm(rel[:3, 3]) >= 0.15 - 1e-9 or np.degrees(rotation_angle(rel)) >= 10.0 - 1e-6
        assert moved or (b - a) * 1e-9 >= 1.0 - 1e-6, (a, b)
    assert len(stamps) < 0.6 * run.pipeline.stats.frames_in


def test_every_frame_keyframe_keeps_the_dense_windows_tests_may_need(scene):
    run = drive(scene, ModelSimulator(scene=scene, noise_seed=1), loops=0.3, every_frame_keyframe=True)
    assert run.pipeline.stats.keyframes == run.pipeline.stats.frames_in
    assert len(keyframe_stamps(run)) == run.pipeline.stats.frames_in


def test_a_two_camera_rig_drives_both_cameras_with_their_stamps_and_extrinsics(scene):
    rig = scene.rig("front", "left")
    rate_hz = 10.0
    odometry = DriftingOdometry(scene.base_pose, OdometryErrors())
    sim = ModelSimulator(scene=scene, noise_seed=2, pose_sigma_m=0.0, pose_sigma_deg=0.0, bad_view_rate=0.0)
    run = drive(scene, sim, loops=0.3, rate_hz=rate_hz, odometry=odometry, cameras=rig)
    assert run.pipeline.config.cameras == ("front", "left")
    for name, camera in rig.items():
        np.testing.assert_array_equal(run.pipeline.extrinsic(name), camera.T_base_camera)
    period_ns = int(1e9 / rate_hz)
    groups = 0
    for r in run.results:
        for group in r.window.groups:
            assert [f.camera for f in group] == ["front", "left"]
            for f in group:
                offset_ns = int(round(rig[f.camera].stamp_offset_s * 1e9))
                assert (f.stamp_ns - offset_ns) % period_ns == 0 and f.frame_id == f"{f.camera}_optical_frame"
                np.testing.assert_array_equal(f.T_base_camera, rig[f.camera].T_base_camera)
            assert group[1].stamp_ns - group[0].stamp_ns == 4_000_000
            groups += 1
        # Each view is its own camera's: in the map, left sits where the truth puts it from front.
        views = dict(zip([f.key for f in r.frames], r.prediction.views, strict=True))
        for group in r.window.groups:
            (kf, front), (kl, left) = ((f.key, f) for f in group)
            rel = invert(views[kf].T_world_camera) @ views[kl].T_world_camera
            true = invert(scene.camera_pose(front.stamp_ns * 1e-9, rig["front"].T_base_camera)) @ \
                scene.camera_pose(left.stamp_ns * 1e-9, rig["left"].T_base_camera)
            E = invert(true) @ rel
            assert np.linalg.norm(E[:3, 3]) < 0.01 and np.degrees(rotation_angle(E)) < 0.5
    assert groups > 10
    cameras = [run.camera_of[s] for s in run.stamps]
    assert cameras.count("front") == cameras.count("left") > 10
    stamps, truth = run.stamps, run.truth()
    assert ate([run.base_poses[s] for s in stamps], truth, stamps)[0] < 0.05


def test_a_three_camera_rig_stamps_each_camera_a_few_milliseconds_apart(scene):
    rig = scene.rig("front", "left", "right")
    assert [c.stamp_offset_s for c in rig.values()] == [0.0, 0.004, 0.008]
    run = drive(scene, ModelSimulator(scene=scene, noise_seed=3), loops=0.2, cameras=rig)
    for r in run.results:
        for group in r.window.groups:
            assert [f.camera for f in group] == ["front", "left", "right"]
            assert np.diff([f.stamp_ns for f in group]).tolist() == [4_000_000, 4_000_000]
    assert set(run.camera_of.values()) == {"front", "left", "right"}


def test_options_override_the_defaults(scene):
    run = drive(scene, ModelSimulator(scene=scene), loops=0.2, window_size=4, max_interval_s=0.5)
    config = run.pipeline.config
    assert (config.window_size, config.window_overlap, config.max_interval_s) == (4, 2, 0.5)
    assert max(len(r.window.groups) for r in run.results) == 4
