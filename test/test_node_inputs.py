"""mapany_node over real ROS 2 topics with a fake backend: bad input, resets, a slow backend.

The node runs in this process (so the backend can be replaced), but every message goes through
DDS on loopback like between processes.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from core_fakes import RecordingBackend
from nav_msgs.msg import Odometry
from node_harness import CameraModel, H, K, W

from mapany_ros.ros import conversions as conv

pytestmark = pytest.mark.ros


def test_bad_input_is_warned_dropped_and_good_input_still_flows(harness_factory):
    h = harness_factory(RecordingBackend())
    h.image(0.0)  # before any camera_info: held for it, then waits for /tf_static, which does not come
    bad_k = CameraModel(W, H, np.zeros((3, 3)), "plumb_bob", np.zeros(5))
    h.info(bad_k)
    assert h._wait(lambda: "info/camera" in h.warnings)
    h.info()
    time.sleep(0.2)
    h.image(0.01)  # no /tf_static extrinsic yet
    assert h._wait(lambda: "extrinsic" in h.warnings)
    h.static_tf()
    h.image(0.02, encoding="yuv422")
    h.image(0.03, step=10)
    h.image(0.04, height=0, width=0, step=0, data=b"")
    small = conv.rgb_to_image_msg(np.zeros((24, 32, 3), np.uint8), h.header(0.05))
    h.image_pub.publish(small)
    bad_odom = Odometry()
    bad_odom.header = h.header(0.06)
    bad_odom.header.frame_id, bad_odom.child_frame_id = "odom", "base_link"
    bad_odom.pose.pose.position.x = float("nan")
    bad_odom.pose.pose.orientation.w = 1.0
    h.odom_pub.publish(bad_odom)
    foreign = Odometry()  # another robot's odometry, or a misconfigured odom_frame
    foreign.header = h.header(0.07)
    foreign.header.frame_id, foreign.child_frame_id = "map", "other_base"
    foreign.pose.pose.orientation.w = 1.0
    h.odom_pub.publish(foreign)
    assert h._wait(lambda: {"image/camera", "size/camera", "odom", "odom_frames"} <= set(h.warnings))
    assert h.warnings.count("image/camera") >= 1
    stamps = h.good_stream(1.0, 7)
    assert h._wait(lambda: h.collector.out.depth_count >= 7 and h.collector.out.points_count >= 7
                   and h.collector.out.path is not None and len(h.collector.out.path.poses) >= 7, 15), h.warnings
    out = h.collector.out
    assert sorted(out.depth) == stamps  # one depth per keyframe, exactly once, source stamps
    for s, msg in out.depth.items():
        assert msg.encoding == "32FC1" and msg.header.frame_id == "camera_optical_frame"
        info = out.depth_info[s]
        assert (info.width, info.height) == (msg.width, msg.height) == (W, H)
        np.testing.assert_allclose(np.array(info.k).reshape(3, 3), K)
        assert out.points[s].header.frame_id == "map"
    assert out.path is not None and out.path.header.frame_id == "map" and len(out.path.poses) == 7
    # base pose in map: odometry put the base at x = t
    np.testing.assert_allclose(out.path.poses[-1].pose.position.x, 1.6, atol=1e-6)
    map_odom = [T for p, c, _, T in out.tf if (p, c) == ("map", "odom")]
    assert map_odom and all(np.allclose(T, np.eye(4), atol=1e-6) for T in map_odom)
    assert h.node.pipeline.stats.windows_failed == 0


def test_images_before_camera_info_and_tf_static_are_not_lost(harness_factory):
    h = harness_factory(RecordingBackend())
    first = h.image(1.0)  # a driver's first frames can beat its camera_info, and robot_state_publisher
    h.odom(1.0)
    h.odom(1.05)
    time.sleep(0.1)
    h.info()
    time.sleep(0.1)
    h.static_tf()
    stamps = h.good_stream(1.1, 5)
    first_stamp = conv.stamp_to_ns(first.header.stamp)
    assert h._wait(lambda: sorted(h.collector.out.depth) == [first_stamp, *stamps], 15), (
        sorted(h.collector.out.depth), h.warnings)


def test_stamps_going_backwards_reset_with_one_warning(harness_factory, caplog):
    h = harness_factory(RecordingBackend())
    h.info()
    h.static_tf()
    time.sleep(0.3)
    first = h.good_stream(5.0, 4)
    assert h._wait(lambda: h.collector.out.depth_count >= 4, 15)
    resets_before = h.node.pipeline.stats.resets
    second = h.good_stream(1.0, 4)  # the bag loops
    assert h._wait(lambda: h.collector.out.depth_count >= 8, 15)
    assert h.node.pipeline.stats.resets == resets_before + 1
    assert sorted(h.collector.out.depth) == sorted(first + second)


def test_slow_backend_with_30hz_input_never_blocks_and_thins_keyframes(harness_factory):
    backend = RecordingBackend(delay_s=0.4)
    h = harness_factory(backend, **{"window.size": 3, "window.overlap": 1, "window.queue_size": 2,
                                     "keyframe.min_translation_m": 0.0, "keyframe.max_interval_s": 0.01,
                                     "odometry.max_wait_s": 1.0})
    h.info()
    h.static_tf()
    time.sleep(0.3)
    start = time.monotonic()
    for i in range(90):  # 3 s of 30 Hz images and 60 Hz odometry, paced by the clock
        t = i / 30
        h.odom(t)
        h.odom(t + 1 / 60)
        h.image(t)
        time.sleep(max(0.0, start + (i + 1) / 30 - time.monotonic()))
    # Reliable QoS: every image reaches the callback; a loaded machine may only take longer.
    assert h._wait(lambda: len(h.callback_s) == 90, 20.0), len(h.callback_s)
    h._wait(lambda: False, 1.0)
    p = h.node.pipeline
    assert max(h.callback_s) < 0.1, f"image callback took {max(h.callback_s) * 1e3:.0f} ms"
    assert p.stats.keyframes_skipped > 0
    assert len(p._pending) <= (2 + 1) * (3 - 1) and len(p._waiting) <= p.config.max_waiting_frames
    assert backend.max_active == 1
    # Windows are never dropped: every one built went to the backend (one may still be running).
    assert p.stats.windows_built - len(backend.calls) in (0, 1)


def test_two_synchronised_cameras_share_windows_and_each_gets_its_depth(harness_factory):
    from core_fakes import RecordingBackend as Backend
    from node_harness import T0, T_BASE_CAMERA
    from tf2_msgs.msg import TFMessage

    from mapany_ros.core.geometry import make_pose

    backend = Backend()
    h = harness_factory(backend, cameras=["left", "right"], **{"sync.tolerance_s": 0.005})
    T_right = T_BASE_CAMERA @ make_pose(np.eye(3), [0.12, 0.0, 0.0])
    h.tf_pub.publish(TFMessage(transforms=[
        conv.matrix_to_transform_stamped(T_BASE_CAMERA, "base_link", "left_optical_frame", T0),
        conv.matrix_to_transform_stamped(T_right, "base_link", "right_optical_frame", T0)]))
    for cam in h.cameras:
        h.info(camera=cam)
    time.sleep(0.3)
    stamps = []
    for i in range(6):
        t = 1.0 + 0.1 * i
        h.odom(t)
        h.odom(t + 0.05)
        time.sleep(0.01)
        h.image(t, camera="left")
        h.image(t + 0.002, camera="right")  # within the sync tolerance
        h.image(t + 0.05, camera="right")  # an unmatched frame: dropped by the sync
        stamps.append(T0 + int(t * 1e9))
        time.sleep(0.03)
    left, right = h.collectors["left"].out, h.collectors["right"].out
    assert h._wait(lambda: len(left.depth) >= 6 and len(right.depth) >= 6, 15), h.warnings
    assert sorted(left.depth) == stamps
    assert sorted(right.depth) == [s + 2_000_000 for s in stamps]
    assert all(m.header.frame_id == "right_optical_frame" for m in right.depth.values())
    # Both cameras of a group go to the backend together, context groups included.
    for call in backend.calls:
        assert [f.camera for f in call] == ["left", "right"] * (len(call) // 2)
        for a, b in zip(call[::2], call[1::2], strict=True):
            np.testing.assert_allclose(np.linalg.inv(a.T_world_camera) @ b.T_world_camera,
                                       np.linalg.inv(T_BASE_CAMERA) @ T_right, atol=5e-3)  # 2 ms apart at 1 m/s
    assert h._wait(lambda: left.path is not None and len(left.path.poses) == 6, 5)


def test_parameters_cannot_change_at_run_time(harness_factory):
    from rclpy.parameter import Parameter

    h = harness_factory(RecordingBackend())
    result = h.node.set_parameters([Parameter("window.size", value=4)])[0]
    assert not result.successful and "read-only" in result.reason
    assert h.node.get_parameter("window.size").value == 3
