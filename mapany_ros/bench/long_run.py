"""A long run for `make bench`: thousands of keyframes through the node's core, memory watched.

The node's core (the same pipeline, placement and fused map mapany_node runs, in this process
without DDS) drives the synthetic robot round its loop until ``keyframes`` keyframes are placed,
with the model simulator of ``test/`` as backend (a source checkout), exact odometry and a small
voxel budget so eviction runs. Every ``every`` keyframes it records the process's resident memory
and the map's size: after warm-up neither may grow.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from mapany_ros.core.frames import Frame
from mapany_ros.core.fusion import FusionConfig
from mapany_ros.core.pipeline import Pipeline, PipelineConfig
from mapany_ros.sim.model_simulator import ModelSimulator
from mapany_ros.sim.scene import SyntheticScene, make_camera_model


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def bench_long_run(keyframes: int = 2000, every: int = 250, max_voxels: int = 30_000) -> dict:
    """Checkpoints of (keyframes, RSS MB, map voxels, map MB)."""

    scene = SyntheticScene(0)
    sim = ModelSimulator(scene=scene, noise_seed=7)
    fusion = FusionConfig(max_voxels=max_voxels, evict_radius_m=4.0, pixel_stride=2)
    config = PipelineConfig(window_size=8, window_overlap=2, min_translation_m=0.15, queue_size=100, fusion=fusion)
    pipeline = Pipeline(config, sim, lambda r: None)
    pipeline.set_extrinsic("camera", scene.T_base_camera)
    cam = make_camera_model(64, 48)
    image = np.zeros((48, 64, 3), np.uint8)
    checkpoints = []
    t0 = time.perf_counter()
    i = 0
    voxel_map = pipeline.map
    assert voxel_map is not None
    while pipeline.stats.keyframes < keyframes:
        t = i / 10.0
        for k in range(5):
            t_odom = t + 0.02 * k
            pipeline.add_odometry(int(round(t_odom * 1e9)), scene.base_pose(t_odom))
        pipeline.add_frame(Frame(image, int(round(t * 1e9)), "camera", "camera_optical_frame", cam))
        pipeline.process_ready()
        if pipeline.stats.keyframes >= (len(checkpoints) + 1) * every:
            checkpoints.append({"keyframes": pipeline.stats.keyframes, "rss_mb": rss_bytes() / 1e6,
                                "map_voxels": voxel_map.num_voxels, "map_mb": voxel_map.memory_bytes / 1e6})
        i += 1
    return {"keyframes": pipeline.stats.keyframes, "windows": pipeline.stats.windows_done, "max_voxels": max_voxels,
            "seconds": time.perf_counter() - t0, "checkpoints": checkpoints,
            "path_m": scene.trajectory.speed_mps * i / 10.0}


def markdown(result: dict) -> list[str]:
    cps = result["checkpoints"]
    warm, last = cps[1] if len(cps) > 1 else cps[0], cps[-1]
    lines = [
        f"## Long run: {result['keyframes']} keyframes, {result['path_m']:.0f} m",
        "",
        "The node's core in one process (pipeline, placement, fused map; the model simulator as backend at 64x48,",
        f"exact odometry), {result['windows']} windows in {result['seconds']:.0f} s, voxel budget "
        f"{result['max_voxels']}. Resident memory of the process and the map after each {cps[0]['keyframes']} "
        "keyframes:",
        "",
        "| keyframes | process RSS (MB) | map voxels | map memory (MB) |",
        "|---|---|---|---|",
        *[f"| {c['keyframes']} | {c['rss_mb']:.0f} | {c['map_voxels']} | {c['map_mb']:.1f} |" for c in cps],
        "",
        f"After warm-up ({warm['keyframes']} keyframes) the RSS changed by {last['rss_mb'] - warm['rss_mb']:+.0f} MB "
        f"to the end; the map never held more than {max(c['map_voxels'] for c in cps)} voxels (budget "
        f"{result['max_voxels']}).",
        "",
    ]
    return lines


if __name__ == "__main__":
    print("\n".join(markdown(bench_long_run())))
