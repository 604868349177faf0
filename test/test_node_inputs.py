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


def test_odometry_from_tf_only_and_a_panning_camera_over_dds(harness_factory):
    """An odometry node that publishes only TF, and a camera on a pan head (its joint on /tf): every
    frame gets both at its own stamp, the path is the odometry's."""
    from node_harness import T0, T_BASE_CAMERA
    from scipy.spatial.transform import Rotation
    from tf2_msgs.msg import TFMessage

    from mapany_ros.core.geometry import make_pose

    T_BASE_PAN = make_pose(np.eye(3), [0.1, 0.0, 0.3])
    T_HEAD_CAMERA = make_pose(np.eye(3), [0.05, 0.0, 0.2]) @ T_BASE_CAMERA  # 5 cm off the pan axis

    def pan(t: float) -> np.ndarray:
        return make_pose(Rotation.from_euler("z", 0.8 * (t - 1.0)).as_matrix(), [0, 0, 0])

    def odom(t: float) -> np.ndarray:
        return make_pose(Rotation.from_euler("z", 0.1 * t).as_matrix(), [t, 0.2 * t, 0])

    backend = RecordingBackend()
    h = harness_factory(backend, **{"odometry.source": "tf"})
    assert h.node.inputs._odometry_chain is not None
    h.info()
    h.tf_pub.publish(TFMessage(transforms=[
        conv.matrix_to_transform_stamped(T_BASE_PAN, "base_link", "pan_link", T0),
        conv.matrix_to_transform_stamped(T_HEAD_CAMERA, "head", "camera_optical_frame", T0)]))
    time.sleep(0.2)
    stamps, truth = [], {}
    for i in range(8):
        t = 1.0 + 0.1 * i
        for s in (t, t + 0.05):  # odometry and joint states at 20 Hz, as TF only
            h.tf(s, "odom", "base_link", odom(s))
            h.tf(s, "pan_link", "head", pan(s))
        time.sleep(0.01)
        stamp = conv.stamp_to_ns(h.image(t + 0.025).header.stamp)  # between the TF samples
        stamps.append(stamp)
        truth[stamp] = (odom(t + 0.025), T_BASE_PAN @ pan(t + 0.025) @ T_HEAD_CAMERA)
        time.sleep(0.02)
    out = h.collector.out
    assert h._wait(lambda: sorted(out.depth) == stamps and out.path is not None and len(out.path.poses) == 8,
                   15), (sorted(out.depth), h.warnings)
    seen = {f.stamp_ns: f for call in backend.calls for f in call}
    assert sorted(seen) == stamps
    for stamp, f in seen.items():
        T_odom_base, T_base_cam = truth[stamp]
        np.testing.assert_allclose(f.T_world_base, T_odom_base, atol=1e-3)  # 20 Hz: chord against arc
        np.testing.assert_allclose(f.T_base_camera, T_base_cam, atol=1e-4)
        np.testing.assert_allclose(f.T_world_camera, T_odom_base @ T_base_cam, atol=1e-3)
    for pose in out.path.poses:  # the map is the odometry frame (placement may nudge it by a few mm)
        T_odom_base, _ = truth[conv.stamp_to_ns(pose.header.stamp)]
        np.testing.assert_allclose(conv.pose_to_matrix(pose.pose), T_odom_base, atol=5e-3)
    assert not {"odom", "odom_frames", "extrinsic", "tf"} & set(h.warnings), h.warnings


def test_one_camera_silent_for_10_s_the_other_keeps_mapping_diagnostics_name_it_it_rejoins(harness_factory):
    from node_harness import T0, T_BASE_CAMERA
    from tf2_msgs.msg import TFMessage

    from mapany_ros.core.geometry import make_pose

    backend = RecordingBackend()
    h = harness_factory(backend, cameras=["left", "right"], **{"sync.tolerance_s": 0.005, "stats_period_s": 0.5,
                                                                "window.queue_size": 16,
                                                                "keyframe.min_translation_m": 0.01})
    h.tf_pub.publish(TFMessage(transforms=[
        conv.matrix_to_transform_stamped(T_BASE_CAMERA, "base_link", "left_optical_frame", T0),
        conv.matrix_to_transform_stamped(T_BASE_CAMERA @ make_pose(np.eye(3), [0.12, 0, 0]), "base_link",
                                         "right_optical_frame", T0)]))
    for cam in h.cameras:
        h.info(camera=cam)
    time.sleep(0.3)
    left, right = h.collectors["left"].out, h.collectors["right"].out
    collector = h.collectors["left"]

    def drive(t_from: float, n: int, cameras: tuple[str, ...]) -> list[int]:
        stamps = []
        for i in range(n):  # 5 Hz at 0.1 m/s, 2 cm apart: every group is a keyframe
            t = round(t_from + 0.2 * i, 3)
            h.odom(t, x=0.1 * t)
            h.odom(t + 0.1, x=0.1 * (t + 0.1))
            time.sleep(0.01)
            for cam in cameras:
                h.image(t + (0.002 if cam == "right" else 0.0), camera=cam)
            stamps.append(T0 + int(round(t * 1e9)))
            time.sleep(0.03)
        return stamps

    before = drive(1.0, 4, ("left", "right"))
    assert h._wait(lambda: set(before) <= set(left.depth) and len(right.depth) >= 4, 15), h.warnings
    silent = drive(1.8, 50, ("left",))  # the right camera is silent for 10 s of message time
    # The left camera's keyframes keep flowing, alone...
    assert h._wait(lambda: silent[-1] in left.depth, 20), (len(left.depth), h.warnings)
    assert len(set(silent) & set(left.depth)) >= 0.9 * len(silent)
    # ... and /diagnostics says which camera is missing, with a WARN.
    assert h._wait(lambda: any(level == 1 and "camera right missing" in message
                               for level, message in list(collector.status_history)), 10)
    assert collector.status.get("cameras_missing") == "right"
    after = drive(11.8, 6, ("left", "right"))
    # It joins again: its depth comes back, and the groups hold both cameras.
    assert h._wait(lambda: set(after[1:]) <= set(left.depth)
                   and len({s - 2_000_000 for s in right.depth} & set(after)) >= 4, 15), h.warnings
    assert h._wait(lambda: collector.status.get("cameras_missing") == "", 10)
    groups = [[f.camera for f in call if f.stamp_ns // 10**8 == stamp // 10**8] for call in backend.calls
              for stamp in after[1:] if any(f.stamp_ns == stamp for f in call)]
    assert groups and all(g == ["left", "right"] for g in groups)
    assert h.node.pipeline.stats.windows_failed == 0
