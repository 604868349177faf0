"""mapany_node as a managed node in its own process, driven over DDS through ~/change_state and ~/get_state.

``autostart: false``: it starts unconfigured and publishes nothing; configure loads the backend and
the saved map of map.load_path (a failure stays unconfigured and says why); activate takes input
and publishes; deactivate publishes nothing and drops input; activate again; cleanup gives the
model's memory back; shutdown exits 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from mapany_ros.core.frames import CameraModel
from mapany_ros.core.geometry import make_pose
from mapany_ros.ros import conversions as conv

pytestmark = pytest.mark.ros

TEST_DIR = Path(__file__).resolve().parent
T0 = 1_700_000_000 * 10**9
MODEL = CameraModel(64, 48, np.array([[60.0, 0, 31.5], [0, 60.0, 23.5], [0, 0, 1]]), "plumb_bob", np.zeros(5))
T_BASE_CAMERA = make_pose(np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], float), [0.2, 0, 0.5])
BALLAST_MB = 300


def rss_mb(pid: int) -> float:
    """Resident anonymous memory (the heap, torch's tensors), without shared mappings such as DDS's."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no RssAnon for {pid}")


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError):
                pass
    return out


class Lifecycle:
    """~/change_state and ~/get_state of the node, called from a node spun by the test's executor.

    A service answers a client only once its reply writer has matched the client's reader, which
    may come after ``wait_for_service``: the first call of each service is one that may be repeated
    (get_state, a transition that does not exist) until it is answered.
    """

    def __init__(self, node) -> None:
        from lifecycle_msgs.srv import ChangeState, GetState

        self.change = node.create_client(ChangeState, "/mapany_node/change_state")
        self.get = node.create_client(GetState, "/mapany_node/get_state")

    def _call(self, client, request, timeout: float = 120.0, repeat_s: float | None = None):
        assert client.wait_for_service(timeout_sec=60), "no lifecycle service"
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            future = client.call_async(request)
            resend = time.monotonic() + repeat_s if repeat_s else end
            while not future.done() and time.monotonic() < min(end, resend):
                time.sleep(0.02)
            if future.done():
                return future.result()
        raise AssertionError(f"{client.srv_name} did not answer")

    def connect(self) -> None:
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState, GetState

        self._call(self.get, GetState.Request(), repeat_s=5.0)
        nothing = ChangeState.Request(transition=Transition(label="no_such_transition"))
        assert not self._call(self.change, nothing, repeat_s=5.0).success

    def state(self) -> str:
        from lifecycle_msgs.srv import GetState

        return self._call(self.get, GetState.Request(), repeat_s=5.0).current_state.label

    def transition(self, label: str) -> bool:
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        return self._call(self.change, ChangeState.Request(transition=Transition(label=label))).success


