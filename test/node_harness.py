"""A harness for mapany_node tests: the node in this process, a driver publishing its inputs and a
collector of its outputs, all talking over loopback DDS like separate processes would."""

from __future__ import annotations

import threading
import time

import numpy as np
import rclpy
from nav_msgs.msg import Odometry
from polling import wait_for
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
from mapany_ros.scoring.collector import OutputCollector

W, H = 64, 48
K = np.array([[60.0, 0, 31.5], [0, 60.0, 23.5], [0, 0, 1]])
MODEL = CameraModel(W, H, K, "plumb_bob", np.zeros(5))
RELIABLE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
T0 = 1_700_000_000 * 10**9
#: base_link (x forward, z up) -> camera optical frame (z forward, x right, y down), 0.2 m ahead, 0.5 m up.
T_BASE_CAMERA = make_pose(np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], float), [0.2, 0, 0.5])


class Harness:
    """The node under test, a driver publishing its inputs, and a collector of its outputs."""

    def __init__(self, context, fake_backend=None, model: CameraModel | None = None, **params) -> None:
        overrides = {"backend": "planesweep", "qos.reliability": "reliable", "qos.depth": 100,
                     "window.size": 3, "window.overlap": 1, "keyframe.min_translation_m": 0.05,
                     "keyframe.max_interval_s": 10.0, "window.max_latency_s": 0.5, "stats_period_s": 60.0, **params}
        self.model = model or MODEL
        self.backend = fake_backend
        self._orig = node_module.make_backend
        if fake_backend is not None:  # None: the backend named by the parameters, built for real
            node_module.make_backend = lambda *a, **k: fake_backend
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

        self.node.warn = self.node.inputs.warn = warn
        self.callback_s: list[float] = []
        original_on_image = self.node.inputs.on_image

        def timed(cam, msg, now_ns):
            t0 = time.perf_counter()
            original_on_image(cam, msg, now_ns)
            self.callback_s.append(time.perf_counter() - t0)

        self.node.inputs.on_image = timed  # the subscriptions call through inputs at each message
        self.cameras = list(overrides.get("cameras", ["camera"]))
        self.driver = rclpy.create_node("driver", context=context)
        self.image_pubs = {c: self.driver.create_publisher(Image, f"{c}/image_raw", RELIABLE) for c in self.cameras}
        self.info_pubs = {c: self.driver.create_publisher(CameraInfo, f"{c}/camera_info", RELIABLE)
                          for c in self.cameras}
        self.image_pub, self.info_pub = self.image_pubs[self.cameras[0]], self.info_pubs[self.cameras[0]]
        self.odom_pub = self.driver.create_publisher(Odometry, "odom", RELIABLE)
        self.tf_pub = self.driver.create_publisher(TFMessage, "/tf_static", LATCHED)
        self.tf_moving_pub = self.driver.create_publisher(TFMessage, "/tf", RELIABLE)
        self.collectors = {c: OutputCollector(camera=c, node_name=f"collector_{c}", context=context)
                           for c in self.cameras}
        self.collector = self.collectors[self.cameras[0]]
        self.executor = MultiThreadedExecutor(num_threads=2, context=context)
        for n in (self.node, self.driver, *self.collectors.values()):
            self.executor.add_node(n)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        odom = [] if not self.node.get_parameter("use_odometry").value else [self.tf_moving_pub] \
            if self.node.get_parameter("odometry.source").value == "tf" else [self.odom_pub]
        self._wait(lambda: all(p.get_subscription_count() > 0
                               for p in (*self.image_pubs.values(), *self.info_pubs.values(), *odom))
                   and all(col.count_publishers(f"/{c}/depth") > 0 for c, col in self.collectors.items()))
        time.sleep(0.3)

    def _wait(self, cond, timeout: float = 10.0) -> bool:
        return wait_for(cond, timeout)

    def header(self, t_s: float, camera: str = "camera") -> Header:
        return Header(stamp=conv.ns_to_stamp(T0 + int(t_s * 1e9)), frame_id=f"{camera}_optical_frame")

    def info(self, model: CameraModel | None = None, t_s: float = 0.0, camera: str | None = None) -> None:
        camera = camera or self.cameras[0]
        self.info_pubs[camera].publish(conv.model_to_camera_info(model or self.model, self.header(t_s, camera)))

    def image(self, t_s: float, rgb: np.ndarray | None = None, camera: str | None = None, **fields) -> Image:
        camera = camera or self.cameras[0]
        if rgb is None:
            rgb = np.full((self.model.height, self.model.width, 3), 128, np.uint8)
        msg = conv.rgb_to_image_msg(rgb, self.header(t_s, camera))
        for k, v in fields.items():
            setattr(msg, k, v)
        self.image_pubs[camera].publish(msg)
        return msg

    def odom(self, t_s: float, x: float | None = None, pose: np.ndarray | None = None) -> None:
        msg = Odometry()
        msg.header = Header(stamp=conv.ns_to_stamp(T0 + int(t_s * 1e9)), frame_id="odom")
        msg.child_frame_id = "base_link"
        if pose is None:
            pose = make_pose(np.eye(3), [t_s if x is None else x, 0, 0])
        msg.pose.pose = conv.matrix_to_pose(pose)
        self.odom_pub.publish(msg)

    def tf(self, t_s: float, parent: str, child: str, T: np.ndarray) -> None:
        """One transform on /tf at sequence time ``t_s``."""
        self.tf_moving_pub.publish(TFMessage(transforms=[
            conv.matrix_to_transform_stamped(T, parent, child, T0 + int(round(t_s * 1e9)))]))

    def static_tf(self) -> None:
        self.tf_pub.publish(TFMessage(transforms=[
            conv.matrix_to_transform_stamped(T_BASE_CAMERA, "base_link", "camera_optical_frame", T0)]))

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
        self.thread.join(10)
        self.node.destroy_node()
        self.driver.destroy_node()
        for col in self.collectors.values():
            col.destroy_node()
