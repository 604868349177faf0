"""The node's own overhead per keyframe (conversion, windowing, packing, publishing) against the backend's time."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

from mapany_ros.bench import subscriber


def bench_node_overhead(tmp: Path, width: int = 640, height: int = 480, duration_s: float = 4.0) -> dict:
    """The real node in this process (planesweep, downscale 2) with its callbacks and publishing timed."""
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter

    from mapany_ros.ros.node import MapanyNode
    from mapany_ros.sim.robot_publisher import SyntheticSource
    from mapany_ros.sim.scene import make_sequence

    seq = make_sequence(0, width, height, int(duration_s * 10), 10.0)
    topics = ["/camera/depth", "/camera/confidence", "/camera/depth/camera_info", "/points"]
    proc, out = subscriber.start(tmp, topics)
    rclpy.init()
    overrides = {"backend": "planesweep", "qos.reliability": "reliable", "qos.depth": 50, "window.size": 8,
                 "window.overlap": 2, "window.queue_size": 16, "window.max_latency_s": 1.0,
                 "planesweep.downscale": 2, "stats_period_s": 60.0}
    node = MapanyNode(parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
    timings: dict[str, list[float]] = {"image_cb": [], "odom_cb": [], "publish": []}

    def timed(name, fn):
        def wrapper(*a):
            t0 = time.perf_counter()
            fn(*a)
            timings[name].append(time.perf_counter() - t0)
        return wrapper

    for sub in node.subscriptions:
        if sub.topic_name.endswith("image_raw"):
            sub.callback = timed("image_cb", sub.callback)
        elif sub.topic_name.endswith("odom"):
            sub.callback = timed("odom_cb", sub.callback)
    node.pipeline._on_result = timed("publish", node.pipeline._on_result)
    backend_times: list[tuple[float, int]] = []
    infer = node.backend.infer

    def timed_infer(frames):
        t0 = time.perf_counter()
        r = infer(frames)
        backend_times.append((time.perf_counter() - t0, len(frames)))
        return r

    node.backend.infer = timed_infer
    source = SyntheticSource(seq)
    ex = MultiThreadedExecutor(num_threads=2)
    ex.add_node(node)
    ex.add_node(source)
    spin = threading.Thread(target=ex.spin, daemon=True)
    spin.start()
    try:
        deadline = time.monotonic() + 60
        while node.count_subscribers("/points") == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        source.play(1.0)
        time.sleep(overrides["window.max_latency_s"] + 0.5)
        node.pipeline.flush()
        node.pipeline.wait_idle(300)
        time.sleep(1.0)
    finally:
        ex.shutdown()
        node.destroy_node()
        source.destroy_node()
        rclpy.try_shutdown()
        subscriber.stop(proc)
    n_key = max(sum(1 for r in subscriber.read_lines(out) if r["topic"] == "/camera/depth"), 1)
    callbacks_s = sum(timings["image_cb"]) + sum(timings["odom_cb"])
    publish_s = sum(timings["publish"])
    backend_s = sum(t for t, _ in backend_times)
    return {
        "resolution": f"{width}x{height}",
        "frames": len(timings["image_cb"]),
        "keyframes_output": n_key,
        "windows": len(backend_times),
        "backend_s_per_keyframe": backend_s / n_key,
        "callbacks_ms_per_keyframe": callbacks_s / n_key * 1e3,
        "image_callback_p50_ms": statistics.median(timings["image_cb"]) * 1e3 if timings["image_cb"] else 0.0,
        "image_callback_max_ms": max(timings["image_cb"]) * 1e3 if timings["image_cb"] else 0.0,
        "publish_ms_per_keyframe": publish_s / n_key * 1e3,
        "overhead_fraction": (callbacks_s + publish_s) / backend_s if backend_s else float("nan"),
    }


def markdown(node: dict) -> list[str]:
    return [
        f"## Node overhead per keyframe ({node['resolution']}, planesweep at half resolution)",
        "",
        "The real node in one process, a synthetic robot publishing camera + odometry + TF in real time, and",
        "a subscriber to depth, confidence, depth/camera_info and points in another process.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| frames in / keyframes output / windows | {node['frames']} / {node['keyframes_output']} / "
        f"{node['windows']} |",
        f"| backend time per keyframe | {node['backend_s_per_keyframe'] * 1e3:.0f} ms |",
        f"| callbacks (image conversion, odometry, sync, keyframes, windows) per keyframe | "
        f"{node['callbacks_ms_per_keyframe']:.2f} ms |",
        f"| image callback p50 / max | {node['image_callback_p50_ms']:.2f} / {node['image_callback_max_ms']:.2f} ms |",
        f"| packing + publishing (depth, confidence, camera_info, cloud, path, TF) per keyframe | "
        f"{node['publish_ms_per_keyframe']:.2f} ms |",
        f"| **overhead / backend time** | **{node['overhead_fraction'] * 100:.2f} %** (target <= 5 %) |",
        "",
    ]
