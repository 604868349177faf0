"""The occupancy grid for `make bench`: its cost per keyframe, and its accuracy on the demo path.

1. Grid update per 640x480 keyframe on the CPU (integrate; median and worst over repeated passes
   after a warm-up), target <= 10 ms, and the cost of moving a keyframe to a corrected pose.
2. Occupancy on the demo's path (320x240, 8 s at 10 Hz from 4 s into the loop, config/demo.yaml)
   through the core pipeline, scored with :mod:`mapany_ros.scoring.occupancy`: with the plane sweep
   (the demo's backend) and with the model simulator (a real model's errors), on seed 0 (the demo
   scene) and seed 3.

    python -m mapany_ros.bench.occupancy [--skip-accuracy]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from mapany_ros.core.frames import CameraModel, Frame
from mapany_ros.core.occupancy import OccupancyConfig, OccupancyGrid
from mapany_ros.core.pipeline import Pipeline, WindowResult
from mapany_ros.scoring.occupancy import TARGETS, TrueView, score_grid
from mapany_ros.sim.scene import SyntheticScene, make_camera_model, make_sequence

CONFIG = Path(__file__).resolve().parents[2] / "config" / "demo.yaml"
UPDATE_TARGET_MS = 10.0


@dataclasses.dataclass
class PathRun:
    """A grid built on the demo's path, and what it is scored against."""

    scene: SyntheticScene
    pipeline: Pipeline
    views: list[TrueView]  # the keyframes' true poses and depth
    config: OccupancyConfig

    def scores(self) -> dict[str, float]:
        grid = self.pipeline.grid
        assert grid is not None
        c = self.config
        return score_grid(grid.snapshot(), self.scene, self.views, c.min_height_m, c.max_height_m, c.max_range_m)


def demo_path_run(seed: int = 0, backend: str = "model_simulator", *, width: int = 320, height: int = 240,
                  duration_s: float = 8.0, rate_hz: float = 10.0, start_s: float = 4.0,
                  overrides: tuple[str, ...] = (), simulator: dict | None = None) -> PathRun:
    """The demo's robot (exact odometry at 50 Hz, one camera) through the core pipeline, offline.

    ``backend``: ``planesweep`` (the demo's, on rendered images) or ``model_simulator`` (the scene's
    true depth with a real model's errors: random window frames, scale, pose and depth noise, bad
    views; ``simulator`` overrides its error model). ``overrides``: parameters as ``NAME:=VALUE``.
    """
    from mapany_ros.commands.process import load_parameters
    from mapany_ros.core.backends import make_backend
    from mapany_ros.ros.params import validate
    from mapany_ros.sim.model_simulator import ModelSimulator

    values, warnings = load_parameters(CONFIG, list(overrides))
    if warnings:
        raise ValueError("; ".join(warnings))
    config = validate(values)
    scene = SyntheticScene(seed)
    n = int(round(duration_s * rate_hz))
    cam = make_camera_model(width, height)
    if backend == "planesweep":
        seq = make_sequence(seed, width, height, n, rate_hz, start_s=start_s, scene=scene)
        images = [f.rgb for f in seq.frames]
        model = make_backend("planesweep", "cpu", **config.backend_options)
    elif backend == "model_simulator":
        images = [np.zeros((height, width, 3), np.uint8)] * n
        model = ModelSimulator("cpu", scene=scene, **(simulator or {}))
    else:
        raise ValueError(f"backend must be planesweep or model_simulator, got {backend!r}")
    now = [0]
    results: list[WindowResult] = []
    pipeline = Pipeline(dataclasses.replace(config.pipeline, thin_keyframes=False), model, results.append,
                        on_error=_raise, clock=lambda: now[0])
    pipeline.set_extrinsic("camera", scene.T_base_camera)
    t_odom = start_s - 0.1
    for i in range(n):
        t = start_s + i / rate_hz
        while t_odom <= t + 0.05:
            pipeline.add_odometry(round(t_odom * 1e9), scene.base_pose(t_odom))
            t_odom += 0.02
        now[0] = round(t * 1e9)
        pipeline.add_frame(Frame(images[i], round(t * 1e9), "camera", "camera_optical_frame", cam))
        pipeline.poll()
        pipeline.process_ready()
    now[0] += round(10e9)
    pipeline.flush()
    pipeline.process_ready()
    assert pipeline.grid is not None and config.pipeline.grid is not None
    views = []
    for r in results:
        for f, view, out in zip(r.frames, r.prediction.views, r.output_mask, strict=True):
            if out:
                T = scene.camera_pose(f.stamp_ns * 1e-9)
                grid_cam = CameraModel(view.width, view.height, view.K)
                views.append(TrueView(T, view.K, scene.render(T, grid_cam, supersample=1)[1], np.asarray(view.valid)))
    return PathRun(scene, pipeline, views, config.pipeline.grid)


