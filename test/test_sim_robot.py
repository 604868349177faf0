"""The synthetic robot with a camera rig: in a bag (no DDS) and on ROS topics (loopback DDS).

Every camera of the rig must appear under its own namespace with its own stamps, frame ids and
extrinsic on /tf_static, as several camera drivers and robot_state_publisher would publish them.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore

from mapany_ros.ros import conversions as conv
from mapany_ros.sim.odometry import OdometryErrors
from mapany_ros.sim.robot_bag import main as synthetic_bag_main
from mapany_ros.sim.robot_bag import write_synthetic_bag
from mapany_ros.sim.scene import SyntheticScene, make_rig_sequences

W, H, RATE, N_FRAMES, START = 48, 36, 10.0, 6, 4.0
OFFSET_NS = 1_700_000_000 * 10**9
TYPESTORE = get_typestore(Stores.ROS2_KILTED)


@pytest.fixture(scope="module")
def scene() -> SyntheticScene:
    return SyntheticScene(0)


def read_bag(path: Path) -> tuple[dict[str, str], dict[str, list]]:
    with AnyReader([path], default_typestore=TYPESTORE) as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
        msgs: dict[str, list] = {t: [] for t in types}
        for conn, t, raw in reader.messages():
            msgs[conn.topic].append((t, reader.deserialize(raw, conn.msgtype)))
    return types, msgs


def stamp(msg) -> int:
    return conv.stamp_to_ns(msg.header.stamp)


def static_chains(tf_static) -> dict[tuple[str, str], np.ndarray]:
    return {(tf.header.frame_id, tf.child_frame_id): conv.transform_to_matrix(tf.transform)
            for tf in tf_static.transforms}


def check_rig_extrinsics(chains: dict, rig) -> None:
    for name, camera in rig.items():
        T = chains["base_link", f"{name}_link"] @ chains[f"{name}_link", f"{name}_optical_frame"]
        np.testing.assert_allclose(T, camera.T_base_camera, atol=1e-9)


def test_a_two_camera_bag_has_each_camera_on_its_own_topics_stamps_and_extrinsic(tmp_path, scene):
    rig = scene.rig("front", "left")
    bag = write_synthetic_bag(tmp_path / "rig", width=W, height=H, duration_s=N_FRAMES / RATE, rate_hz=RATE,
                              start_s=START, scene=scene, cameras=rig,
                              odometry_errors=OdometryErrors.good(slips=[(START + 0.3, 0.1, 5.0)]))
    types, msgs = read_bag(bag)
    assert set(types) == {"/front/image_raw", "/front/camera_info", "/left/image_raw", "/left/camera_info", "/odom",
                          "/tf_static", "/ground_truth/odom", "/ground_truth/depth", "/ground_truth/camera_info"}
    reference = make_rig_sequences(rig, 0, W, H, N_FRAMES, RATE, start_s=START, scene=scene)
    for name, camera in rig.items():
        expected = [OFFSET_NS + int(round((START + i / RATE + camera.stamp_offset_s) * 1e9)) for i in range(N_FRAMES)]
        for topic in (f"/{name}/image_raw", f"/{name}/camera_info"):
            assert [stamp(m) for _, m in msgs[topic]] == expected, topic
            assert {m.header.frame_id for _, m in msgs[topic]} == {f"{name}_optical_frame"}
        # The ground truth of this camera: its own depth and the base pose at its own stamps.
        depth = {stamp(m): conv.depth_image_to_array(m) for _, m in msgs["/ground_truth/depth"]
                 if m.header.frame_id == f"{name}_optical_frame"}
        assert sorted(depth) == expected
        for s, f in zip(expected, reference[name].frames, strict=True):
            np.testing.assert_array_equal(depth[s], f.depth)
        _, rendered = scene.render(scene.camera_pose((expected[0] - OFFSET_NS) * 1e-9, camera.T_base_camera),
                                   reference[name].camera_model, supersample=1)
        np.testing.assert_allclose(depth[expected[0]], rendered, rtol=1e-6)
        truth = {stamp(m): conv.odometry_to_matrix(m) for _, m in msgs["/ground_truth/odom"]}
        for s in expected:
            np.testing.assert_allclose(truth[s], scene.base_pose((s - OFFSET_NS) * 1e-9), atol=1e-9)
    [(_, tf_static)] = msgs["/tf_static"]
    check_rig_extrinsics(static_chains(tf_static), rig)
    # The odometry carries the slip: 5 degrees of heading error appear across its time.
    odom = {stamp(m): conv.odometry_to_matrix(m) for _, m in msgs["/odom"]}
    yaw_err = {s: np.degrees(np.arctan2(*(np.linalg.inv(scene.base_pose((s - OFFSET_NS) * 1e-9)) @ T)[[1, 0], 0]))
               for s, T in odom.items()}
    slip_ns = OFFSET_NS + int((START + 0.3) * 1e9)
    before = max(abs(v) for s, v in yaw_err.items() if s < slip_ns - 20_000_000)
    after = min(v for s, v in yaw_err.items() if s > slip_ns + 20_000_000)
    assert before < 0.2 and after > 4.8, (before, after)


def test_a_rig_bag_with_odometry_and_extrinsics_on_tf_chains_every_camera(tmp_path, scene):
    """A rig whose odometry is TF only and whose base -> C_link joints are on /tf: every odometry stamp
    carries odom -> base_link and each camera's base_link -> C_link; /tf_static keeps C_link -> optical."""
    rig = scene.rig("front", "left")
    bag = write_synthetic_bag(tmp_path / "rig_tf", width=W, height=H, duration_s=N_FRAMES / RATE, rate_hz=RATE,
                              start_s=START, scene=scene, cameras=rig, odom_source="tf", extrinsic_source="tf")
    types, msgs = read_bag(bag)
    assert "/odom" not in types and types["/tf"] == "tf2_msgs/msg/TFMessage"
    [(_, tf_static)] = msgs["/tf_static"]
    assert set(static_chains(tf_static)) == {(f"{c}_link", f"{c}_optical_frame") for c in rig}
    by_stamp: dict[int, dict] = {}
    for _, m in msgs["/tf"]:
        for tf in m.transforms:
            by_stamp.setdefault(conv.stamp_to_ns(tf.header.stamp), {})[tf.header.frame_id, tf.child_frame_id] = \
                conv.transform_to_matrix(tf.transform)
    assert len(by_stamp) >= N_FRAMES
    for s, chains in by_stamp.items():
        assert set(chains) == {("odom", "base_link")} | {("base_link", f"{c}_link") for c in rig}, s
        np.testing.assert_allclose(chains["odom", "base_link"], scene.base_pose((s - OFFSET_NS) * 1e-9), atol=1e-9)
        check_rig_extrinsics({**chains, **static_chains(tf_static)}, rig)
    with pytest.raises(ValueError, match="extrinsic_source"):
        write_synthetic_bag(tmp_path / "bad", scene=scene, cameras=rig, extrinsic_source="joint_states")


