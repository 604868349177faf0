"""mapany_node behaving as ROS users expect: compressed and rectified input, depth camera_info of the
depth's own grid, a bounded path, diagnostics levels and a warning for a misspelled parameter."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
from core_fakes import RecordingBackend
from node_harness import MODEL, H, W

from mapany_ros.core.frames import CameraModel
from mapany_ros.ros import conversions as conv
from mapany_ros.ros.compressed import rgb_to_compressed_msg

pytestmark = pytest.mark.ros


def test_compressed_images_flow_like_raw_ones(harness_factory):
    from node_harness import RELIABLE
    from sensor_msgs.msg import CompressedImage

    h = harness_factory(RecordingBackend(), image_transport="compressed")
    pub = h.driver.create_publisher(CompressedImage, "camera/image_raw/compressed", RELIABLE)
    assert h._wait(lambda: pub.get_subscription_count() > 0)
    h.info()
    h.static_tf()
    time.sleep(0.3)
    rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    stamps = []
    for i in range(6):
        t = 1.0 + 0.1 * i
        h.odom(t)
        h.odom(t + 0.05)
        time.sleep(0.01)
        pub.publish(rgb_to_compressed_msg(rgb, h.header(t), fmt="jpeg"))
        stamps.append(conv.stamp_to_ns(h.header(t).stamp))
        time.sleep(0.03)
    bad = rgb_to_compressed_msg(rgb, h.header(2.0), fmt="jpeg")
    bad.data = bytes(bad.data)[:100]  # truncated on the wire
    pub.publish(bad)
    assert h._wait(lambda: sorted(h.collector.out.depth) == stamps, 15), h.warnings
    assert h._wait(lambda: "image/camera" in h.warnings, 5)


def test_depth_camera_info_describes_the_depth_grid_and_rectified_input_uses_P(harness_factory):
    distorted = CameraModel(W, H, MODEL.K, "plumb_bob", np.array([-0.2, 0.05, 0.001, -0.001, 0.0]))
    h = harness_factory(RecordingBackend(), model=distorted)
    h.info()
    h.static_tf()
    time.sleep(0.3)
    stamps = h.good_stream(1.0, 4)
    assert h._wait(lambda: all(s in h.collector.out.depth_info for s in stamps), 15), h.warnings
    info = h.collector.out.depth_info[stamps[0]]
    assert info.distortion_model == "plumb_bob" and np.allclose(info.d, distorted.D)


def test_rectified_images_take_the_camera_from_P(harness_factory):
    backend = RecordingBackend()
    h = harness_factory(backend, image_rectified=True)
    info = conv.model_to_camera_info(CameraModel(W, H, MODEL.K, "plumb_bob", np.array([-0.3, 0.1, 0, 0, 0])),
                                     h.header(0.0))
    P = np.array([[70.0, 0, 30.0, 0], [0, 70.0, 22.0, 0], [0, 0, 1, 0]])
    info.p = P.ravel()
    h.info_pub.publish(info)
    h.static_tf()
    time.sleep(0.3)
    stamps = h.good_stream(1.0, 4)
    assert h._wait(lambda: all(s in h.collector.out.depth_info for s in stamps), 15), h.warnings
    np.testing.assert_allclose(backend.calls[0][0].camera_model.K, P[:, :3])
    assert not np.any(backend.calls[0][0].camera_model.D)
    out = h.collector.out.depth_info[stamps[0]]
    np.testing.assert_allclose(np.array(out.k).reshape(3, 3), P[:, :3])
    assert not np.any(out.d)


def test_the_path_is_bounded_and_diagnostics_say_error_warn_or_ok(harness_factory):
    backend = RecordingBackend(fail_on=2)
    h = harness_factory(backend, **{"path.max_poses": 3, "stats_period_s": 0.5, "diagnostics.stale_input_s": 0.5})
    h.info()
    h.static_tf()
    time.sleep(0.3)
    h.good_stream(1.0, 9)
    assert h._wait(lambda: h.collector.out.path is not None and len(h.collector.out.path.poses) == 3, 15)
    # A failed window is an ERROR for the stats period it happened in.
    assert h._wait(lambda: any(level == 2 and "windows failed" in message
                               for level, message in list(h.collector.status_history)), 5), \
        list(h.collector.status_history)
    assert float(h.collector.status["input_rate_hz/camera"]) >= 0.0
    # Input stops: stale camera and odometry are a WARN, not an error.
    assert h._wait(lambda: h.collector.status_level == 1 and "no image from camera" in h.collector.status_message
                   and "no odometry" in h.collector.status_message, 5), h.collector.status_message


def test_a_misspelled_parameter_is_named_with_the_nearest_one(harness_factory, capfd):
    h = harness_factory(RecordingBackend(), **{"window.sise": 6})
    assert h.node.get_parameter("window.size").value == 3
    err = capfd.readouterr().err
    assert "'window.sise' is not a parameter of mapany_node" in err and "did you mean 'window.size'" in err


@pytest.mark.parametrize("shut_down_first", [True, False])
def test_a_context_shut_down_between_two_waits_is_a_clean_exit_and_other_rcl_errors_are_not(monkeypatch,
                                                                                          shut_down_first):
    import rclpy

    from mapany_ros.ros import node as node_module

    destroyed = []

    class StandIn:
        finished = None

        def destroy_node(self) -> None:
            destroyed.append(True)

    def spin(node, stop) -> None:
        if shut_down_first:  # the context shut down from elsewhere while the executor is between waits
            rclpy.shutdown()
        raise node_module.RCLError("failed to initialize wait set: the given context is not valid")

    monkeypatch.setattr(node_module, "MapanyNode", StandIn)
    monkeypatch.setattr(node_module, "spin_until_stopped", spin)
    if shut_down_first:
        assert node_module.main([]) == 0
    else:
        with pytest.raises(node_module.RCLError):
            node_module.main([])
    assert destroyed == [True] and not rclpy.ok()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_lets_the_running_callback_finish_and_main_exit_0(monkeypatch, signum):
    """A signal is read between two waits: nothing is raised inside a callback (nor inside rclpy's
    message conversion, where a KeyboardInterrupt becomes a pybind11 RuntimeError and a traceback)."""
    import rclpy
    from rclpy.node import Node
    from rclpy.task import Future

    from mapany_ros.ros import node as node_module

    events: list[str] = []
    handler_before = signal.getsignal(signum)

    class StandIn(Node):
        def __init__(self) -> None:
            super().__init__("signal_stand_in")
            self.finished = Future()
            self.create_timer(0.01, self._tick)

        def _tick(self) -> None:
            if not events:
                signal.raise_signal(signum)  # delivered to this (main) thread right here
                time.sleep(0.05)
                events.append("callback finished")
            else:
                events.append("called again after the signal")

        def destroy_node(self) -> None:
            events.append("destroyed")
            super().destroy_node()

    monkeypatch.setattr(node_module, "MapanyNode", StandIn)
    assert node_module.main([]) == 0
    assert events == ["callback finished", "destroyed"]
    assert not rclpy.ok() and signal.getsignal(signum) == handler_before


def test_the_node_process_stops_cleanly_on_ctrl_c_while_input_floods_in(rclpy_context, ros_subprocess_env, tmp_path):
    """What ``ros2 launch`` does on Ctrl-C: the signal lands while messages are being taken (SIGTERM
    takes the same handler, see the test above)."""
    import subprocess
    import sys
    import threading

    import rclpy
    from geometry_msgs.msg import TransformStamped
    from sensor_msgs.msg import CameraInfo
    from tf2_msgs.msg import TFMessage

    node = rclpy.create_node("signal_flood", context=rclpy_context)
    tf_pub = node.create_publisher(TFMessage, "/tf", 100)
    info_pub = node.create_publisher(CameraInfo, "/camera/camera_info", 100)
    tf = TFMessage(transforms=[TransformStamped() for _ in range(50)])
    for t in tf.transforms:
        t.header.frame_id, t.child_frame_id, t.transform.rotation.w = "odom", "base_link", 1.0
    info = CameraInfo(width=64, height=48, k=[50.0, 0, 32, 0, 50, 24, 0, 0, 1])
    log_path = tmp_path / "node.log"
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            tf_pub.publish(tf)
            info_pub.publish(info)

    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mapany_ros.ros.node", "--ros-args",
                                 "-p", "backend:=planesweep"], env=ros_subprocess_env, stdout=log,
                                stderr=subprocess.STDOUT)
        flooder = threading.Thread(target=flood)
        try:
            deadline = time.monotonic() + 60
            while node.count_subscribers("/tf") == 0 or node.count_subscribers("/camera/camera_info") == 0:
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.05)
            flooder.start()
            time.sleep(1.5)  # the node is busy taking messages
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(20)
            stop_s = time.monotonic() - t0
        finally:
            stop.set()
            if flooder.is_alive():
                flooder.join()
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            node.destroy_node()
    text = log_path.read_text()
    assert rc == 0 and "Traceback" not in text, text[-3000:]
    assert stop_s < 10.0, f"{stop_s:.1f} s from the signal to the exit"
