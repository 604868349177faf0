"""mapany_node over real ROS 2 topics with a fake backend: bad input, resets, a slow backend.

The node runs in this process (so the backend can be replaced), but every message goes through
DDS on loopback like between processes.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import rclpy
from core_fakes import RecordingBackend
from nav_msgs.msg import Odometry
from rclpy.executors import MultiThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage

from mapany_ros.core.frames import CameraModel
from mapany_ros.core.geometry import make_pose
from mapany_ros.ros import conversions as conv
from mapany_ros.ros import node as node_module
from mapany_ros.tools.collector import OutputCollector

pytestmark = pytest.mark.ros

W, H = 64, 48
K = np.array([[60.0, 0, 31.5], [0, 60.0, 23.5], [0, 0, 1]])
MODEL = CameraModel(W, H, K, "plumb_bob", np.zeros(5))
RELIABLE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
T0 = 1_700_000_000 * 10**9


class Harness:
    """The node under test, a driver publishing its inputs, and a collector of its outputs."""

    def __init__(self, context, backend, **params) -> None:
        overrides = {"backend": "planesweep", "qos.reliability": "reliable", "qos.depth": 100,
                     "window.size": 3, "window.overlap": 1, "keyframe.min_translation_m": 0.05,
                     "keyframe.max_interval_s": 10.0, "window.max_latency_s": 0.5, "stats_period_s": 60.0, **params}
        self.backend = backend
        self._orig = node_module.make_backend
        node_module.make_backend = lambda *a, **k: backend
        try:
            self.node = node_module.MapanyNode(
                context=context, parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
        finally:
            node_module.make_backend = self._orig
        self.warnings: list[str] = []
        original_warn = self.node.warn

        def warn(key: str, message: str) -> None:
            self.warnings.append(key)
            original_warn(key, message)

        self.node.warn = warn
        self.callback_s: list[float] = []
        original_on_image = self.node._on_image

        def timed(cam, msg):
            t0 = time.perf_counter()
            original_on_image(cam, msg)
            self.callback_s.append(time.perf_counter() - t0)

        # Subscriptions captured the bound method: route through the timing wrapper instead.
        for sub in self.node.subscriptions:
            if sub.topic_name.endswith("image_raw"):
                sub.callback = lambda m, c="camera": timed(c, m)
        self.driver = rclpy.create_node("driver", context=context)
        self.image_pub = self.driver.create_publisher(Image, "camera/image_raw", RELIABLE)
        self.info_pub = self.driver.create_publisher(CameraInfo, "camera/camera_info", RELIABLE)
        self.odom_pub = self.driver.create_publisher(Odometry, "odom", RELIABLE)
        self.tf_pub = self.driver.create_publisher(TFMessage, "/tf_static", LATCHED)
        self.collector = OutputCollector(context=context)
        self.executor = MultiThreadedExecutor(num_threads=2, context=context)
        for n in (self.node, self.driver, self.collector):
            self.executor.add_node(n)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        self._wait(lambda: self.image_pub.get_subscription_count() > 0
                   and self.collector.count_publishers("/camera/depth") > 0)
        time.sleep(0.3)

    def _wait(self, cond, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return True
            time.sleep(0.02)
        return False

    def header(self, t_s: float) -> Header:
        return Header(stamp=conv.ns_to_stamp(T0 + int(t_s * 1e9)), frame_id="camera_optical_frame")

    def info(self, model: CameraModel = MODEL, t_s: float = 0.0) -> None:
        self.info_pub.publish(conv.model_to_camera_info(model, self.header(t_s)))

    def image(self, t_s: float, **fields) -> Image:
        msg = conv.rgb_to_image_msg(np.full((H, W, 3), 128, np.uint8), self.header(t_s))
        for k, v in fields.items():
            setattr(msg, k, v)
        self.image_pub.publish(msg)
        return msg

    def odom(self, t_s: float, x: float | None = None) -> None:
        msg = Odometry()
        msg.header = Header(stamp=conv.ns_to_stamp(T0 + int(t_s * 1e9)), frame_id="odom")
        msg.child_frame_id = "base_link"
        msg.pose.pose = conv.matrix_to_pose(make_pose(np.eye(3), [t_s if x is None else x, 0, 0]))
        self.odom_pub.publish(msg)

    def static_tf(self) -> None:
        T = make_pose(np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], float), [0.2, 0, 0.5])
        self.tf_pub.publish(TFMessage(transforms=[
            conv.matrix_to_transform_stamped(T, "base_link", "camera_optical_frame", T0)]))

    def good_stream(self, t_from: float, n: int, dt: float = 0.1) -> list[int]:
        """Odometry ahead of images, then images; returns the image stamps."""
        stamps = []
        for i in range(n):
            t = t_from + i * dt
            self.odom(t)
            self.odom(t + dt / 2)
            time.sleep(0.01)
            self.image(t)
            stamps.append(T0 + int(t * 1e9))
            time.sleep(0.02)
        return stamps

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self.driver.destroy_node()
        self.collector.destroy_node()


@pytest.fixture
def harness_factory(rclpy_context):
    made = []

    def make(backend, **params):
        h = Harness(rclpy_context, backend, **params)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def test_bad_input_is_warned_dropped_and_good_input_still_flows(harness_factory):
    h = harness_factory(RecordingBackend())
    h.image(0.0)  # before any camera_info
    bad_k = CameraModel(W, H, np.zeros((3, 3)), "plumb_bob", np.zeros(5))
    h.info(bad_k)
    assert h._wait(lambda: {"noinfo/camera", "info/camera"} <= set(h.warnings))
    h.info()
    time.sleep(0.2)
    h.image(0.01)  # no /tf_static extrinsic yet
    assert h._wait(lambda: "extrinsic/camera" in h.warnings)
    h.static_tf()
    h.image(0.02, encoding="yuv422")
    h.image(0.03, step=10)
    h.image(0.04, height=0, width=0, step=0, data=b"")
    small = conv.rgb_to_image_msg(np.zeros((24, 32, 3), np.uint8), h.header(0.05))
    h.image_pub.publish(small)
    bad_odom = Odometry()
    bad_odom.header = h.header(0.06)
    bad_odom.pose.pose.position.x = float("nan")
    bad_odom.pose.pose.orientation.w = 1.0
    h.odom_pub.publish(bad_odom)
    assert h._wait(lambda: {"image/camera", "size/camera", "odom"} <= set(h.warnings))
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


def test_slow_backend_with_30hz_input_never_blocks_and_counts_drops(harness_factory):
    backend = RecordingBackend(delay_s=0.4)
    h = harness_factory(backend, **{"window.size": 2, "window.overlap": 0, "window.queue_size": 2,
                                     "keyframe.min_translation_m": 0.0, "keyframe.max_interval_s": 0.01,
                                     "odometry.max_wait_s": 1.0})
    h.info()
    h.static_tf()
    time.sleep(0.3)
    t_end = time.monotonic() + 3.0
    i = 0
    while time.monotonic() < t_end:  # 30 Hz images, 60 Hz odometry
        t = i / 30
        h.odom(t)
        h.odom(t + 1 / 60)
        h.image(t)
        i += 1
        time.sleep(1 / 30)
    h._wait(lambda: False, 1.0)
    p = h.node.pipeline
    assert len(h.callback_s) >= 60
    assert max(h.callback_s) < 0.1, f"image callback took {max(h.callback_s) * 1e3:.0f} ms"
    assert p.stats.windows_dropped > 0
    assert len(p._queue) <= 2 and len(p._waiting) <= p.config.max_waiting_frames
    assert backend.max_active == 1
    assert p.stats.windows_built == p.stats.windows_dropped + len(backend.calls) + len(p._queue)
