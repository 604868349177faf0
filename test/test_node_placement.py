"""mapany_node as its own process with a third-party backend plugin and drifting, late, irregular odometry.

The backend is the simulated world's model simulator, named
``mapany_ros.sim.model_simulator:ModelSimulator`` exactly as a user names their own model: it
predicts in its own frame with a real model's errors and ignores every prior. Over loopback DDS
the published path must beat the odometry it was given, and map -> odom must come steadily and glide.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest
import yaml

from mapany_ros.core.geometry import invert, rotation_angle
from mapany_ros.ros import conversions as conv
from mapany_ros.scoring.trajectory import ate
from mapany_ros.sim.odometry import DriftingOdometry, OdometryErrors
from mapany_ros.sim.scene import (
    SyntheticFrame,
    SyntheticScene,
    SyntheticSequence,
    make_camera_model,
)

pytestmark = pytest.mark.ros


def blank_sequence(scene: SyntheticScene, duration_s: float, rate_hz: float, width: int, height: int
                   ) -> SyntheticSequence:
    """The scene's trajectory with blank images: the simulator needs only the stamps."""
    seq = SyntheticSequence(scene, make_camera_model(width, height), scene.T_base_camera.copy())
    for i in range(int(duration_s * rate_hz)):
        t = i / rate_hz
        T = scene.base_pose(t)
        seq.frames.append(SyntheticFrame(int(round(t * 1e9)), np.zeros((height, width, 3), np.uint8),
                                         np.zeros((height, width), np.float32), T, T @ scene.T_base_camera))
    return seq


def stamps_behind_a_double_speed_play(duration_s: float) -> int:
    """A stamp offset for a sequence of ``duration_s`` played at twice its speed from a few seconds on:
    its stamps start in the past by what the play gains on the clock, so none is stamped after it
    arrives. (The node flushes its last partial window a latency after the later of a keyframe's
    stamp and its arrival: stamps ahead of the clock kept a finished play waiting 20 s.)"""
    return time.time_ns() - int(duration_s / 2 * 1e9)


def launch_node(tmp_path, params: dict, env: dict[str, str]) -> tuple[subprocess.Popen, Any]:
    """mapany_node in its own process with ``params`` (a params file's content); its log in tmp_path/node.log."""
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    log = open(tmp_path / "node.log", "w")
    node = subprocess.Popen([sys.executable, "-m", "mapany_ros.ros.node", "--ros-args", "--params-file",
                             str(params_path)], env=env, stdout=log, stderr=subprocess.STDOUT)
    return node, log


def wait_until_connected(node: subprocess.Popen, source, collector, log_path) -> None:
    """Until the node takes the source's images and the collector hears its path (it must not die meanwhile)."""
    deadline = time.monotonic() + 60
    while source.image_pub.get_subscription_count() == 0 or collector.count_publishers("/path") == 0:
        assert node.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "the node did not come up"
        time.sleep(0.1)
    time.sleep(0.5)


def wait_until_idle(node: subprocess.Popen, collector, log_path, since: float) -> None:
    """Until the node has published nothing for 1.5 s after ``since`` (monotonic), alive all along."""
    while not collector.node_idle_since(since + 1.5):
        assert node.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < since + 120, "the node did not finish"
        time.sleep(0.2)


