"""mapany_node with ``backend: mapanything`` over DDS: through the contract double in CI, and through
the real upstream code (reduced model, random weights) where it is installed."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from mapanything_double import MapAnythingDouble, install, write_fake_dinov2_hub, write_model_dir
from node_harness import T0, T_BASE_CAMERA
from scipy.spatial.transform import Rotation
from tf2_msgs.msg import TFMessage

from mapany_ros.core.frames import CameraModel
from mapany_ros.core.geometry import invert, make_pose
from mapany_ros.ros import conversions as conv
from mapany_ros.sim.scene import make_sequence

pytestmark = pytest.mark.ros

CAMERA = CameraModel(160, 120, np.array([[120.0, 0, 79.5], [0, 120.0, 59.5], [0, 0, 1]]), "plumb_bob", np.zeros(5))


def camera_poses(n: int, seed: int = 0) -> list[np.ndarray]:
    """Cameras inside the double's plane room, looking roughly along +z, moving a few cm each."""
    rng = np.random.default_rng(seed)
    poses = []
    for i in range(n):
        R = Rotation.from_euler("yxz", [0.05 * i + rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05), 0.0])
        poses.append(make_pose(R.as_matrix(), [0.3 * i - 1.0, rng.uniform(-0.2, 0.2), 0.15 * i]))
    return poses


def play(h, poses, rng, register=None) -> list[int]:
    """Odometry at each image stamp (exact priors), then the image; returns the stamps."""
    stamps = []
    for i, T_odom_cam in enumerate(poses):
        t = 1.0 + 0.1 * i
        T_odom_base = T_odom_cam @ invert(T_BASE_CAMERA)
        h.odom(t, pose=T_odom_base)
        h.odom(t + 0.05, pose=T_odom_base)
        rgb = rng.integers(0, 256, (CAMERA.height, CAMERA.width, 3), dtype=np.uint8)
        if register is not None:
            register(rgb, CAMERA, T_odom_cam)
        time.sleep(0.02)
        h.image(t, rgb=rgb)
        stamps.append(T0 + int(round(t * 1e9)))
        time.sleep(0.05)
    return stamps


def check_outputs(h, stamps, poses, truth_depth=None, require_valid: bool = True, camera: CameraModel = CAMERA) -> None:
    out = h.collector.out
    assert sorted(out.depth) == stamps
    for s, T in zip(stamps, poses, strict=True):
        msg, info, conf = out.depth[s], out.depth_info[s], out.confidence[s]
        assert (conf.width, conf.height, conf.encoding) == (camera.width, camera.height, "32FC1")
        assert msg.header.frame_id == "camera_optical_frame" and msg.encoding == "32FC1"
        assert (msg.width, msg.height) == (info.width, info.height) == (camera.width, camera.height)
        np.testing.assert_allclose(np.array(info.k).reshape(3, 3), camera.K)
        depth = conv.depth_image_to_array(msg)
        cloud = out.points[s]
        assert cloud.header.frame_id == "map"
        if require_valid:
            assert np.isfinite(depth).mean() > 0.3 and cloud.width > 0
        if truth_depth is not None:
            gt = truth_depth(camera, T)
            ok = np.isfinite(depth) & np.isfinite(gt)
            assert ok.mean() > 0.5
            rel = np.abs(depth[ok] - gt[ok]) / gt[ok]
            assert np.median(rel) < 0.01, f"median relative depth error {np.median(rel):.4f}"
            pts, _ = conv.pointcloud2_to_arrays(cloud)
            # Points are in map = odom: back in the true camera they lie at the true depth.
            Tinv = invert(T)
            pc = pts @ Tinv[:3, :3].T + Tinv[:3, 3]
            u = np.round(camera.K[0, 0] * pc[:, 0] / pc[:, 2] + camera.K[0, 2]).astype(int)
            v = np.round(camera.K[1, 1] * pc[:, 1] / pc[:, 2] + camera.K[1, 2]).astype(int)
            inside = (u >= 0) & (u < camera.width) & (v >= 0) & (v < camera.height)
            assert inside.mean() > 0.99
            err = np.abs(pc[inside, 2] - gt[v[inside], u[inside]])
            assert np.nanmedian(err) < 0.02
    assert out.path is not None and len(out.path.poses) == len(stamps)
    map_odom = [T for p, c, _, T in out.tf if (p, c) == ("map", "odom")]
    assert map_odom