def _raise(exc: Exception) -> None:
    raise exc


def bench_update(width: int = 640, height: int = 480, keyframes: int = 8, repeats: int = 5, threads: int = 1
                 ) -> dict:
    """Grid update per keyframe on the CPU: integrate, and a correction (update_pose applied on read).

    With ``threads`` torch CPU threads (restored after): the grid's small tensors gain nothing from
    more, and on a machine busy with other work torch's busy-waiting OpenMP workers made each update
    several times slower (as `mapany-ros process --threads` documents).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _bench_update(width, height, keyframes, repeats)
    finally:
        torch.set_num_threads(previous)


def _bench_update(width: int, height: int, keyframes: int, repeats: int) -> dict:
    from mapany_ros.bench.fusion import synthetic_keyframes

    scene, K, kfs = synthetic_keyframes(width, height, keyframes)
    T_base_camera = scene.T_base_camera
    inputs = [(kf.key, torch.as_tensor(kf.depth), K, kf.T_map_camera, torch.as_tensor(kf.confidence))
              for kf in kfs]

    def integrate_all(grid: OccupancyGrid) -> tuple[list[float], list[float]]:
        wall, cpu = [], []
        for args in inputs:
            t0, c0 = time.perf_counter(), time.thread_time()
            grid.integrate(*args, T_base_camera=T_base_camera)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
        return wall, cpu

    integrate_all(OccupancyGrid())  # warm-up
    times: list[float] = []
    cpu: list[float] = []
    for _ in range(repeats):
        grid = OccupancyGrid()
        wall_s, cpu_s = integrate_all(grid)
        times += wall_s
        cpu += cpu_s
    shift = np.eye(4)
    shift[:3, 3] = 0.05
    moves, snaps = [], []
    for kf in kfs:  # each correction applied by the next read, a snapshot of the whole grid
        grid.update_pose(kf.key, kf.T_map_camera @ shift)
        t0 = time.perf_counter()
        grid.snapshot()
        moves.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        grid.snapshot()
        snaps.append(time.perf_counter() - t0)
    return {
        "width": width, "height": height, "keyframes": keyframes, "repeats": repeats,
        "threads": torch.get_num_threads(), "pixel_stride": grid.config.pixel_stride,
        "resolution_m": grid.config.resolution_m,
        "integrate_ms": statistics.median(times) * 1e3, "integrate_max_ms": max(times) * 1e3,
        "integrate_cpu_ms": statistics.median(cpu) * 1e3, "integrate_cpu_max_ms": max(cpu) * 1e3,
        "move_ms": (statistics.median(moves) - statistics.median(snaps)) * 1e3,
        "snapshot_ms": statistics.median(snaps) * 1e3,
        "kept_kb_per_keyframe": grid.keyframe_bytes / len(kfs) / 1024,
    }


#: The runs of the accuracy table: (label, backend, simulator error model).
ACCURACY_RUNS = (
    ("planesweep", "planesweep", None),
    ("model simulator", "model_simulator", None),
    ("model simulator without its 3 % scale error per window", "model_simulator", {"scale_sigma": 0.0}),
)


def bench_accuracy(seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 7), threads: int = 1) -> list[dict]:
    """Every run of ACCURACY_RUNS on every seed, scored; with ``threads`` torch threads (restored after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for label, backend, simulator in ACCURACY_RUNS:
            for seed in seeds:
                t0 = time.perf_counter()
                run = demo_path_run(seed, backend, simulator=simulator)
                rows.append({"backend": label, "seed": seed, "keyframes": len(run.views),
                             "seconds": time.perf_counter() - t0, **run.scores()})
    finally:
        torch.set_num_threads(previous)
    return rows


def markdown(update: dict, accuracy: list[dict]) -> list[str]:
    u = update
    lines = [
        f"## Occupancy grid ({u['width']}x{u['height']} keyframes, {u['resolution_m'] * 100:.0f} cm cells, pixel "
        f"stride {u['pixel_stride']}, CPU, {u['threads']} torch thread{'s' if u['threads'] != 1 else ''})",
        "",
        "| step | ms | target |",
        "|---|---|---|",
        f"| grid update per keyframe (integrate; median / worst of {u['keyframes']} keyframes x {u['repeats']}) | "
        f"{u['integrate_ms']:.1f} / {u['integrate_max_ms']:.1f} | <= {UPDATE_TARGET_MS:.0f} |",
        f"| the same in thread CPU time (what load on the machine does not inflate) | {u['integrate_cpu_ms']:.1f} / "
        f"{u['integrate_cpu_max_ms']:.1f} | |",
        f"| move a keyframe to a corrected pose (applied on read) | {u['move_ms']:.1f} | |",
        f"| snapshot of the whole grid | {u['snapshot_ms']:.1f} | |",
        "",
        f"Kept per keyframe for corrections of any age: {u['kept_kb_per_keyframe']:.1f} kB.",
        "",
    ]
    if accuracy:
        lines += [
            "Occupancy on the demo's path (320x240, 8 s, config/demo.yaml, default grid parameters), against the "
            "scene's exact obstacles (`mapany_ros/scoring/occupancy.py`):",
            "",
            "| backend | seed | keyframes | occupied recall | occupied precision | free cells truly free | "
            "free coverage |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [f"| {a['backend']} | {a['seed']} | {a['keyframes']} | {a['occupied_recall'] * 100:.1f} % | "
                  f"{a['occupied_precision'] * 100:.1f} % | {a['free_precision'] * 100:.1f} % | "
                  f"{a['free_coverage'] * 100:.1f} % |" for a in accuracy]
        lines += ["", f"Targets: occupied recall >= {TARGETS['occupied_recall'] * 100:.0f} %, precision >= "
                  f"{TARGETS['occupied_precision'] * 100:.0f} % (both within one cell), free cells truly free >= "
                  f"{TARGETS['free_precision'] * 100:.0f} %; free coverage (seen floor called free) is not a target. "
                  "With odometry, placement scales each metric window by its few 15 cm steps against the odometry's, "
                  "weighed against the model's usual scale; what is left of the per-window scale error (the "
                  "model's and that measurement's, a few per cent) moves all of a window's surfaces by as much of "
                  "their range, and the grid's votes outweigh that only where other windows saw the same "
                  "surfaces.", ""]
    return lines


def bench_occupancy(accuracy: bool = True) -> list[str]:
    return markdown(bench_update(), bench_accuracy() if accuracy else [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-accuracy", action="store_true", help="time the update only")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON instead of markdown")
    a = ap.parse_args(argv)
    update = bench_update()
    accuracy = [] if a.skip_accuracy else bench_accuracy()
    print(json.dumps({"update": update, "accuracy": accuracy}, indent=2) if a.json else
          "\n".join(markdown(update, accuracy)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
