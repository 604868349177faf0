"""`make demo`: the whole product on the embedded synthetic scene, over real ROS 2 topics.

A synthetic robot (camera, odometry - on odom, or as TF only with ``--odom-source tf`` - and static TF)
publishes; ``mapany_node`` runs as its own
process with the weight-free plane-sweep backend; a recorder writes everything to MCAP; the
outputs are scored against ground truth. Results land in ``out/demo/``.

``--loops N`` runs another demo instead (:mod:`mapany_ros.commands.demo_loops`): N loops with
drifting odometry and the model simulator as a SIMULATED backend, with and without loop closure,
in this process without DDS. Results land in ``out/demo_loops/``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from mapany_ros.ros.dds import apply_localhost_dds


def config_path(name: str) -> Path:
    """A file of config/, from the source tree or the installed share directory."""
    local = Path(__file__).resolve().parents[2] / "config" / name
    if local.is_file():
        return local
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory("mapany_ros")) / "config" / name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="synthetic scene seed")
    ap.add_argument("--width", type=int, default=None, help="camera width in pixels (default 320; --loops: 128)")
    ap.add_argument("--height", type=int, default=None, help="camera height in pixels (default 240; --loops: 96)")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds of robot motion")
    ap.add_argument("--rate", type=float, default=None, help="camera rate in Hz (default 10; --loops: 5)")
    ap.add_argument("--start", type=float, default=4.0,
                    help="where on the robot's trajectory the recording starts, seconds (the robot is already moving)")
    ap.add_argument("--speed", type=float, default=1.0, help="playback speed (1 = real time)")
    ap.add_argument("--odom-delay", type=float, default=0.1,
                    help="odometry arrives this many seconds after the images it covers (late, as real odometry)")
    ap.add_argument("--odom-jitter", type=float, default=0.3,
                    help="odometry intervals vary by up to this fraction (irregular, as real odometry)")
    ap.add_argument("--odom-source", choices=("topic", "tf"), default="topic",
                    help="the robot publishes odometry on odom, or only as the odom -> base_link transform on /tf "
                         "(the node then runs with odometry.source: tf)")
    ap.add_argument("--params", type=Path, default=None, help="node parameters file (default config/demo.yaml)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default out/demo; --loops: out/demo_loops)")
    ap.add_argument("--bag", type=Path, default=None,
                    help="write the synthetic robot with ground truth to this rosbag2 folder and exit (no node)")
    ap.add_argument("--bag-format", choices=("raw", "jpeg", "png"), default="raw", help="image topic of --bag")
    ap.add_argument("--bag-storage", choices=("mcap", "sqlite3"), default="mcap", help="storage of --bag")
    ap.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds")
    ap.add_argument("--loops", type=float, default=None, metavar="N",
                    help="instead: drive N loops with drifting odometry and the model simulator (a SIMULATED "
                         "backend), with and without loop closure, in this process without DDS; writes "
                         "demo_loops.png and metrics.json (the --duration, --start, --speed, --odom-*, --params "
                         "and --timeout options do not apply)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads of --loops (one: torch's busy-waiting workers slow a shared machine)")
    args = ap.parse_args(argv)
    if args.loops is not None and not args.loops > 0:
        ap.error(f"--loops must be positive, got {args.loops}")
    if args.loops is not None and args.bag is not None:
        ap.error("--loops and --bag are two different demos: give one of them")
    if args.threads < 1:
        ap.error(f"--threads must be at least 1, got {args.threads}")
    loops = args.loops is not None
    for key, plain, loop in (("width", 320, 128), ("height", 240, 96), ("rate", 10.0, 5.0),
                             ("out", Path("out/demo"), Path("out/demo_loops"))):
        if getattr(args, key) is None:
            setattr(args, key, loop if loops else plain)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.loops is not None:  # no node, no DDS: the core in this process, with a simulated backend
        from mapany_ros.commands import demo_loops

        return demo_loops.main(args)
    if args.bag is not None:  # no node, no DDS: the robot's inputs and ground truth as a bag
        from mapany_ros.sim.robot_bag import write_synthetic_bag

        write_synthetic_bag(args.bag, seed=args.seed, width=args.width, height=args.height,
                            duration_s=args.duration, rate_hz=args.rate, start_s=args.start,
                            odom_delay_s=args.odom_delay, image_format=args.bag_format, storage=args.bag_storage,
                            odom_source=args.odom_source)
        print(f"[demo] wrote {args.bag}")
        return 0
    apply_localhost_dds()
    # Imported after the DDS environment is set: nothing may touch rclpy before that.
    import rclpy
    from nav_msgs.msg import Odometry
    from nav_msgs.msg import Path as PathMsg
    from rclpy.executors import MultiThreadedExecutor
    from sensor_msgs.msg import CameraInfo, Image, PointCloud2
    from tf2_msgs.msg import TFMessage

    from mapany_ros.scoring.collector import OutputCollector
    from mapany_ros.scoring.scene_scores import evaluate, print_report, write_outputs
    from mapany_ros.sim.bag_recorder import BagRecorder
    from mapany_ros.sim.robot_publisher import SyntheticSource
    from mapany_ros.sim.scene import make_sequence

    t_start = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    params = args.params or config_path("demo.yaml")
    n_frames = int(round(args.duration * args.rate))
    print(f"[demo] rendering {n_frames} frames {args.width}x{args.height} of scene seed {args.seed} ...", flush=True)
    t0 = time.perf_counter()
    seq = make_sequence(args.seed, args.width, args.height, n_frames, args.rate, start_s=args.start)
    render_s = time.perf_counter() - t0

    log = open(out / "node.log", "w")
    node_proc = subprocess.Popen(
        [sys.executable, "-m", "mapany_ros.ros.node", "--ros-args", "--params-file", str(params),
         "-p", f"odometry.source:={args.odom_source}"],
        stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(),
    )
    rclpy.init()
    bag_path = out / "demo_bag"
    if bag_path.exists():
        import shutil

        shutil.rmtree(bag_path)
    source = SyntheticSource(seq, odom_delay_s=args.odom_delay, odom_jitter=args.odom_jitter,
                             odom_as_tf=args.odom_source == "tf")
    collector = OutputCollector()
    recorder = BagRecorder(bag_path, {
        "/camera/image_raw": Image, "/camera/camera_info": CameraInfo, "/odom": Odometry, "/tf_static": TFMessage,
        "/camera/depth": Image, "/camera/depth/camera_info": CameraInfo, "/camera/confidence": Image,
        "/points": PointCloud2, "/path": PathMsg, "/tf": TFMessage, "/map_points": PointCloud2,
    })
    executor = MultiThreadedExecutor(num_threads=3)
    for n in (source, collector, recorder):
        executor.add_node(n)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    ok = False
    try:
        deadline = time.monotonic() + args.timeout
        print("[demo] waiting for mapany_node to load its backend ...", flush=True)
        while source.image_pub.get_subscription_count() == 0 or collector.count_publishers("/points") == 0:
            if node_proc.poll() is not None:
                raise RuntimeError(f"mapany_node exited with {node_proc.returncode}: see {out / 'node.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError("mapany_node did not come up")
            time.sleep(0.1)
        time.sleep(0.5)  # let the remaining endpoints match
        print(f"[demo] playing {args.duration:.0f} s of camera + odometry at {args.speed}x real time ...", flush=True)
        publish_times: dict[int, int] = {}
        t_play = time.perf_counter()
        source.play(args.speed, on_image=lambda stamp: publish_times.__setitem__(stamp, time.time_ns()))
        play_s = time.perf_counter() - t_play
        # The node flushes its last partial window after window.max_latency_s; wait until its
        # diagnostics report no work left, then for the last outputs to arrive.
        t_end = time.monotonic()
        while not collector.node_idle_since(t_end + 2.0):
            if time.monotonic() > deadline:
                raise TimeoutError("mapany_node did not finish the sequence in time")
            time.sleep(0.2)
        time.sleep(1.5)  # the latched map is republished every map.publish_period_s
        ok = True
    finally:
        node_proc.send_signal(signal.SIGINT)
        try:
            node_proc.wait(15)
        except subprocess.TimeoutExpired:
            node_proc.kill()
        executor.shutdown()
        recorder.close()
        for n in (source, collector, recorder):
            n.destroy_node()
        rclpy.try_shutdown()
        log.close()
    if not ok:
        return 1
    report = evaluate(seq, source.stamp_offset_ns, collector.out, publish_times)
    report["timing"].update({"render_s": render_s, "play_s": play_s, "total_s": time.perf_counter() - t_start})
    report["bag_messages"] = dict(recorder.counts)
    write_outputs(out, seq, source.stamp_offset_ns, collector, report)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    print_report(report, out)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