def test_the_bag_command_takes_a_rig_and_slips(tmp_path, capsys):
    rc = synthetic_bag_main([str(tmp_path / "bag"), "--width", "32", "--height", "24", "--duration", "0.3",
                             "--cameras", "front,left,right", "--odom-slip", "4.1,0.2,3"])
    assert rc == 0 and "front, left, right" in capsys.readouterr().out
    types, msgs = read_bag(tmp_path / "bag")
    assert {"/front/image_raw", "/left/image_raw", "/right/image_raw"} <= set(types)
    first = [stamp(msgs[f"/{c}/image_raw"][0][1]) for c in ("front", "left", "right")]
    assert np.diff(first).tolist() == [4_000_000, 4_000_000]
    with pytest.raises(SystemExit):
        synthetic_bag_main([str(tmp_path / "bad"), "--cameras", "front,up"])


@pytest.mark.ros
@pytest.mark.parametrize("odom_as_tf", [False, True])
def test_the_robot_publishes_every_camera_of_its_rig(rclpy_context, scene, odom_as_tf):
    import rclpy
    from nav_msgs.msg import Odometry
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image
    from tf2_msgs.msg import TFMessage

    from mapany_ros.sim.robot_publisher import RELIABLE, SyntheticSource

    rig = scene.rig("front", "left")
    seqs = make_rig_sequences(rig, 0, W, H, N_FRAMES, RATE, start_s=START, scene=scene, supersample=1)
    source = SyntheticSource(seqs, stamp_offset_ns=OFFSET_NS, odom_as_tf=odom_as_tf, context=rclpy_context)
    listener = rclpy.create_node("rig_listener", context=rclpy_context)
    got: dict[str, list] = {}

    def keep(topic):
        return lambda msg: got.setdefault(topic, []).append(msg)

    for name in rig:
        listener.create_subscription(Image, f"{name}/image_raw", keep(f"{name}/image_raw"), RELIABLE)
        listener.create_subscription(CameraInfo, f"{name}/camera_info", keep(f"{name}/camera_info"), RELIABLE)
    latched = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    listener.create_subscription(TFMessage, "/tf_static", keep("/tf_static"), latched)
    listener.create_subscription(TFMessage, "/tf", keep("/tf"), RELIABLE)
    listener.create_subscription(Odometry, "odom", keep("odom"), RELIABLE)
    executor = SingleThreadedExecutor(context=rclpy_context)
    executor.add_node(listener)
    try:
        deadline = time.monotonic() + 30.0
        pubs = (source.image_pubs["left"], source.tf_pub if odom_as_tf else source.odom_pub)
        while any(p.get_subscription_count() == 0 for p in pubs) and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
        player = threading.Thread(target=source.play, kwargs={"speed": 4.0})
        player.start()
        last_image = max(OFFSET_NS + seq.frames[-1].stamp_ns for seq in seqs.values())

        def odometry_done() -> bool:  # the odometry after the last image, published after it, is in
            if odom_as_tf:
                return any(conv.stamp_to_ns(tf.header.stamp) > last_image for m in got.get("/tf", [])
                           for tf in m.transforms)
            return any(stamp(m) > last_image for m in got.get("odom", []))

        while time.monotonic() < deadline and (player.is_alive() or any(
                len(got.get(f"{c}/image_raw", [])) < N_FRAMES for c in rig) or not odometry_done()):
            executor.spin_once(timeout_sec=0.05)
        player.join()
    finally:
        executor.shutdown()
        listener.destroy_node()
        source.destroy_node()
    for name, camera in rig.items():
        images = got.get(f"{name}/image_raw", [])
        expected = [OFFSET_NS + f.stamp_ns for f in seqs[name].frames]
        assert [stamp(m) for m in images] == expected, name
        assert {m.header.frame_id for m in images} == {f"{name}_optical_frame"}
        assert expected[0] - OFFSET_NS == int(round((START + camera.stamp_offset_s) * 1e9))
        np.testing.assert_array_equal(conv.image_to_rgb(images[0]), seqs[name].frames[0].rgb)
        assert {m.header.frame_id for m in got[f"{name}/camera_info"]} == {f"{name}_optical_frame"}
    check_rig_extrinsics(static_chains(got["/tf_static"][-1]), rig)
    # Odometry on odom, or as odom -> base_link on /tf only: the same poses, around every camera's stamps.
    assert not got.get("/tf" if not odom_as_tf else "odom")
    if odom_as_tf:
        odom = {conv.stamp_to_ns(tf.header.stamp): conv.transform_to_matrix(tf.transform)
                for m in got["/tf"] for tf in m.transforms}
        assert {(tf.header.frame_id, tf.child_frame_id) for m in got["/tf"] for tf in m.transforms} == \
            {("odom", "base_link")}
    else:
        odom = {stamp(m): conv.odometry_to_matrix(m) for m in got["odom"]}
    images = sorted(OFFSET_NS + f.stamp_ns for seq in seqs.values() for f in seq.frames)
    assert min(odom) < images[0] and max(odom) > images[-1]
    for s, T in odom.items():
        np.testing.assert_allclose(T, scene.base_pose((s - OFFSET_NS) * 1e-9), atol=1e-6)