def test_the_managed_node_goes_through_its_lifecycle_over_dds(tmp_path, ros_subprocess_env, rclpy_context):
    from nav_msgs.msg import Odometry
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image, PointCloud2
    from std_msgs.msg import Header
    from tf2_msgs.msg import TFMessage

    from mapany_ros.scoring.collector import LATCHED, OutputCollector

    weights = tmp_path / "weights.bin"
    params = {"/**": {"ros__parameters": {
        "autostart": False, "device": "cpu", "backend": "core_fakes:BallastBackend",
        "backend_options": yaml.safe_dump({"weights": str(weights), "ballast_mb": BALLAST_MB},
                                          default_flow_style=True),
        "qos": {"reliability": "reliable", "depth": 100}, "stats_period_s": 0.5,
        "window": {"size": 3, "overlap": 1, "max_latency_s": 0.5},
        "keyframe": {"min_translation_m": 0.05, "max_interval_s": 10.0},
        "map": {"publish_period_s": 0.2},
    }}}
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    env = {**ros_subprocess_env,
           "PYTHONPATH": os.pathsep.join([str(TEST_DIR), ros_subprocess_env.get("PYTHONPATH", "")])}
    log_path = tmp_path / "node.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "mapany_ros.ros.node", "--ros-args", "--params-file",
                             str(params_path)], env=env, stdout=log, stderr=subprocess.STDOUT)

    import rclpy

    reliable = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)
    latched = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
    driver = rclpy.create_node("lifecycle_driver", context=rclpy_context)
    image_pub = driver.create_publisher(Image, "camera/image_raw", reliable)
    info_pub = driver.create_publisher(CameraInfo, "camera/camera_info", reliable)
    odom_pub = driver.create_publisher(Odometry, "odom", reliable)
    tf_pub = driver.create_publisher(TFMessage, "/tf_static", latched)
    maps: list[float] = []
    driver.create_subscription(PointCloud2, "map_points", lambda m: maps.append(time.monotonic()), LATCHED)
    collector = OutputCollector(context=rclpy_context)
    executor = MultiThreadedExecutor(num_threads=2, context=rclpy_context)
    for n in (driver, collector):
        executor.add_node(n)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    lifecycle = Lifecycle(driver)

    def wait(cond, timeout: float = 30.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return True
            assert proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.05)
        return False

    def stream(t_from: float, n: int) -> list[int]:
        """Odometry ahead of images, a keyframe every frame; the image stamps."""
        stamps = []
        for i in range(n):
            t = t_from + i * 0.1
            for dt in (0.0, 0.05):
                msg = Odometry()
                msg.header = Header(stamp=conv.ns_to_stamp(T0 + int((t + dt) * 1e9)), frame_id="odom")
                msg.child_frame_id = "base_link"
                msg.pose.pose = conv.matrix_to_pose(make_pose(np.eye(3), [t + dt, 0, 0]))
                odom_pub.publish(msg)
            time.sleep(0.01)
            header = Header(stamp=conv.ns_to_stamp(T0 + int(t * 1e9)), frame_id="camera_optical_frame")
            info_pub.publish(conv.model_to_camera_info(MODEL, header))
            image_pub.publish(conv.rgb_to_image_msg(np.full((48, 64, 3), 128, np.uint8), header))
            stamps.append(T0 + int(t * 1e9))
            time.sleep(0.03)
        return stamps

    def counts() -> tuple[int, int, int, int]:
        with collector.lock:
            return (collector.out.depth_count, len(collector.out.tf), len(collector.status_history), len(maps))

    try:
        lifecycle.connect()
        assert lifecycle.state() == "unconfigured"
        assert collector.count_publishers("/camera/depth") == 0  # nothing is built before configure
        rss_unconfigured = rss_mb(proc.pid)

        # Configure fails while the model's weights are missing: still unconfigured, and the log says why.
        assert not lifecycle.transition("configure")
        assert lifecycle.state() == "unconfigured"
        assert wait(lambda: "configure failed" in log_path.read_text() and str(weights) in log_path.read_text())
        weights.write_bytes(b"weights")
        assert lifecycle.transition("configure")
        assert lifecycle.state() == "inactive"
        rss_configured = rss_mb(proc.pid)
        assert rss_configured - rss_unconfigured > 0.8 * BALLAST_MB, (rss_unconfigured, rss_configured)
        tf_pub.publish(TFMessage(transforms=[
            conv.matrix_to_transform_stamped(T_BASE_CAMERA, "base_link", "camera_optical_frame", T0)]))
        assert wait(lambda: image_pub.get_subscription_count() > 0 and odom_pub.get_subscription_count() > 0
                    and collector.count_publishers("/camera/depth") > 0)

        # Inactive: the input is dropped and nothing is published (the node would publish map -> odom
        # at 20 Hz, diagnostics every 0.5 s and a depth image per keyframe if it were active).
        before = counts()
        dropped = stream(1.0, 8)
        time.sleep(1.5)
        assert counts() == before, (before, counts())

        assert lifecycle.transition("activate")
        assert lifecycle.state() == "active"
        first = stream(2.0, 8)
        assert wait(lambda: all(s in collector.out.depth for s in first[:6])), log_path.read_text()[-3000:]
        assert wait(lambda: len(maps) > 0 and collector.status_history and collector.out.tf)
        assert not any(s in collector.out.depth for s in dropped)
        assert any((p, c) == ("map", "odom") for p, c, _, _ in collector.out.tf)

        assert lifecycle.transition("deactivate")
        assert lifecycle.state() == "inactive"
        settled = [counts(), time.monotonic()]

        def quiet() -> bool:  # what was under way when it deactivated has arrived
            if counts() != settled[0]:
                settled[:] = [counts(), time.monotonic()]
            return time.monotonic() - settled[1] > 0.3

        assert wait(quiet, 10)
        before = counts()
        ignored = stream(3.0, 8)
        time.sleep(1.5)
        assert counts() == before, (before, counts())

        assert lifecycle.transition("activate")
        second = stream(4.0, 8)
        assert wait(lambda: all(s in collector.out.depth for s in second[:6])), log_path.read_text()[-3000:]
        assert not any(s in collector.out.depth for s in ignored)
        frames_in = int(collector.status["frames_in"])
        assert frames_in <= len(first) + len(second), "images were taken while inactive"

        # Cleanup releases the model and the map: the process gives the memory back.
        assert lifecycle.transition("deactivate")
        rss_used = rss_mb(proc.pid)
        assert lifecycle.transition("cleanup")
        assert lifecycle.state() == "unconfigured"
        assert wait(lambda: rss_used - rss_mb(proc.pid) > 0.8 * BALLAST_MB, 10), \
            (rss_unconfigured, rss_configured, rss_used, rss_mb(proc.pid))
        assert wait(lambda: not children(proc.pid), 10), "the map publisher process is still running"
        assert wait(lambda: collector.count_publishers("/camera/depth") == 0, 10)

        assert lifecycle.transition("shutdown")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        executor.shutdown()
        spin.join(10)
        driver.destroy_node()
        collector.destroy_node()
        log.close()
    text = log_path.read_text()
    assert "Traceback" not in text and "FATAL" not in text, text[-3000:]


