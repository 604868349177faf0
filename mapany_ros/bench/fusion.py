"""Speed, memory and accuracy of the fused voxel map on synthetic keyframes.

``python -m mapany_ros.bench.fusion [--device cuda]`` prints a JSON dict: integration time
per keyframe (median over repeated passes after a warm-up pass, CUDA synchronised), the same
into a map already holding many voxels, update_pose and points() times, map memory, and the
map's accuracy and completeness against the synthetic scene's exact geometry. Targets: <= 20 ms
per 640x480 keyframe at 5 cm voxels on CPU, <= 1 ms on a GPU. docs/fusion_comparison.md records
a run next to Open3D's VoxelBlockGrid, which is measured with the same keyframes and metrics.
``--loop-closure 2000`` instead fuses 2000 keyframes on drifting poses and corrects them all at
once: re-anchoring (target <= 50 ms on CPU) and publishing times, and the corrected map's accuracy
against the same depth fused at the true poses (target: median and p90 within 1.25x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mapany_ros.core.fusion import FusionConfig, VoxelMap, write_ply
from mapany_ros.scoring.metrics import gt_points, map_quality
from mapany_ros.sim.odometry import DriftingOdometry, OdometryErrors
from mapany_ros.sim.scene import SyntheticScene, make_sequence


@dataclass
class SyntheticKeyframe:
    """One keyframe as a backend would hand it over, plus its ground truth."""

    key: tuple[str, int]
    depth: np.ndarray  # (h, w) float32 z-depth with multiplicative noise
    rgb: np.ndarray  # (h, w, 3) uint8
    confidence: np.ndarray  # (h, w) float32 in (0, 1], plane-sweep-like scale
    T_map_camera: np.ndarray
    true_depth: np.ndarray


def synthetic_keyframes(
    width: int, height: int, n: int, *, seed: int = 0, spacing_s: float = 1.0, noise: float = 0.01
) -> tuple[SyntheticScene, np.ndarray, list[SyntheticKeyframe]]:
    """(scene, K, keyframes): ``n`` views along the scene's loop, ``spacing_s`` apart (0.5 m/s).

    Depth gets ``noise`` relative Gaussian error; confidence is random in [0.5, 1].
    """
    scene = SyntheticScene(seed)
    seq = make_sequence(seed, width, height, n, 1.0 / spacing_s, scene=scene, supersample=1)
    rng = np.random.default_rng(seed)
    keyframes = []
    for f in seq.frames:
        noisy = f.depth * (1.0 + noise * rng.standard_normal(f.depth.shape)).astype(np.float32)
        confidence = rng.uniform(0.5, 1.0, f.depth.shape).astype(np.float32)
        keyframes.append(SyntheticKeyframe(("cam", f.stamp_ns), noisy, f.rgb, confidence, f.T_odom_camera, f.depth))
    return scene, seq.camera_model.K, keyframes


def true_surface_samples(K: np.ndarray, keyframes: list[SyntheticKeyframe], max_depth_m: float) -> np.ndarray:
    """(m, 3) ground-truth surface points seen by the keyframes within ``max_depth_m``."""
    pts = [gt_points(np.where(kf.true_depth <= max_depth_m, kf.true_depth, np.nan), K, kf.T_map_camera)
           for kf in keyframes]
    pts = np.concatenate([p.reshape(-1, 3) for p in pts])
    return pts[np.all(np.isfinite(pts), axis=1)]


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn`` takes, GPU work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _integrate_all(vmap: VoxelMap, inputs: list[tuple]) -> list[float]:
    """Integrate every keyframe; seconds each."""
    return [_timed(lambda a=args: vmap.integrate(*a), vmap.device) for args in inputs]


def _far_voxels(n: int, voxel_size_m: float, path: Path) -> None:
    """A PLY of ``n`` points, one per voxel, on a grid 500 m away: a large map to integrate into."""
    side = int(np.ceil(n ** (1 / 3)))
    idx = np.stack(np.unravel_index(np.arange(n), (side, side, side)), axis=1)
    xyz = ((idx + 0.5) * voxel_size_m + 500.0).astype(np.float32)
    write_ply(path, xyz, np.full((n, 3), 128, np.uint8), np.ones(n, np.float32))


def bench_fusion(
    device: str = "cpu",
    width: int = 640,
    height: int = 480,
    voxel_size_m: float = 0.05,
    repeats: int = 5,
    keyframes: int = 8,
    pixel_stride: int = FusionConfig.pixel_stride,
    prefill_voxels: int = 1_500_000,
) -> dict[str, float | int | str]:
    """Measure the map on ``keyframes`` synthetic views, ``repeats`` timed passes after one warm-up.

    ``prefill_voxels`` far-away voxels are loaded for a second timing, to show the cost of a
    keyframe does not grow with the map (0 skips it).
    """
    dev = torch.device(device)
    cfg = FusionConfig(voxel_size_m=voxel_size_m, pixel_stride=pixel_stride)
    scene, K, kfs = synthetic_keyframes(width, height, keyframes)
    inputs = [
        (kf.key, torch.as_tensor(kf.depth, device=dev), K, kf.T_map_camera, torch.as_tensor(kf.rgb, device=dev),
         torch.as_tensor(kf.confidence, device=dev))
        for kf in kfs
    ]
    _integrate_all(VoxelMap(cfg, dev), inputs)  # warm-up
    times = []
    for _ in range(repeats):
        vmap = VoxelMap(cfg, dev)
        times += _integrate_all(vmap, inputs)
    # Every keyframe 3 cm away, then back: each call records a pose; the submaps follow when read.
    poses = [kf.T_map_camera @ _shifted(0.03) for kf in kfs] + [kf.T_map_camera for kf in kfs]
    repose = [_timed(lambda k=kf.key, T=T: vmap.update_pose(k, T), dev) for kf, T in zip(kfs * 2, poses)]
    xyz, _, _ = vmap.points()
    result: dict[str, float | int | str] = {
        "device": str(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "width": width,
        "height": height,
        "voxel_size_m": voxel_size_m,
        "pixel_stride": cfg.pixel_stride,
        "keyframes": keyframes,
        "integrate_ms": statistics.median(times) * 1e3,
        "integrate_max_ms": max(times) * 1e3,
        "update_pose_ms": statistics.median(repose) * 1e3,
        "points_ms": statistics.median(_timed(vmap.points, dev) for _ in range(repeats)) * 1e3,
        "num_voxels": vmap.num_voxels,
        "num_points": len(xyz),
        "memory_mb": vmap.memory_bytes / 2**20,
        **map_quality(scene.surface_distance(xyz), xyz, true_surface_samples(K, kfs, cfg.max_depth_m)[::7]),
    }
    if prefill_voxels:
        result.update(_prefilled(cfg, dev, inputs, prefill_voxels, repeats))
    return result


def _prefilled(
    cfg: FusionConfig, dev: torch.device, inputs: list[tuple], n: int, repeats: int
) -> dict[str, float | int]:
    """Integration time into a map already holding ``n`` voxels."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "far.ply"
        _far_voxels(n, cfg.voxel_size_m, path)
        times = []
        for r in range(repeats + 1):
            vmap = VoxelMap(cfg, dev)
            vmap.load_ply(path)
            run = _integrate_all(vmap, inputs)
            times += run if r else []  # the first pass warms up
    return {
        "prefill_voxels": n,
        "integrate_prefilled_ms": statistics.median(times) * 1e3,
        "integrate_prefilled_max_ms": max(times) * 1e3,
        "memory_prefilled_mb": vmap.memory_bytes / 2**20,
    }


