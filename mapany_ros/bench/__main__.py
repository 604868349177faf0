"""`make bench`: speed of the node's own work, written to docs/benchmarks.md.

Measured as ratios within one run (these machines are noisy):
1. Image -> torch tensor for 640x480 rgb8 (target <= 1 ms).
2. A 300k-point XYZRGB PointCloud2 built from a tensor and published to a subscriber in
   another process (target <= 5 ms), beside a memcpy of the same bytes and the slow
   ``msg.data = ndarray`` assignment that the conversions avoid.
3. Per-keyframe node overhead (conversion, windowing, packing, publishing) as a fraction of the
   backend's time at 640x480, with the real node, the planesweep backend and a subscriber in
   another process (target <= 5 %).
4. The MapAnything adapter's overhead against upstream ``infer`` (where upstream is installed).
5. Placement time per window against the backend's (target <= 5 %, :mod:`mapany_ros.bench.placement`),
   and placement and map accuracy against a real model's errors, scenario by scenario
   (:mod:`mapany_ros.bench.accuracy`).
6. Image and odometry callback latency while a 2 M voxel map is published (target p99 <= 10 ms,
   :mod:`mapany_ros.bench.executor`).
7. Loop closure's global descriptors on synthetic revisits: recall, precision, cost of the search
   at 2000 keyframes (:mod:`mapany_ros.bench.loops`).
8. Keyframe selection per frame group in the callbacks, from the images without odometry
   (target <= 2 ms at 640x480, :mod:`mapany_ros.bench.keyframes`).
9. The occupancy grid's update per 640x480 keyframe on the CPU (target <= 10 ms) and its accuracy on
   the demo's path (:mod:`mapany_ros.bench.occupancy`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from mapany_ros.bench import messages, node
from mapany_ros.ros.dds import apply_localhost_dds


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def write_markdown(path: Path, results: dict, command: str) -> None:
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{command}` on {results['date']}.",
        f"Machine: {results['machine']}.",
        "Figures are medians unless stated; compare them as ratios within this run (the machines are noisy).",
        "",
    ]
    lines += messages.markdown(results["image"], results["cloud"]) + node.markdown(results["node"])
    if "executor" in results:
        from mapany_ros.bench.executor import markdown as executor_markdown

        lines += executor_markdown(results["executor"])
    for extra in results.get("extra_sections", []):
        lines.extend(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = ap.parse_args(argv)
    apply_localhost_dds()
    tmp = Path("out/bench")
    tmp.mkdir(parents=True, exist_ok=True)
    results = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine()}
    print("[bench] image -> tensor ...", flush=True)
    results["image"] = messages.bench_image_to_tensor()
    print("[bench] PointCloud2 to another process ...", flush=True)
    results["cloud"] = messages.bench_cloud(tmp)
    print("[bench] node overhead at 640x480 ...", flush=True)
    results["node"] = node.bench_node_overhead(tmp)
    from mapany_ros.bench.executor import bench_executor

    print("[bench] executor latency while a 2 M voxel map is published ...", flush=True)
    results["executor"] = bench_executor(tmp)
    from mapany_ros.bench.keyframes import bench_keyframes
    from mapany_ros.bench.mapanything import bench_adapter
    from mapany_ros.bench.placement import bench_placement

    print("[bench] keyframe selection per frame group ...", flush=True)
    results["extra_sections"] = [bench_keyframes()]
    print("[bench] MapAnything adapter ...", flush=True)
    results["extra_sections"].append(bench_adapter())
    print("[bench] placement: cost per window and the simulator scenarios ...", flush=True)
    results["extra_sections"].append(bench_placement())
    from mapany_ros.bench.accuracy import accuracy_lines, bench_accuracy

    print("[bench] placement and the map against a real model's errors: the targets' scenarios ...", flush=True)
    results["accuracy"] = bench_accuracy()
    results["extra_sections"].append(accuracy_lines(results["accuracy"]))
    from mapany_ros.bench.loops import bench_loop_descriptors

    print("[bench] loop closure: descriptors on synthetic revisits, search at 2000 keyframes ...", flush=True)
    results["extra_sections"].append(bench_loop_descriptors())
    from mapany_ros.bench.decode import bench_decode
    from mapany_ros.bench.fusion import bench_fusion, bench_loop_closure, loop_closure_markdown
    from mapany_ros.bench.fusion import markdown as fusion_markdown
    from mapany_ros.bench.long_run import bench_long_run
    from mapany_ros.bench.long_run import markdown as long_run_markdown
    from mapany_ros.bench.process import bench_process

    print("[bench] compressed image decoding ...", flush=True)
    results["extra_sections"].append(bench_decode())
    print("[bench] fused map ...", flush=True)
    results["extra_sections"].append(fusion_markdown(bench_fusion()))
    print("[bench] fused map: a loop closure at 2000 keyframes ...", flush=True)
    results["extra_sections"].append(loop_closure_markdown(bench_loop_closure()))
    from mapany_ros.bench.occupancy import bench_occupancy

    print("[bench] occupancy grid: update per keyframe, accuracy on the demo's path ...", flush=True)
    results["extra_sections"].append(bench_occupancy())
    print("[bench] offline processing ...", flush=True)
    results["extra_sections"].append(bench_process())
    print("[bench] long run (2000 keyframes) ...", flush=True)
    results["extra_sections"].append(long_run_markdown(bench_long_run()))
    gpu = Path("docs/bench_gpu.md")
    results["extra_sections"].append(["## The MapAnything path", "", f"See `{gpu}` (make bench-gpu): it needs "
                                      "upstream MapAnything, so it is not part of this run.", ""])
    (tmp / "results.json").write_text(json.dumps(results, indent=2, default=str))
    env = " ".join(f"{k}={os.environ[k]}" for k in ("MAPANY_BENCH_MODEL_PATH", "MAPANY_TEST_MODEL_PATH")
                   if os.environ.get(k))
    command = f"{env + ' ' if env else ''}{Path(sys.executable).name} -m mapany_ros.bench (make bench)"
    write_markdown(args.out, results, command)
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