def test_configure_fails_on_a_map_folder_it_cannot_load_and_stays_unconfigured(tmp_path, ros_subprocess_env,
                                                                              rclpy_context):
    """map.load_path is loaded in configure: a folder that is not a saved map leaves the node
    unconfigured, the log says what is wrong with it, and the process keeps running."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    folder = tmp_path / "not_a_map"
    folder.mkdir()
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"/**": {"ros__parameters": {
        "autostart": False, "device": "cpu", "backend": "mapany_ros.sim.model_simulator:ModelSimulator",
        "map": {"load_path": str(folder)}}}}))
    log_path = tmp_path / "node.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "mapany_ros.ros.node", "--ros-args", "--params-file", str(params)],
                            env=ros_subprocess_env, stdout=log, stderr=subprocess.STDOUT)
    driver = rclpy.create_node("lifecycle_driver", context=rclpy_context)
    executor = SingleThreadedExecutor(context=rclpy_context)
    executor.add_node(driver)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    lifecycle = Lifecycle(driver)
    try:
        lifecycle.connect()
        assert lifecycle.state() == "unconfigured"
        assert not lifecycle.transition("configure")
        assert lifecycle.state() == "unconfigured"
        assert proc.poll() is None
        end = time.monotonic() + 30
        while f"{folder} is not a saved map" not in log_path.read_text():
            assert time.monotonic() < end, log_path.read_text()[-3000:]
            time.sleep(0.05)
        assert lifecycle.transition("shutdown")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        executor.shutdown()
        spin.join(10)
        driver.destroy_node()
        log.close()
    text = log_path.read_text()
    assert "configure failed, still unconfigured: map.load_path" in text, text[-3000:]
    assert "Traceback" not in text and "FATAL" not in text, text[-3000:]
