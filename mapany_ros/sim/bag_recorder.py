"""Record ROS 2 topics to an MCAP bag with rosbags (rosbag2_py is not installable from PyPI).

Subscriptions are raw: the CDR bytes rclpy receives are written as they are, so recording costs
no deserialisation and the bag replays with ``ros2 bag play``.
"""

from __future__ import annotations

import threading
from pathlib import Path

from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore


def ros_type_name(msg_class: type) -> str:
    """'sensor_msgs/msg/Image' for sensor_msgs.msg.Image."""
    return f"{msg_class.__module__.split('.')[0]}/msg/{msg_class.__name__}"


class BagRecorder(Node):
    """Writes every message of ``topics`` ({name: message class}) to ``path`` (MCAP)."""

    def __init__(self, path: Path, topics: dict[str, type]) -> None:
        super().__init__("mapany_recorder")
        self._typestore = get_typestore(Stores.ROS2_KILTED)
        self._writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
        self._writer.open()
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self._closed = False
        for topic, cls in topics.items():
            latched = topic == "/tf_static"
            qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)
            conn = self._writer.add_connection(topic, ros_type_name(cls), typestore=self._typestore)
            self.counts[topic] = 0
            self.create_subscription(cls, topic, lambda data, c=conn, t=topic: self._write(c, t, data), qos, raw=True)

    def _write(self, conn, topic: str, data: bytes) -> None:
        with self._lock:
            if self._closed:
                return
            self._writer.write(conn, self.get_clock().now().nanoseconds, data)
            self.counts[topic] += 1

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._writer.close()
