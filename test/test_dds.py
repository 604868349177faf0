"""Two real ROS 2 processes talking over the localhost-only FastDDS set-up.

A publisher child (``sys.executable``, environment from ``localhost_dds_env``) sends 640x480
rgb8 Images and tf2_msgs/TFMessage; this process subscribes. Checks that the profile is
accepted, that big messages arrive intact, and that no participant socket listens on a
multicast group or on a non-loopback address in the domain's DDS port range.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mapany_ros.ros import conversions as conv
from mapany_ros.ros.dds import apply_localhost_dds, find_profile, localhost_dds_env

pytestmark = pytest.mark.ros

HAVE_TF2_MSGS = importlib.util.find_spec("tf2_msgs") is not None
NO_TF2_MSGS = "tf2_msgs is not importable: build it with `deps/build_tf2_msgs.sh .venv` (make venv does)"

IMAGE_TOPIC = "/mapany_dds_test/image"
TF_TOPIC = "/mapany_dds_test/tf"
HEIGHT, WIDTH = 480, 640
TIMEOUT_S = 30.0

# The child does not import mapany_ros (torch would slow its start); it only needs the wheels.
# argv: with_tf image_topic tf_topic height width
PUBLISHER = r"""
import sys, time
import numpy as np
import rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import Header
from builtin_interfaces.msg import Time

with_tf, image_topic, tf_topic = sys.argv[1] == "1", sys.argv[2], sys.argv[3]
h, w = int(sys.argv[4]), int(sys.argv[5])
rclpy.init()
node = rclpy.create_node("mapany_dds_test_publisher")
qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
image_pub = node.create_publisher(Image, image_topic, qos)
if with_tf:
    from geometry_msgs.msg import TransformStamped
    from tf2_msgs.msg import TFMessage
    tf_pub = node.create_publisher(TFMessage, tf_topic, qos)
print("publisher up", flush=True)
seq = 0
deadline = time.monotonic() + 120.0
while rclpy.ok() and time.monotonic() < deadline:
    seq += 1
    header = Header(stamp=Time(sec=seq, nanosec=seq), frame_id=str(seq))
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[..., 0] = (np.arange(w) + seq) % 256
    rgb[..., 1] = (np.arange(h)[:, None] * 3) % 256
    rgb[..., 2] = seq % 256
    msg = Image(header=header, height=h, width=w, encoding="rgb8", step=w * 3, data=rgb.tobytes())
    image_pub.publish(msg)
    if with_tf:
        t = TransformStamped(header=Header(stamp=header.stamp, frame_id="map"), child_frame_id="base_link")
        t.transform.translation.x = float(seq)
        t.transform.rotation.z, t.transform.rotation.w = 0.6, 0.8
        tf_pub.publish(TFMessage(transforms=[t]))
    time.sleep(0.05)
