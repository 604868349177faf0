"""A subscriber in another process that writes when each message arrived (``python -m mapany_ros.bench.subscriber``).

The cloud and node benchmarks measure delivery to a real second process, as RViz or a planner would be.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mapany_ros.ros.dds import apply_localhost_dds


def run(out_file: str, topics: list[str]) -> None:
    """Child process: receive clouds and images, write arrival times (ns) per stamp as JSON lines."""
    import rclpy
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image, PointCloud2

    rclpy.init()
    node = rclpy.create_node("bench_subscriber")
    qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=50, reliability=ReliabilityPolicy.RELIABLE)
    types = {"cloud": PointCloud2, "points": PointCloud2, "map_points": PointCloud2, "depth": Image,
             "confidence": Image, "camera_info": CameraInfo}
    fh = open(out_file, "w", buffering=1)

    def cb(topic):
        def f(msg):
            now = time.time_ns()
            fh.write(json.dumps({"topic": topic, "stamp": msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec,
                                 "recv": now, "bytes": len(msg.data) if hasattr(msg, "data") else 0}) + "\n")
        return f

    for t in topics:
        node.create_subscription(types[t.rsplit("/", 1)[-1]], t, cb(t), qos)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    fh.close()


def start(tmp: Path, topics: list[str]) -> tuple[subprocess.Popen, Path]:
    out = tmp / f"sub_{int(time.time() * 1e6)}.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "mapany_ros.bench.subscriber", str(out), *topics],
                            env=os.environ.copy())
    return proc, out


def stop(proc: subprocess.Popen) -> None:
    """End a child ROS process: SIGINT (rclpy's clean shutdown), then kill if it hangs."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    apply_localhost_dds()
    run(sys.argv[1], sys.argv[2:])