def test_plugin_backend_in_its_own_node_process_corrects_drifting_odometry(tmp_path, ros_subprocess_env,
                                                                           rclpy_context):
    from rclpy.executors import MultiThreadedExecutor

    from mapany_ros.scoring.collector import OutputCollector
    from mapany_ros.sim.robot_publisher import SyntheticSource

    scene = SyntheticScene(0)
    duration_s = scene.trajectory.loop_length_m / scene.trajectory.speed_mps
    seq = blank_sequence(scene, duration_s=duration_s, rate_hz=10.0, width=64, height=48)
    odometry = DriftingOdometry(scene.base_pose, OdometryErrors(scale_error=0.05, yaw_drift_deg_per_m=5.0,
                                                                noise_m=0.005, noise_deg=0.2, seed=3), t0_s=-1.0)
    stamp_offset = stamps_behind_a_double_speed_play(duration_s)
    params = {"/**": {"ros__parameters": {
        "backend": "mapany_ros.sim.model_simulator:ModelSimulator",
        "backend_options": yaml.safe_dump({"seed": 0, "stamp_offset_ns": stamp_offset, "noise_seed": 4},
                                          default_flow_style=True),
        "device": "cpu", "qos": {"reliability": "reliable", "depth": 100}, "stats_period_s": 1.0,
        "odometry": {"max_wait_s": 1.0},
    }}}
    node, log = launch_node(tmp_path, params, ros_subprocess_env)
    source = SyntheticSource(seq, stamp_offset_ns=stamp_offset, odometry=odometry, odom_delay_s=0.15,
                             odom_jitter=0.3, context=rclpy_context)
    collector = OutputCollector(context=rclpy_context)
    executor = MultiThreadedExecutor(num_threads=2, context=rclpy_context)
    for n in (source, collector):
        executor.add_node(n)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    try:
        wait_until_connected(node, source, collector, tmp_path / "node.log")
        played: list[tuple[int, int]] = []  # (wall clock, image stamp) of each image
        source.play(speed=2.0, on_image=lambda stamp: played.append((time.time_ns(), stamp)))
        wait_until_idle(node, collector, tmp_path / "node.log", time.monotonic())
    finally:
        node.terminate()
        node.wait(15)
        executor.shutdown()
        spin.join(10)
        log.close()
    text = (tmp_path / "node.log").read_text()
    assert "model_simulator" in text and "Traceback" not in text, text[-3000:]

    path = collector.out.path
    assert path is not None and path.header.frame_id == "map" and len(path.poses) > 40
    stamps = [conv.stamp_to_ns(p.header.stamp) for p in path.poses]
    est = [conv.pose_to_matrix(p.pose) for p in path.poses]
    truth = [scene.base_pose((s - stamp_offset) * 1e-9) for s in stamps]
    odo = [odometry.pose((s - stamp_offset) * 1e-9) for s in stamps]
    ate_path, ate_odo = ate(est, truth, stamps)[0], ate(odo, truth, stamps)[0]
    print(f"published path ATE {ate_path:.3f} m over {len(stamps)} keyframes, odometry ATE {ate_odo:.3f} m")
    assert ate_path <= 0.5 * ate_odo, f"published path ATE {ate_path:.3f} m, odometry's {ate_odo:.3f} m"

    map_odom = sorted((stamp, T) for parent, child, stamp, T in collector.out.tf if (parent, child) == ("map", "odom"))
    times = np.array([s for s, _ in map_odom]) * 1e-9
    span = times[-1] - times[0]
    assert span > 5 and len(times) / span >= 10.0, f"{len(times)} map -> odom in {span:.1f} s"
    # How far each update moves the robot in the map (map -> odom -> base at the update's stamp): what a
    # tf2 user sees jump. map -> odom's own translation also swings with a small rotation times the
    # odometry's distance from its origin.
    walls = np.array([w for w, _ in played])

    def at_robot(T: np.ndarray, stamp: int) -> np.ndarray:
        """Where T puts the robot as it was when the transform went out (stamped now + a tolerance)."""
        image = played[max(0, int(np.searchsorted(walls, stamp)) - 1)][1]
        return (T @ odometry.pose((image - stamp_offset) * 1e-9))[:3, 3]

    steps = [np.linalg.norm(at_robot(b, sb) - at_robot(a, sb))
             for (_, a), (sb, b) in zip(map_odom, map_odom[1:], strict=False)]
    print(f"map -> odom: {len(times) / span:.1f} Hz, largest step at the robot {max(steps) * 100:.2f} cm")
    assert max(steps) < 0.05, f"map -> odom moved the robot by {max(steps) * 100:.1f} cm at once"
    assert collector.status.get("chain_breaks") == "0"
    # The odometry is 5 % long and the model metric: the map keeps the odometry's scale, and says so.
    ratio, sigma = float(collector.status["model_scale_vs_odometry"]), float(collector.status["model_scale_sigma"])
    print(f"model / odometry scale {ratio:.4f} +- {sigma:.4f}; diagnostics: {collector.status_message}")
    assert 0 < sigma < 0.03 and abs(np.log(ratio * 1.05)) <= 3 * sigma, (ratio, sigma)
    assert "the model's scale is" in collector.status_message, collector.status_message