def bench_loop_closure(
    keyframes: int = 2000,
    per_loop: int = 100,
    width: int = 160,
    height: int = 120,
    scale_error: float = 0.01,
    yaw_drift_deg_per_m: float = 0.3,
    max_voxels: int = FusionConfig.max_voxels,
    repeats: int = 3,
) -> dict[str, float | int]:
    """A loop closure after ``keyframes`` keyframes: re-anchoring cost, publishing cost, map quality.

    The robot drives the scene's loop ``keyframes / per_loop`` times; its keyframes are fused at
    poses that drift (``scale_error``, ``yaw_drift_deg_per_m``, as a model-and-odometry estimate
    might), then every keyframe is corrected to its true pose at once. 160x120 at pixel stride 1
    fuses as many pixels per keyframe as 640x480 at the default stride 4. Timed: update_poses of all
    keyframes (and the same as single update_pose calls), the first points() after it (the union
    rebuilt from every stored voxel), points() after a correction of the newest keyframes only (the
    union updated), and points() of an unchanged map. Quality: distance of the corrected map's points
    to the true surfaces against the same depth fused at the true poses (same budget).
    """
    scene = SyntheticScene(0)
    loop_s = scene.trajectory.loop_length_m / scene.trajectory.speed_mps
    seq = make_sequence(0, width, height, per_loop, per_loop / loop_s, scene=scene, supersample=1)
    odometry = DriftingOdometry(scene.base_pose, OdometryErrors(scale_error, yaw_drift_deg_per_m, seed=1))
    rng = np.random.default_rng(0)
    noise = [(1 + 0.005 * rng.standard_normal(f.depth.shape)).astype(np.float32) for f in seq.frames]
    cfg = FusionConfig(pixel_stride=1, max_voxels=max_voxels)
    truth, vmap = VoxelMap(cfg), VoxelMap(cfg)
    keys, true_poses, integrate_s = [], {}, []
    for i in range(keyframes):
        f = seq.frames[i % per_loop]
        t = (i // per_loop) * loop_s + f.stamp_ns * 1e-9  # the same view, one loop later
        key = ("cam", int(round(t * 1e9)))
        depth = f.depth * noise[i % per_loop]
        truth.integrate(key, depth, seq.camera_model.K, f.T_odom_camera, f.rgb)
        drifted = odometry.pose(t) @ scene.T_base_camera
        integrate_s.append(_timed(lambda k=key, d=depth, T=drifted, c=f.rgb: vmap.integrate(
            k, d, seq.camera_model.K, T, c), vmap.device))
        keys.append(key)
        true_poses[key] = f.T_odom_camera
    vmap.points()  # the drifted map, published once
    surface = true_surface_samples(seq.camera_model.K, _as_keyframes(seq), cfg.max_depth_m)[::7]
    before = vmap.memory_bytes
    cpu = time.process_time()
    batch_s = _timed(lambda: vmap.update_poses(true_poses), vmap.device)
    batch_cpu = time.process_time() - cpu
    cpu = time.process_time()
    rebuild_s = _timed(vmap.points, vmap.device)
    rebuild_cpu = time.process_time() - cpu
    xyz = vmap.points()[0]
    corrected, reference = scene.surface_distance(xyz), scene.surface_distance(truth.points()[0])
    single, incremental, unchanged = [], [], []
    for r in range(repeats):  # the same loop closure as single calls, back and forth by 2 cm
        shift = _shifted(0.02 * ((r + 1) % 2))
        poses = [(k, true_poses[k] @ shift) for k in keys]
        single.append(_timed(lambda p=poses: [vmap.update_pose(k, T) for k, T in p], vmap.device))
        vmap.points()
        newest = {k: true_poses[k] @ _shifted(0.02 * (r % 2)) for k in keys[-3 * cfg.submap_keyframes :]}
        vmap.update_poses(newest)
        incremental.append(_timed(vmap.points, vmap.device))
        unchanged.append(_timed(vmap.points, vmap.device))
    return {
        "keyframes": keyframes,
        "loops": keyframes / per_loop,
        "width": width,
        "height": height,
        "submap_keyframes": cfg.submap_keyframes,
        "max_voxels": max_voxels,
        "drift_end_m": float(np.linalg.norm(odometry.pose(t)[:3, 3] - scene.base_pose(t)[:3, 3])),
        "integrate_ms": statistics.median(integrate_s) * 1e3,
        "stored_voxels": vmap.num_voxels,
        "submaps": vmap.num_submaps,
        "published_points": len(xyz),
        "memory_mb": before / 2**20,
        "update_poses_ms": batch_s * 1e3,
        "update_poses_cpu_ms": batch_cpu * 1e3,
        "update_pose_loop_ms": statistics.median(single) * 1e3,
        "points_rebuild_ms": rebuild_s * 1e3,
        "points_rebuild_cpu_ms": rebuild_cpu * 1e3,
        "points_incremental_ms": statistics.median(incremental) * 1e3,
        "points_unchanged_ms": statistics.median(unchanged) * 1e3,
        "median_m": float(np.median(corrected)),
        "p90_m": float(np.percentile(corrected, 90)),
        "true_poses_median_m": float(np.median(reference)),
        "true_poses_p90_m": float(np.percentile(reference, 90)),
        "completeness": map_quality(corrected, xyz, surface)["completeness"],
    }


def _as_keyframes(seq) -> list[SyntheticKeyframe]:
    return [SyntheticKeyframe(("cam", f.stamp_ns), f.depth, f.rgb, np.ones_like(f.depth), f.T_odom_camera, f.depth)
            for f in seq.frames]


def _shifted(metres: float) -> np.ndarray:
    T = np.eye(4)
    T[:3, 3] = metres / np.sqrt(3.0)
    return T


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--voxel-size", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keyframes", type=int, default=8)
    parser.add_argument("--pixel-stride", type=int, default=FusionConfig.pixel_stride)
    parser.add_argument("--prefill-voxels", type=int, default=1_500_000)
    parser.add_argument("--loop-closure", type=int, default=0, metavar="N",
                        help="instead: a loop closure after N keyframes (bench_loop_closure; 2000 in make bench)")
    a = parser.parse_args(argv)
    if a.loop_closure:
        result = bench_loop_closure(a.loop_closure, repeats=a.repeats)
    else:
        result = bench_fusion(
            a.device, a.width, a.height, a.voxel_size, a.repeats, a.keyframes, a.pixel_stride, a.prefill_voxels
        )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def markdown(f: dict) -> list[str]:
    """The fused map's section: integration cost per keyframe against the targets, memory, quality."""
    return [
        f"## Fused map ({f['width']}x{f['height']} keyframes, {f['voxel_size_m'] * 100:.0f} cm voxels, "
        f"{f['device']}, {f['threads']} torch threads)",
        "",
        "| step | ms | target |",
        "|---|---|---|",
        f"| integrate one keyframe (median / worst of {f['keyframes']} keyframes x repeats) | "
        f"{f['integrate_ms']:.1f} / {f['integrate_max_ms']:.1f} | <= 20 on CPU, <= 1 on a GPU |",
        f"| the same into a map of {f['prefill_voxels']} voxels | {f['integrate_prefilled_ms']:.1f} |"
        " |",
        f"| correct a keyframe's pose (update_pose; its submap follows when the map is read) | "
        f"{f['update_pose_ms']:.2f} | |",
        f"| points() of the whole map | {f['points_ms']:.2f} | |",
        "",
        f"{f['num_voxels']} voxels, {f['memory_mb']:.1f} MiB; map points to the true surface: median "
        f"{f['accuracy_median_m'] * 100:.2f} cm; true surface within 5 cm of the map: {f['completeness'] * 100:.1f} %.",
        "",
    ]


