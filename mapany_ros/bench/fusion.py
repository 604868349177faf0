"""Speed, memory and accuracy of the fused voxel map on synthetic keyframes.

``python -m mapany_ros.bench.fusion [--device cuda]`` prints a JSON dict: integration time
per keyframe (median over repeated passes after a warm-up pass, CUDA synchronised), the same
into a map already holding many voxels, update_pose and points() times, map memory, and the
map's accuracy and completeness against the synthetic scene's exact geometry. Targets: <= 20 ms
per 640x480 keyframe at 5 cm voxels on CPU, <= 1 ms on a GPU. docs/fusion_comparison.md records
a run next to Open3D's VoxelBlockGrid, which is measured with the same keyframes and metrics.
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
    recent = kfs[-cfg.keep_keyframes :]  # the keyframes update_pose can move: 3 cm away, then back
    poses = [kf.T_map_camera @ _shifted(0.03) for kf in recent] + [kf.T_map_camera for kf in recent]
    repose = [_timed(lambda k=kf.key, T=T: vmap.update_pose(k, T), dev) for kf, T in zip(recent * 2, poses)]
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
    a = parser.parse_args(argv)
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
        f"| move a recent keyframe (update_pose) | {f['update_pose_ms']:.1f} | |",
        f"| points() of the whole map | {f['points_ms']:.2f} | |",
        "",
        f"{f['num_voxels']} voxels, {f['memory_mb']:.1f} MiB; map points to the true surface: median "
        f"{f['accuracy_median_m'] * 100:.2f} cm; true surface within 5 cm of the map: {f['completeness'] * 100:.1f} %.",
        "",
    ]