@pytest.mark.parametrize(("overrides", "message"), [
    ({"backend": "no_such_package.models:Model"}, "cannot import module 'no_such_package.models'"),
    ({"backend": "mapany_ros.sim.model_simulator:NoSuchClass"}, "has no class 'NoSuchClass'"),
    ({"backend": "mapany_ros.sim.model_simulator:ModelSimulator", "backend_options": "{seeed: 1}"},
     "does not take these options"),
    ({"backend": "planesweep", "use_odometry": False}, "use_odometry: true"),
    ({"backend": "mapany_ros.sim.model_simulator:ModelSimulator", "map": {"load_path": "/nonexistent/mapany_map"}},
     "map.load_path = '/nonexistent/mapany_map': /nonexistent/mapany_map is not a saved map"),
])
def test_a_start_up_failure_exits_with_one_clear_message(tmp_path, ros_subprocess_env, overrides, message):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"device": "cpu", **overrides}}}))
    env = ros_subprocess_env
    proc = subprocess.run([sys.executable, "-m", "mapany_ros.ros.node", "--ros-args", "--params-file", str(params)],
                          env=env, capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert message in text and "Traceback" not in text, text
    assert sum("FATAL" in line for line in text.splitlines()) == 1, text


def test_without_odometry_the_node_publishes_its_own_odom_to_base_and_map_to_odom_over_dds(
        tmp_path, ros_subprocess_env, rclpy_context):
    """REP 105 without odometry: the chained estimate goes out as odom -> base_link at each keyframe's
    image stamp, map -> odom at tf.rate_hz stamped ahead of now (with the newest odom -> base_link at
    the same stamp), so map -> base_link resolves at "now" from what /tf carried."""
    from rclpy.executors import MultiThreadedExecutor
    from tf2_msgs.msg import TFMessage

    from mapany_ros.scoring.collector import QOS, OutputCollector
    from mapany_ros.sim.robot_publisher import SyntheticSource

    scene = SyntheticScene(0)
    seq = blank_sequence(scene, duration_s=16.0, rate_hz=10.0, width=64, height=48)
    stamp_offset = stamps_behind_a_double_speed_play(16.0)
    rate_hz = 20.0  # the default tf.rate_hz
    params = {"/**": {"ros__parameters": {
        "backend": "mapany_ros.sim.model_simulator:ModelSimulator",
        "backend_options": yaml.safe_dump({"seed": 0, "stamp_offset_ns": stamp_offset, "noise_seed": 4},
                                          default_flow_style=True),
        "device": "cpu", "qos": {"reliability": "reliable", "depth": 100}, "stats_period_s": 1.0,
        "use_odometry": False,
        # blank images show no motion: keyframes come by time
        "keyframe": {"max_interval_s": 0.3},
    }}}
    node, log = launch_node(tmp_path, params, ros_subprocess_env)
    source = SyntheticSource(seq, stamp_offset_ns=stamp_offset, context=rclpy_context)
    collector = OutputCollector(context=rclpy_context)
    #: Every /tf message as it arrived: (wall clock ns at arrival, [(parent, child, stamp ns, T)]).
    received: list[tuple[int, list[tuple[str, str, int, np.ndarray]]]] = []
    lock = threading.Lock()

    def on_tf(msg: TFMessage) -> None:
        arrived = time.time_ns()
        transforms = [(t.header.frame_id, t.child_frame_id, conv.stamp_to_ns(t.header.stamp),
                       conv.transform_to_matrix(t.transform)) for t in msg.transforms]
        with lock:
            received.append((arrived, transforms))

    collector.create_subscription(TFMessage, "/tf", on_tf, QOS)
    executor = MultiThreadedExecutor(num_threads=2, context=rclpy_context)
    for n in (source, collector):
        executor.add_node(n)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()

    def newest(pair: tuple[str, str], since_ns: int) -> tuple[int, np.ndarray] | None:
        with lock:
            found = [(s, T) for _, ts in received for p, c, s, T in ts if (p, c) == pair and s >= since_ns]
        return max(found, key=lambda x: x[0]) if found else None

    try:
        wait_until_connected(node, source, collector, tmp_path / "node.log")
        source.play(speed=2.0)
        wait_until_idle(node, collector, tmp_path / "node.log", time.monotonic())
        time.sleep(2.0)  # map -> odom has glided to the last estimate (tf.smoothing_s 0.5 s)
        # "now" on the node's clock (the wall clock: no sim time): a lookup of map -> base_link there.
        now = time.time_ns()
        deadline = time.monotonic() + 10
        while newest(("map", "odom"), now) is None or newest(("odom", "base_link"), now) is None:
            assert node.poll() is None and time.monotonic() < deadline, "no map -> odom stamped after now"
            time.sleep(0.05)
    finally:
        node.terminate()
        node.wait(15)
        executor.shutdown()
        spin.join(10)
        log.close()
    text = (tmp_path / "node.log").read_text()
    assert "Traceback" not in text, text[-3000:]

    image_stamps = {f.stamp_ns + stamp_offset for f in seq.frames}
    # The chained estimate: messages of odom -> base_link alone, one transform per new keyframe at its image stamp.
    chained = {s: T for _, ts in received if all(p != "map" for p, _, _, _ in ts)
               for p, c, s, T in ts if (p, c) == ("odom", "base_link")}
    assert len(chained) > 20 and set(chained) <= image_stamps, (len(chained), sorted(set(chained) - image_stamps)[:5])
    # map -> odom on the timer, stamped ahead of its arrival, with the newest chained odom -> base_link beside it.
    timed = [(arrived, dict(((p, c), (s, T)) for p, c, s, T in ts)) for arrived, ts in received
             if any((p, c) == ("map", "odom") for p, c, _, _ in ts)]
    stamps = np.array([tf[("map", "odom")][0] for _, tf in timed]) * 1e-9
    span = stamps[-1] - stamps[0]
    print(f"{len(chained)} keyframes' odom -> base_link; map -> odom at {len(stamps) / span:.1f} Hz over {span:.1f} s")
    assert span > 5 and len(stamps) / span >= 0.5 * rate_hz, f"{len(stamps)} map -> odom in {span:.1f} s"
    ahead = np.array([tf[("map", "odom")][0] - arrived for arrived, tf in timed]) * 1e-9
    print(f"map -> odom stamped {np.median(ahead) * 1e3:.0f} ms (median) ahead of its arrival")
    assert np.median(ahead) > 0, "map -> odom is not stamped ahead of now"
    assert all(("odom", "base_link") in tf and tf[("odom", "base_link")][0] == tf[("map", "odom")][0]
               for _, tf in timed if tf[("map", "odom")][0] * 1e-9 > stamps[0] + 0.5 * span), \
        "map -> odom without the chained odom -> base_link at its stamp"

    # The lookup at "now": the newest map -> odom and odom -> base_link stamped at or after it.
    _, T_map_odom = newest(("map", "odom"), now)
    _, T_odom_base = newest(("odom", "base_link"), now)
    last = max(chained)
    np.testing.assert_allclose(T_odom_base, chained[last], atol=1e-6)  # the newest keyframe's chained pose
    path = collector.out.path
    assert path is not None and conv.stamp_to_ns(path.poses[-1].header.stamp) == last
    T_map_base = T_map_odom @ T_odom_base
    off = invert(conv.pose_to_matrix(path.poses[-1].pose)) @ T_map_base
    print(f"map -> base_link at now against the path's newest pose: {np.linalg.norm(off[:3, 3]) * 100:.2f} cm, "
          f"{np.degrees(rotation_angle(off)):.3f} deg")
    assert np.linalg.norm(off[:3, 3]) < 0.01 and np.degrees(rotation_angle(off)) < 0.5


def test_the_scale_warning_names_the_odometry_once_a_rig_measured_it():
    """With a rig the odometry's own scale is known: the WARN blames its calibration, and a model
    whose scale departs from the odometry's is then no longer ambiguous enough to warn about."""
    from types import SimpleNamespace

    from mapany_ros.ros.node import MapanyNode

    node = SimpleNamespace(config={"diagnostics.scale_disagreement": 0.04})
    no_rig = {"model_scale_vs_odometry": 0.95, "model_scale_sigma": 0.01, "odometry_scale": 0.0,
              "odometry_scale_sigma": 0.0}
    [warning] = MapanyNode._scale_warnings(node, no_rig)
    assert "the model's scale is 0.950 x the odometry's" in warning
    rig = {**no_rig, "odometry_scale": 1.05, "odometry_scale_sigma": 0.01}
    [warning] = MapanyNode._scale_warnings(node, rig)
    assert "the odometry's distances are 1.050 x the camera rig's" in warning
    assert MapanyNode._scale_warnings(node, {**rig, "odometry_scale": 1.01}) == []
    assert MapanyNode._scale_warnings(node, {**rig, "odometry_scale_sigma": 0.05}) == []  # within 2 sigmas
    assert MapanyNode._scale_warnings(SimpleNamespace(config={"diagnostics.scale_disagreement": 0.0}), rig) == []