def test_node_runs_mapanything_on_the_synthetic_scene_through_the_contract_double(
    harness_factory, tmp_path, monkeypatch
):
    """The synthetic robot's camera, odometry and extrinsic; the double predicts the scene's true geometry."""
    seq = make_sequence(0, CAMERA.width, CAMERA.height, 7, 10.0, start_s=4.0)
    double = MapAnythingDouble(seed=3, scene=seq.scene)
    install(monkeypatch, double)
    write_fake_dinov2_hub(tmp_path / "cache" / "torch" / "hub")
    model_dir = write_model_dir(tmp_path / "model")
    monkeypatch.setattr(torch.hub, "urlopen", lambda *a, **k: pytest.fail("network access"))
    h = harness_factory(None, model=seq.camera_model, **{
        "backend": "mapanything", "device": "cpu", "mapanything.model_path": str(model_dir),
        "mapanything.cache_dir": str(tmp_path / "cache"), "window.size": 4, "window.overlap": 1,
        "keyframe.min_translation_m": 0.01, "placement.max_residual_m": 0.05, "stats_period_s": 0.5,
    })
    h.info()
    h.tf_pub.publish(TFMessage(transforms=[conv.matrix_to_transform_stamped(
        seq.T_base_camera, "base_link", "camera_optical_frame", T0)]))
    time.sleep(0.3)
    stamps, poses = [], []
    for i, f in enumerate(seq.frames):
        t = 1.0 + 0.1 * i
        h.odom(t, pose=f.T_odom_base)
        h.odom(t + 0.05, pose=seq.scene.base_pose(f.stamp_ns * 1e-9 + 0.05))
        double.register(f.rgb, seq.camera_model, f.T_odom_camera)
        time.sleep(0.02)
        h.image(t, rgb=f.rgb)
        stamps.append(T0 + int(round(t * 1e9)))
        poses.append(f.T_odom_camera)
        time.sleep(0.05)
    assert h._wait(lambda: len(h.collector.out.points) >= 7 and h.collector.out.path is not None
                   and len(h.collector.out.path.poses) >= 7, 30), h.warnings
    check_outputs(h, stamps, poses, truth_depth=lambda cam, T: seq.scene.render(T, cam)[1], camera=seq.camera_model)
    # A perfect model agrees with exact odometry: map -> odom is identity.
    for p, c, _, T in h.collector.out.tf:
        if (p, c) == ("map", "odom"):
            np.testing.assert_allclose(T, np.eye(4), atol=2e-3)
    assert len(double.calls) >= 2 and h.node.pipeline.stats.windows_failed == 0
    # The window's metric scale factor and placement residual reach /diagnostics.
    assert h._wait(lambda: "last_metric_scale" in h.collector.status, 5)
    assert float(h.collector.status["last_metric_scale"]) == pytest.approx(double.metric_scaling_factor)
    assert float(h.collector.status["last_placement_residual_m"]) < 1e-3


#: What upstream's preprocess_inputs makes of CAMERA's 160x120 (4:3) images: the 518x392 bucket.
MODEL_GRID = (392, 518)
#: Placement without its view checks: random weights predict poses no check could accept.
NO_VIEW_CHECKS = {"placement.view_consistency": 0.0, "placement.max_depth_m": 0.0, "placement.view_sigma_m": 10.0,
                  "placement.view_sigma_deg": 90.0, "placement.max_residual_m": 0.0}


def real_model_harness(harness_factory, **params):
    """The node on the real upstream code with the reduced random-weight model of MAPANY_TEST_MODEL_PATH
    (``mapany_ros.bench.gpu.build_random_model``), and the shapes of every view its model was given."""
    pytest.importorskip("mapanything", reason="upstream MapAnything is not installed")
    model_path = os.environ.get("MAPANY_TEST_MODEL_PATH")
    if not model_path:
        pytest.skip("MAPANY_TEST_MODEL_PATH (config.json + model.safetensors) is not set")
    h = harness_factory(None, model=CAMERA, **{
        "backend": "mapanything", "device": "cpu", "mapanything.model_path": model_path,
        "mapanything.cache_dir": os.environ.get("MAPANY_TEST_CACHE_DIR", ""), "window.size": 3,
        "window.overlap": 1, "keyframe.min_translation_m": 0.01, "window.queue_size": 8, "stats_period_s": 0.5,
        **params,
    })
    model = h.node.backend._model
    assert type(model).__module__.startswith("mapanything."), type(model)  # upstream's class, not a double
    calls: list[list[tuple[int, ...]]] = []
    upstream_infer = model.infer

    def infer(views, **kwargs):  # records what the real model runs on, then runs it
        calls.append([tuple(v["img"].shape) for v in views])
        return upstream_infer(views, **kwargs)

    model.infer = infer
    h.info()
    h.static_tf()
    time.sleep(0.3)
    return h, calls


