"""Subscribe to everything mapany_node publishes and keep it, decoded, by stamp.

Used by the demo to score the outputs against ground truth and by the end-to-end tests.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from nav_msgs.msg import Path
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from tf2_msgs.msg import TFMessage

from mapany_ros.ros import conversions as conv

QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)


@dataclass
class Outputs:
    depth: dict[int, Image] = field(default_factory=dict)
    depth_info: dict[int, CameraInfo] = field(default_factory=dict)
    confidence: dict[int, Image] = field(default_factory=dict)
    points: dict[int, PointCloud2] = field(default_factory=dict)
    tf: list = field(default_factory=list)
    path: Path | None = None
    #: The latest fused map (map_points is latched: the newest message is the map).
    map_points: PointCloud2 | None = None
    depth_count: int = 0
    points_count: int = 0
    arrival: dict[int, float] = field(default_factory=dict)


class OutputCollector(Node):
    def __init__(self, camera: str = "camera", namespace: str = "", node_name: str = "mapany_output_collector",
                 **node_kwargs) -> None:
        super().__init__(node_name, **node_kwargs)
        ns = namespace.rstrip("/")
        self.out = Outputs()
        self.lock = threading.Lock()
        self.last_message = time.monotonic()
        self.create_subscription(Image, f"{ns}/{camera}/depth", self._on_depth, QOS)
        self.create_subscription(CameraInfo, f"{ns}/{camera}/depth/camera_info", self._keep("depth_info"), QOS)
        self.create_subscription(Image, f"{ns}/{camera}/confidence", self._keep("confidence"), QOS)
        self.create_subscription(PointCloud2, f"{ns}/points", self._on_points, QOS)
        self.create_subscription(Path, f"{ns}/path", self._on_path, QOS)
        self.create_subscription(PointCloud2, f"{ns}/map_points", self._on_map, LATCHED)
        self.create_subscription(TFMessage, "/tf", self._on_tf, QOS)
        self.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, QOS)
        #: The node's latest pipeline status (values as strings), its level and message, and when it arrived.
        self.status: dict[str, str] = {}
        self.status_level = 0
        self.status_message = ""
        self.status_time = 0.0
        #: Every (level, message) seen, newest last: an ERROR lasts one stats period and is easy to miss.
        self.status_history: deque[tuple[int, str]] = deque(maxlen=1000)

    def _stamp(self, msg) -> int:
        return conv.stamp_to_ns(msg.header.stamp)

    def _keep(self, name: str):
        def cb(msg) -> None:
            with self.lock:
                getattr(self.out, name)[self._stamp(msg)] = msg
                self.last_message = time.monotonic()
        return cb

    def _on_depth(self, msg: Image) -> None:
        with self.lock:
            self.out.depth[self._stamp(msg)] = msg
            self.out.depth_count += 1
            self.out.arrival[self._stamp(msg)] = time.time_ns()
            self.last_message = time.monotonic()

    def _on_points(self, msg: PointCloud2) -> None:
        with self.lock:
            self.out.points[self._stamp(msg)] = msg
            self.out.points_count += 1
            self.last_message = time.monotonic()

    def _on_map(self, msg: PointCloud2) -> None:
        with self.lock:
            self.out.map_points = msg

    def _on_path(self, msg: Path) -> None:
        with self.lock:
            self.out.path = msg

    def _on_tf(self, msg: TFMessage) -> None:
        with self.lock:
            for t in msg.transforms:
                self.out.tf.append((t.header.frame_id, t.child_frame_id, conv.stamp_to_ns(t.header.stamp),
                                    conv.transform_to_matrix(t.transform)))

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for st in msg.status:
            if st.name.endswith("pipeline"):
                with self.lock:
                    self.status = {kv.key: kv.value for kv in st.values}
                    self.status_level = int.from_bytes(st.level) if isinstance(st.level, bytes) else int(st.level)
                    self.status_message = st.message
                    self.status_time = time.monotonic()
                    self.status_history.append((self.status_level, st.message))

    def node_idle_since(self, t: float) -> bool:
        """True when a status that arrived after monotonic time ``t`` shows no work left in the node."""
        with self.lock:
            s, when = dict(self.status), self.status_time
        if when <= t or not s:
            return False
        settled = int(s["windows_built"]) == (
            int(s["windows_done"]) + int(s["windows_rejected"]) + int(s["windows_failed"]))
        return (settled and s["backend_busy"] == "False" and int(s["keyframes_pending"]) == 0
                and int(s["frames_waiting_for_odometry"]) == 0)

    def idle_for(self) -> float:
        return time.monotonic() - self.last_message

    def all_points(self) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            clouds = [conv.pointcloud2_to_arrays(m) for m in self.out.points.values()]
        if not clouds:
            return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8)
        return np.concatenate([c[0] for c in clouds]), np.concatenate([c[1] for c in clouds])
