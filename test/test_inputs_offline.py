"""Offline processing of what robots publish: odometry as TF only, extrinsics on /tf, covariance.

The same synthetic robot (drifting, late odometry) is written as a bag three ways: odometry on
/odom with the extrinsic on /tf_static (the reference), odometry as the odom -> base_link transform
on /tf only, and the base -> camera extrinsic on /tf with every odometry sample. ``mapany-ros
process`` must make the same path of all three (the same accuracy against ground truth).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore

from mapany_ros.commands import process as process_tool
from mapany_ros.scoring.trajectory import ate
from mapany_ros.sim.odometry import OdometryErrors
from mapany_ros.sim.robot_bag import write_synthetic_bag
from mapany_ros.sim.scene import SyntheticScene

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_PARAMS = REPO_ROOT / "config" / "demo.yaml"
W, H, RATE, DURATION = 96, 72, 10.0, 3.0
OVERRIDES = ["planesweep.downscale:=1", "planesweep.num_planes:=32", "keyframe.min_translation_m:=0.08",
             "window.size:=6", "window.overlap:=2"]
TYPESTORE = get_typestore(Stores.ROS2_KILTED)
#: Wheel odometry that drifts, so the path is not the ground truth by construction.
ERRORS = OdometryErrors(scale_error=0.04, yaw_drift_deg_per_m=3.0, seed=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("robots")
    scene = SyntheticScene(0)
    kinds = {"topic": {}, "tf_odometry": {"odom_source": "tf"}, "tf_extrinsic": {"extrinsic_source": "tf"}}
    return {k: write_synthetic_bag(root / k, width=W, height=H, duration_s=DURATION, rate_hz=RATE, scene=scene,
                                   odometry_errors=ERRORS, odom_delay_s=0.1, **kw) for k, kw in kinds.items()}


def topics_of(bag: Path) -> set[str]:
    with AnyReader([bag], default_typestore=TYPESTORE) as reader:
        return {c.topic for c in reader.connections}


def final_path(out: Path) -> dict[int, np.ndarray]:
    """Stamp -> T_map_base of the last path message of an output bag."""
    with AnyReader([out], default_typestore=TYPESTORE) as reader:
        conns = [c for c in reader.connections if c.topic == "/path"]
        msg = None
        for conn, _, raw in reader.messages(connections=conns):
            msg = reader.deserialize(raw, conn.msgtype)
    assert msg is not None
    return {p.header.stamp.sec * 10**9 + p.header.stamp.nanosec: _matrix(p.pose) for p in msg.poses}


def ground_truth(bag: Path) -> dict[int, np.ndarray]:
    with AnyReader([bag], default_typestore=TYPESTORE) as reader:
        conns = [c for c in reader.connections if c.topic == "/ground_truth/odom"]
        out = {}
        for conn, _, raw in reader.messages(connections=conns):
            m = reader.deserialize(raw, conn.msgtype)
            out[m.header.stamp.sec * 10**9 + m.header.stamp.nanosec] = _matrix(m.pose.pose)
    return out


def _matrix(pose: Any) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    q, t = pose.orientation, pose.position
    T = np.eye(4)
    T[:3, :3] = Rotation.from_quat([q.x, q.y, q.z, q.w]).as_matrix()
    T[:3, 3] = [t.x, t.y, t.z]
    return T


def run(bag: Path, out: Path, *extra: str) -> process_tool.OfflineRun:
    values, warnings = process_tool.load_parameters(DEMO_PARAMS, [*OVERRIDES, *extra])
    assert warnings == []
    run, summary = process_tool.process(bag, out, values, progress=False)
    assert summary.error == "" and summary.windows > 0
    return run


@pytest.fixture(scope="module")
def reference(bags: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[process_tool.OfflineRun, dict[int, np.ndarray]]:
    """The robot with its odometry on /odom and its extrinsic on /tf_static, processed."""
    out = tmp_path_factory.mktemp("reference") / "out"
    return run(bags["topic"], out), final_path(out)


def path_ate(path: dict[int, np.ndarray], truth: dict[int, np.ndarray]) -> float:
    stamps = sorted(path)
    return ate([path[s] for s in stamps], [truth[s] for s in stamps], stamps)[0]


def test_odometry_from_tf_only_gives_the_path_of_the_odometry_topic(bags, reference, tmp_path):
    assert "/odom" not in topics_of(bags["tf_odometry"]) and "/tf" in topics_of(bags["tf_odometry"])
    topic, ref = reference
    tf = run(bags["tf_odometry"], tmp_path / "tf", "odometry.source:=tf")
    assert tf.warnings == topic.warnings
    got = final_path(tmp_path / "tf")
    assert sorted(got) == sorted(ref) and len(ref) >= 6
    for s in ref:
        np.testing.assert_allclose(got[s], ref[s], atol=1e-6)
    truth = ground_truth(bags["topic"])
    ate_topic, ate_tf = path_ate(ref, truth), path_ate(got, truth)
    assert ate_tf <= ate_topic + 1e-4, (ate_tf, ate_topic)
    assert tf.pipeline.stats.frames_dropped == topic.pipeline.stats.frames_dropped
    # Without odometry.source: tf the bag lacks the odometry topic, and says so.
    with pytest.raises(process_tool.ProcessError, match="lacks topic"):
        run(bags["tf_odometry"], tmp_path / "refused")


def test_an_extrinsic_on_tf_instead_of_tf_static_gives_the_same_path(bags, reference, tmp_path):
    topic, ref = reference
    moving = run(bags["tf_extrinsic"], tmp_path / "moving")
    got = final_path(tmp_path / "moving")
    assert sorted(got) == sorted(ref)
    for s in ref:
        np.testing.assert_allclose(got[s], ref[s], atol=1e-6)
    assert moving.pipeline.stats.keyframes == topic.pipeline.stats.keyframes and not moving.warnings


def test_a_rig_with_odometry_and_extrinsics_on_tf_gives_the_path_of_the_topic_rig(tmp_path):
    """Two cameras, each with its own extrinsic and stamps: odometry as TF only and every camera's
    base -> C_link on /tf (the moving-joint path, interpolated at each image stamp) give the same path
    and the same depth of both cameras as odometry on /odom with the chains on /tf_static."""
    scene = SyntheticScene(0)
    rig = scene.rig("front", "left")
    kinds = {"topic": {}, "tf": {"odom_source": "tf", "extrinsic_source": "tf"}}
    bags = {k: write_synthetic_bag(tmp_path / f"rig_{k}", width=W, height=H, duration_s=DURATION, rate_hz=RATE,
                                   scene=scene, cameras=rig, odometry_errors=ERRORS, odom_delay_s=0.1, **kw)
            for k, kw in kinds.items()}
    cameras = "cameras:=[front,left]"
    topic = run(bags["topic"], tmp_path / "topic", cameras)
    tf = run(bags["tf"], tmp_path / "tf", cameras, "odometry.source:=tf")
    assert tf.warnings == topic.warnings
    assert set(tf.pipeline._moving_extrinsics) == {"front", "left"} and not topic.pipeline._moving_extrinsics
    ref, got = final_path(tmp_path / "topic"), final_path(tmp_path / "tf")
    assert sorted(got) == sorted(ref) and len(ref) >= 6
    for s in ref:
        np.testing.assert_allclose(got[s], ref[s], atol=1e-6)
    assert tf.pipeline.stats.keyframes == topic.pipeline.stats.keyframes
    assert tf.pipeline.stats.frames_dropped == topic.pipeline.stats.frames_dropped
    for out in ("topic", "tf"):
        depth = depth_stamps(tmp_path / out)
        assert depth["/front/depth"] and depth["/left/depth"], depth
        assert depth == depth_stamps(tmp_path / "topic")


def depth_stamps(out: Path) -> dict[str, list[int]]:
    """Per camera the stamps of its published depth images."""
    stamps: dict[str, list[int]] = {"/front/depth": [], "/left/depth": []}
    with AnyReader([out], default_typestore=TYPESTORE) as reader:
        conns = [c for c in reader.connections if c.topic in stamps]
        for conn, _, raw in reader.messages(connections=conns):
            m = reader.deserialize(raw, conn.msgtype)
            stamps[conn.topic].append(m.header.stamp.sec * 10**9 + m.header.stamp.nanosec)
    return stamps