def status_counts(h) -> dict[str, int]:
    """The pipeline counters the node last reported on /diagnostics."""
    keys = ("windows_built", "windows_done", "windows_failed", "windows_rejected", "views_rejected", "views_unplaced")
    status = dict(h.collector.status)
    return {k: int(status[k]) for k in keys} if all(k in status for k in keys) else {}


def windows_finished(h, n: int) -> bool:
    c = status_counts(h)
    return bool(c) and c["windows_done"] + c["windows_rejected"] + c["windows_failed"] >= n


def check_model_calls(calls, n_windows: int) -> None:
    """Every window ran through the real model once, all its views at the model grid of CAMERA."""
    assert len(calls) == n_windows, calls
    for views in calls:
        assert views == [(1, 3, *MODEL_GRID)] * 3, views


@pytest.mark.mapanything
def test_node_runs_the_real_reduced_mapanything_model(harness_factory):
    """The data path end to end on the real model: it loads, infers every window at the model grid
    and publishes depth, confidence, camera_info, clouds and the path of every keyframe at the
    input resolution. Placement's view checks are off: random weights predict poses that they
    rightly reject (the next test counts those rejections with the checks on)."""
    h, calls = real_model_harness(harness_factory, **NO_VIEW_CHECKS)
    poses = camera_poses(5)
    stamps = play(h, poses, np.random.default_rng(1))
    out = h.collector.out
    assert h._wait(lambda: min(len(out.points), len(out.depth_info), len(out.confidence)) >= 5 and out.path is not None
                   and len(out.path.poses) >= 5 and windows_finished(h, 2), 300), h.warnings
    # The reduced model's dense head is set so every pixel is valid at about 3 m: depth reaches the clouds.
    check_outputs(h, stamps, poses)
    check_model_calls(calls, 2)
    counts = status_counts(h)
    assert counts["windows_done"] == 2 and counts["windows_failed"] == 0 and counts["views_rejected"] == 0
    assert not [w for w in h.warnings if w.startswith("backend/")], h.warnings


@pytest.mark.mapanything
def test_node_counts_the_random_weight_views_its_view_checks_reject(harness_factory):
    """With the default view checks the views of a random-weight model are rejected, counted on
    /diagnostics and not published; every other view is, and the node keeps running. Only the
    window-level residual limit is off: whole windows rejected would hide which views were."""
    h, calls = real_model_harness(harness_factory, **{"placement.max_residual_m": 0.0})
    stamps = play(h, camera_poses(5), np.random.default_rng(1))
    out = h.collector.out

    def settled() -> bool:
        """Every keyframe published whole, or its depth alone (its view passed the view checks but not
        the graph: counted as unplaced), or counted as a rejected view."""
        counts = status_counts(h)
        depth = list(out.depth)
        return (windows_finished(h, 2) and len(depth) + counts["views_rejected"] >= 5
                and all(s in out.depth_info and s in out.confidence for s in depth)
                and sum(s not in out.points for s in depth) <= counts["views_unplaced"])

    assert h._wait(settled, 300), (status_counts(h), h.warnings)
    check_model_calls(calls, 2)
    counts = status_counts(h)
    assert counts["windows_built"] == 2 and counts["windows_failed"] == 0, counts
    assert counts["views_rejected"] >= 1, counts  # random poses and depth fail the view checks
    assert counts["windows_rejected"] == 0, counts
    published = sorted(out.depth)
    assert set(published) <= set(stamps)
    # Window 2 re-predicts one context keyframe: a rejected view is a new keyframe or that one.
    assert 5 - counts["views_rejected"] <= len(published) <= 6 - counts["views_rejected"], (published, counts)
    for s in published:  # what passed is published whole, at the input resolution
        assert (out.depth[s].width, out.depth[s].height) == (CAMERA.width, CAMERA.height)
        np.testing.assert_allclose(np.array(out.depth_info[s].k).reshape(3, 3), CAMERA.K)
    assert any("views rejected" in message for _, message in list(h.collector.status_history))
    assert not [w for w in h.warnings if w.startswith("backend/")], h.warnings
    assert h._wait(lambda: h.node.pipeline.status()["backend_busy"] is False, 30) and h.thread.is_alive()