def loop_closure_markdown(r: dict) -> list[str]:
    """The loop-closure section: re-anchoring and publishing cost at 2000 keyframes, and map quality."""
    return [
        f"## Fused map after a loop closure ({r['keyframes']} keyframes, {r['loops']:.0f} loops, "
        f"{r['width']}x{r['height']} at stride 1)",
        "",
        f"Every keyframe fused on drifting poses ({r['drift_end_m']:.1f} m off at the end), then all of them "
        f"corrected at once. Submaps of {r['submap_keyframes']} keyframes; budget {r['max_voxels']} voxels: "
        f"{r['stored_voxels']} stored in {r['submaps']} submaps ({r['memory_mb']:.0f} MiB), "
        f"{r['published_points']} published.",
        "",
        "| step | ms | target |",
        "|---|---|---|",
        f"| integrate one keyframe (median) | {r['integrate_ms']:.1f} | |",
        f"| re-anchor the map: update_poses of all {r['keyframes']} keyframes (CPU time of this process) | "
        f"{r['update_poses_ms']:.1f} ({r['update_poses_cpu_ms']:.1f}) | <= 50 |",
        f"| the same as {r['keyframes']} update_pose calls | {r['update_pose_loop_ms']:.1f} | |",
        f"| points() after it: the union of all stored voxels rebuilt (CPU time) | {r['points_rebuild_ms']:.0f} "
        f"({r['points_rebuild_cpu_ms']:.0f}) | |",
        f"| points() after the newest submaps moved: the union updated | {r['points_incremental_ms']:.0f} | |",
        f"| points() of an unchanged map | {r['points_unchanged_ms']:.0f} | |",
        "",
        f"Map points to the true surfaces after the correction: median {r['median_m'] * 100:.2f} cm, p90 "
        f"{r['p90_m'] * 100:.2f} cm; the same depth fused at the true poses: {r['true_poses_median_m'] * 100:.2f} / "
        f"{r['true_poses_p90_m'] * 100:.2f} cm (target: within 1.25x); completeness "
        f"{r['completeness'] * 100:.1f} %.",
        "",
    ]