"""


def expected_rgb(seq: int) -> np.ndarray:
    """The image the publisher sends with sequence number ``seq``."""
    rgb = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    rgb[..., 0] = (np.arange(WIDTH) + seq) % 256
    rgb[..., 1] = (np.arange(HEIGHT)[:, None] * 3) % 256
    rgb[..., 2] = seq % 256
    return rgb


@pytest.fixture(scope="module")
def publisher(
    ros_subprocess_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[subprocess.Popen]:
    """The publisher child, started once for the module and stopped after it."""
    log = tmp_path_factory.mktemp("publisher") / "publisher.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                PUBLISHER,
                "1" if HAVE_TF2_MSGS else "0",
                IMAGE_TOPIC,
                TF_TOPIC,
                str(HEIGHT),
                str(WIDTH),
            ],
            env=ros_subprocess_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    proc.log_path = log  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def receive(context, msg_type, topic: str, count: int, publisher: subprocess.Popen) -> list:
    """Spin a subscriber in ``context`` until ``count`` messages arrived (or fail with the child's log)."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    node = rclpy.create_node("mapany_dds_test_subscriber", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    got: list = []
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    node.create_subscription(msg_type, topic, got.append, qos)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while len(got) < count and time.monotonic() < deadline and publisher.poll() is None:
            executor.spin_once(timeout_sec=0.1)
        if len(got) < count:
            log = Path(publisher.log_path).read_text()
            pytest.fail(
                f"received {len(got)}/{count} on {topic} in {TIMEOUT_S} s "
                f"(publisher exit code {publisher.poll()}); publisher log:\n{log}"
            )
        assert_localhost_participant(os.getpid())
        assert_localhost_participant(publisher.pid)
    finally:
        executor.shutdown()
        node.destroy_node()
    return got


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def udp_bindings(pid: int) -> list[tuple[ipaddress.IPv4Address, int]]:
    """(address, port) of every IPv4 UDP socket the process holds (Linux /proc)."""
    inodes = _socket_inodes(pid)
    out = []
    for line in Path(f"/proc/{pid}/net/udp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[9] in inodes:
            addr_hex, port_hex = cols[1].split(":")
            addr = ipaddress.IPv4Address(bytes.fromhex(addr_hex)[::-1])
            out.append((addr, int(port_hex, 16)))
    return out


def shm_segment_sizes(pid: int) -> list[int]:
    """Sizes of the FastDDS shared-memory segments mapped by the process (Linux /proc)."""
    sizes = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        cols = line.split()
        if len(cols) >= 6 and Path(cols[5]).name.startswith("fastdds_") and "port" not in cols[5]:
            lo, hi = (int(x, 16) for x in cols[0].split("-"))
            sizes.append(hi - lo)
    return sizes


def assert_localhost_participant(pid: int) -> None:
    """The process runs with our profile and listens for DDS on loopback only.

    * a >= 64 MiB shared-memory segment is mapped: the profile was loaded (the FastDDS
      default, and the one the rmw adds in LOCALHOST mode, is 512 KiB);
    * no UDP socket is bound to a multicast group;
    * every socket in the domain's RTPS port range [7400 + 250 d, 7400 + 250 (d + 1)) is
      bound to 127.0.0.1. Output sockets on ephemeral ports are not listeners and are not
      checked (the rmw adds its own UDP transport in LOCALHOST mode; it only ever sends to
      the loopback locators that participants on this machine announce).
    """
    if not Path(f"/proc/{pid}/net/udp").exists():
        return
    assert max(shm_segment_sizes(pid), default=0) >= 64 * 2**20, (
        f"process {pid} maps no 64 MiB FastDDS segment: "
        f"was {os.environ['FASTDDS_DEFAULT_PROFILES_FILE']} loaded?"
    )
    domain = int(os.environ["ROS_DOMAIN_ID"])
    low, high = 7400 + 250 * domain, 7400 + 250 * (domain + 1)
    bindings = udp_bindings(pid)
    multicast = [(str(a), p) for a, p in bindings if a.is_multicast]
    assert not multicast, f"process {pid} listens on multicast: {multicast}"
    wide = [(str(a), p) for a, p in bindings if low <= p < high and not a.is_loopback]
    assert not wide, f"process {pid} listens for DDS on non-loopback addresses: {wide}"
    assert any(a.is_loopback and low <= p < high for a, p in bindings), bindings


def test_profile_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The env helpers: absolute profile, LOCALHOST always forced, caller's values kept."""
    env = localhost_dds_env()
    assert Path(env["FASTDDS_DEFAULT_PROFILES_FILE"]).is_absolute()
    assert Path(env["FASTDDS_DEFAULT_PROFILES_FILE"]) == find_profile()
    assert 1 <= int(env["ROS_DOMAIN_ID"]) <= 100
    assert env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    assert localhost_dds_env(42)["ROS_DOMAIN_ID"] == "42"
    with pytest.raises(ValueError):
        localhost_dds_env(300)
    text = find_profile().read_text()
    assert "<useBuiltinTransports>false</useBuiltinTransports>" in text and "127.0.0.1" in text

    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "SUBNET")
    monkeypatch.setenv("FASTDDS_DEFAULT_PROFILES_FILE", "/somewhere/mine.xml")
    monkeypatch.setenv("ROS_DOMAIN_ID", "17")
    applied = apply_localhost_dds()
    assert (
        applied["ROS_AUTOMATIC_DISCOVERY_RANGE"] == os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    )
    assert os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] == "/somewhere/mine.xml"
    assert os.environ["ROS_DOMAIN_ID"] == "17"
    apply_localhost_dds(23)
    assert os.environ["ROS_DOMAIN_ID"] == "23"
    monkeypatch.delenv("FASTDDS_DEFAULT_PROFILES_FILE")
    apply_localhost_dds()
    assert os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] == str(find_profile())


def test_image_over_localhost_dds(rclpy_context, publisher: subprocess.Popen) -> None:
    from sensor_msgs.msg import Image

    msgs = receive(rclpy_context, Image, IMAGE_TOPIC, 3, publisher)
    for msg in msgs:
        seq = int(msg.header.frame_id)
        assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (seq, seq)
        assert (msg.height, msg.width, msg.encoding) == (HEIGHT, WIDTH, "rgb8")
        np.testing.assert_array_equal(conv.image_to_rgb(msg), expected_rgb(seq))


@pytest.mark.skipif(not HAVE_TF2_MSGS, reason=NO_TF2_MSGS)
def test_tfmessage_over_localhost_dds(rclpy_context, publisher: subprocess.Popen) -> None:
    from tf2_msgs.msg import TFMessage

    msgs = receive(rclpy_context, TFMessage, TF_TOPIC, 3, publisher)
    for msg in msgs:
        (t,) = msg.transforms
        seq = msg.transforms[0].header.stamp.sec
        assert (t.header.frame_id, t.child_frame_id) == ("map", "base_link")
        T = conv.transform_to_matrix(t.transform)
        np.testing.assert_allclose(T[:3, 3], [seq, 0.0, 0.0])
        np.testing.assert_allclose(np.linalg.det(T[:3, :3]), 1.0)
