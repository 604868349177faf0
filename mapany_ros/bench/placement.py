"""Placement for `make bench`: its cost, against the backend's and at 2000 keyframes (its accuracy:
:mod:`mapany_ros.bench.accuracy`).

1. Time per window (8 views, 518x392) of the placement stage, with odometry (view checks,
   refinement, pose graph) and without (view checks, refinement, overlap chain), as a fraction of
   the plane-sweep backend's time on the same windows and machine (target <= 5 %).
2. The whole per-window cost of ``WindowPlacer.place`` - view checks, refinement, local check,
   graph commit, views into the map, reporting, anchors, loop memory and loop candidate search -
   once the map holds 2000 keyframes, stage by stage, with torch on one thread and on its default;
   and the cost of one loop verification job (run while the backend is idle, not per window).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from mapany_ros.core.backends.planesweep import PlaneSweepBackend
from mapany_ros.core.frames import CameraModel, Frame
from mapany_ros.core.placement import PlacementConfig, WindowPlacer
from mapany_ros.core.placement.loops import LoopCandidate
from mapany_ros.sim.model_simulator import ModelSimulator
from mapany_ros.sim.odometry import DriftingOdometry, OdometryErrors
from mapany_ros.sim.scene import SyntheticScene, make_camera_model, make_sequence


def _windows(width: int, height: int, views: int, overlap: int) -> tuple[list[list[list[Frame]]], SyntheticScene]:
    """Two consecutive windows of a synthetic drive (the second starts with the first's last frames)."""
    scene = SyntheticScene(0)
    n = 2 * views - overlap
    seq = make_sequence(scene=scene, width=width, height=height, n_frames=n, rate_hz=5.0, start_s=4.0)
    frames = [f for f in seq.to_frames(camera="camera")]
    groups = [[f] for f in frames]
    return [groups[:views], groups[views - overlap:]], scene


def bench_cost(width: int = 518, height: int = 392, views: int = 8, overlap: int = 2, repeats: int = 5) -> dict:
    """Median placement time per window with and without odometry, and the backend's time.

    After one warm-up pass of each, backend and placement runs alternate, so that a change in the
    machine's load between them does not tilt the ratio.
    """
    windows, scene = _windows(width, height, views, overlap)
    backend = PlaneSweepBackend(device=torch.device("cpu"), num_planes=48, min_depth_m=0.4, max_depth_m=12.0,
                                downscale=2)
    window_frames = [[g[0] for g in groups] for groups in windows]
    preds = [backend.infer(frames) for frames in window_frames]  # also the warm-up

    def place_second(mode: str) -> float:
        placer = WindowPlacer(PlacementConfig(use_odometry=mode == "odometry"), lambda c: scene.T_base_camera)
        placer.place(windows[0], 0, preds[0])
        t0 = time.perf_counter()
        placer.place(windows[1], overlap, preds[1])
        return time.perf_counter() - t0

    modes = ("odometry", "overlap")
    for mode in modes:
        place_second(mode)  # warm-up: torch's kernels, GTSAM
    times: dict[str, list[float]] = {"backend": [], **{m: [] for m in modes}}
    for rep in range(repeats):
        frames = window_frames[rep % 2]
        t0 = time.perf_counter()
        backend.infer(frames)
        times["backend"].append(time.perf_counter() - t0)
        for mode in modes:
            times[mode].append(place_second(mode))
    out = {"views": views, "resolution": f"{width}x{height}", "backend_s": statistics.median(times["backend"])}
    for mode in modes:
        out[f"{mode}_s"] = statistics.median(times[mode])
        out[f"{mode}_fraction"] = out[f"{mode}_s"] / out["backend_s"]
    return out


#: Stages of one window in ``WindowPlacer.clock``, in the order they run.
WINDOW_STAGES = ("view checks", "refinement", "local check", "graph commit", "views out", "report", "anchors",
                 "loop memory", "loop search")
#: Stages of one loop job in ``WindowPlacer.loop_clock``.
LOOP_STAGES = ("job frames", "verification", "loop in graph")
#: Keyframes per loop of the scene's trajectory: about 15 cm apart (the node's default keyframe
#: distance), and every loop passes the same places, so candidates by position and by appearance
#: come up as on a robot that revisits its map.
KEYFRAMES_PER_LOOP = 95


class _LongDrive:
    """A placer that already holds many keyframes, and the synthetic robot that goes on driving it.

    Windows of 8 keyframes (2 of them placed context), as the pipeline cuts them, predicted by the
    model simulator with its default errors. ``frame(k, camera)`` is keyframe k's frame; images of
    small cameras are rendered once per place on the loop.
    """

    def __init__(self, odometry: bool, seed: int = 1, device: str | torch.device = "cpu") -> None:
        self.scene = scene = SyntheticScene(0)
        self.sim = ModelSimulator(scene=scene, metric=True, noise_seed=seed, device=device)
        self.odometry = DriftingOdometry(scene.base_pose, OdometryErrors.good(seed=3)) if odometry else None
        self.dt = scene.trajectory.loop_length_m / scene.trajectory.speed_mps / KEYFRAMES_PER_LOOP
        self.placer = WindowPlacer(PlacementConfig(use_odometry=odometry), lambda c: scene.T_base_camera)
        self.next = 0
        self._images: dict[tuple[int, int], np.ndarray] = {}

    def frame(self, k: int, camera: CameraModel) -> Frame:
        t = 1.0 + k * self.dt
        key = (k % KEYFRAMES_PER_LOOP, camera.width)
        image = self._images.get(key)
        if image is None:
            image = np.ascontiguousarray(self.scene.render(self.scene.camera_pose(t), camera)[0])
            if camera.width <= 160:
                self._images[key] = image
        extra = {}
        if self.odometry is not None:
            T = self.odometry.pose(t)
            extra = dict(T_world_base=T, T_world_camera=T @ self.scene.T_base_camera)
        return Frame(image, int(round(t * 1e9)), "camera", "camera_optical_frame", camera,
                     T_base_camera=self.scene.T_base_camera, **extra)

    def window(self, camera: CameraModel, size: int = 8, overlap: int = 2):
        """The next window (groups, context count, prediction), as the pipeline would send it."""
        context = self.placer.context(overlap)
        new = [[self.frame(self.next + i, camera)] for i in range(size - len(context))]
        self.next += len(new)
        groups = context + new
        frames = [g[0] for g in groups]
        return groups, len(context), self.sim.infer(frames).with_cameras(frames)

    def drive_to(self, keyframes: int, camera: CameraModel) -> None:
        while len(self.placer.index) < keyframes:
            groups, n_context, prediction = self.window(camera)
            self.placer.place(groups, n_context, prediction)
            self.placer.loops.idle_work()  # as the pipeline does between windows (no loop is verified)


def _median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r.get(key, 0.0) for r in rows)


def reference_ms(repeats: int = 15) -> float:
    """Median ms of a fixed mix of the operations placement runs (full-grid elementwise passes, a
    gather of 50 K samples, small batched products), on one thread: how fast this shared machine is
    at the moment. Windows timed during a slow spell are slow by about as much; their ratio to this
    compares runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(3, 8, 98, 129, generator=g)
        idx = torch.randint(0, x[0].numel(), (56 * 900,), generator=g)
        J = torch.rand(56, 7, 900, generator=g)
        times = []
        for k in range(repeats + 1):  # the first, untimed, warms the allocator
            t0 = time.perf_counter()
            for _ in range(10):
                y = torch.where(x[2] > 0.5, x * 2.0, x + 1.0)
                y.view(3, -1).index_select(1, idx)
                torch.bmm(J, J.transpose(1, 2))
            if k:
                times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3
    finally:
        torch.set_num_threads(threads)


def bench_window_cost(keyframes: int = 2000, width: int = 518, height: int = 392, repeats: int = 5,
                      build_camera: tuple[int, int] = (64, 48), progress: Callable[[str], None] | None = None,
                      threads: tuple[int, ...] | None = None, device: str | torch.device = "cpu",
                      loop_job: bool = True) -> dict:
    """Per-window cost of ``WindowPlacer.place`` once the map holds ``keyframes`` keyframes.

    The map is built by driving the synthetic robot through a placer at ``build_camera`` size (the
    graph, the keyframe index and the loop memory then hold what a real run's would); then windows
    at ``width`` x ``height`` (full-resolution output, as MapAnything gives) are placed one after
    the other, torch on one thread and on its default alternating, after one warm-up window.
    Medians of ``repeats`` windows each, wall and CPU seconds, per stage. The model simulator
    predicts on ``device``, so placement runs there as behind a model on that device (a CUDA window
    is timed to its last kernel). Then, with ``loop_job``, one loop job: four views of neighbouring
    keyframes, verified, and a second one that confirms it, so the loop enters the graph and every
    keyframe is read back (the backend's time not counted).
    """
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    default_threads = torch.get_num_threads()
    threads = sorted(set(threads or (1, default_threads)))
    small, big = make_camera_model(*build_camera), make_camera_model(width, height)
    out: dict = {"keyframes": keyframes, "resolution": f"{width}x{height}", "device": str(device),
                 "threads": threads, "repeats": repeats,
                 "load_before": os.getloadavg()[0]}
    for mode in ("odometry", "overlap"):
        drive = _LongDrive(odometry=mode == "odometry", device=device)
        t0 = time.perf_counter()
        torch.set_num_threads(1)
        try:
            drive.drive_to(keyframes, small)
        finally:
            torch.set_num_threads(default_threads)
        built_s = time.perf_counter() - t0
        placer = drive.placer
        reference = reference_ms()
        rows: dict[int, list[dict[str, float]]] = {n: [] for n in threads}
        statuses = []
        try:
            for w in range(1 + repeats * len(threads)):
                n = threads[w % len(threads)]
                torch.set_num_threads(n)
                groups, n_context, prediction = drive.window(big)
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                placed = placer.place(groups, n_context, prediction)
                sync()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                # What the pipeline then runs while the backend is idle (loop jobs aside).
                t1, c1 = time.perf_counter(), time.process_time()
                placer.loops.idle_work()
                idle_wall, idle_cpu = time.perf_counter() - t1, time.process_time() - c1
                statuses.append(placed.status.name)
                if w == 0:
                    continue  # warm-up: this resolution's first window
                row = {"wall": wall, "cpu": cpu, "wall idle": idle_wall, "cpu idle": idle_cpu}
                row.update({f"wall {k}": v for k, v in placer.clock.wall.items()})
                row.update({f"cpu {k}": v for k, v in placer.clock.cpu.items()})
                rows[n].append(row)
        finally:
            torch.set_num_threads(default_threads)
        result = {"built_s": built_s, "reference_ms": (reference + reference_ms()) / 2,
                  "graph_keyframes": len(placer.graph.keyframes),
                  "memory_keyframes": len(placer.loops.memory), "statuses": statuses}
        for n, r in rows.items():
            result[n] = {key: _median(r, key) for key in sorted({k for row in r for k in row})}
        if mode == "odometry" and loop_job:
            result["loop"] = _loop_job_cost(drive)
        out[mode] = result
        if progress is not None:
            progress(f"placement at {keyframes} keyframes, {mode}: built in {built_s:.0f} s")
    out["load_after"] = os.getloadavg()[0]
    return out


#: What each stage of ``WindowPlacer.clock`` holds, for the bench's text.
STAGE_NOTES = {
    "view checks": "plausible depth, views stacked (coarse grids, normals), agreement, path outliers",
    "refinement": "point-to-plane Gauss-Newton of every view's pose (5 steps at most)",
    "local check": "depth against the map's; the window's local graph problem or the overlap fit",
    "graph commit": "iSAM2 update with the window's factors, its keyframes read back",
    "views out": "depth scaled, map poses set; full-resolution points move into the map when read (published)",
    "report": "the newest 48 keyframes read back, corrections of those that moved",
    "anchors": "sparse points of the new views for the next windows",
    "loop memory": "per new keyframe: small depth, a reference to its image",
    "loop search": "keyframes that search: position uncertainty, the poses of the moment",
}


def window_cost_lines(cost: dict) -> list[str]:
    """Markdown: the per-window cost at many keyframes, stage by stage, and the loop job's."""
    threads = cost["threads"]
    many = threads[-1]
    head = "| stage | " + " | ".join(f"{m}, {n} thread{'s' if n > 1 else ''}" for m in ("odometry", "no odometry")
                                      for n in threads) + " | target |"
    lines = [
        f"## Placement per window at {cost['keyframes']} keyframes ({cost['resolution']} output, 8 views, CPU)",
        "",
        f"All of `WindowPlacer.place` for windows of 8 views with full {cost['resolution']} output (as MapAnything",
        "gives; errors of the model simulator), once the synthetic robot has driven the placer round its loop to",
        f"{cost['keyframes']} keyframes (64x48 windows, 95 keyframes per loop: the graph, the keyframe index and",
        "the loop memory hold what a long run's would, and candidates by position and appearance come up).",
        f"Medians of {cost['repeats']} consecutive windows per setting after a warm-up window, torch threads",
        "alternating window by window; per stage (`WindowPlacer.clock`) wall / CPU ms, CPU over all threads.",
        f"Load average {cost['load_before']:.1f} before and {cost['load_after']:.1f} after on this 2-core machine:",
        "CPU time is what the work costs, wall time adds the waits for a core. This shared machine has slow",
        "spells of minutes; the last row divides the window by a fixed workload of placement's own operations",
        "timed around the same windows, and compares runs.",
        "",
        head,
        "|---" * (2 + 2 * len(threads)) + "|",
    ]

    def cell(row: dict, key: str) -> str:
        wall, cpu = (f"wall {key}", f"cpu {key}") if key else ("wall", "cpu")
        return f"{row.get(wall, 0.0) * 1e3:.1f} / {row.get(cpu, 0.0) * 1e3:.1f}"

    rows = [cost[m][n] for m in ("odometry", "overlap") for n in threads]
    for stage in WINDOW_STAGES:
        lines.append(f"| {stage}: {STAGE_NOTES[stage]} | " + " | ".join(cell(r, stage) for r in rows) + " | |")
    lines.append("| **the window** (placement, graph update, loop detection) | "
                 + " | ".join(f"**{cell(r, '')}**" for r in rows) + " | <= 15 ms |")
    lines.append("| then, backend idle: loop searches, descriptors, JPEGs of the window's keyframes | "
                 + " | ".join(cell(r, "idle") for r in rows) + " | |")
    refs = [cost[m]["reference_ms"] for m in ("odometry", "overlap") for _ in threads]
    lines.append("| the window (wall) over the reference workload (`reference_ms`, timed before and after) | "
                 + " | ".join(f"{r['wall'] * 1e3 / ref:.2f} ({ref:.1f} ms)" for r, ref in zip(rows, refs, strict=True))
                 + " | |")
    loop = cost["odometry"]["loop"]
    job = loop["jobs"][-1]
    lines += [
        "",
        f"A loop job (with odometry, one thread), run while the backend is idle, not per window: {loop['views']}",
        f"views of {loop['size']} from the loop memory (JPEGs decoded), verified on the backend's answer (the",
        "backend's own time not counted); the job that closes the loop also adds it to the graph and reads all",
        f"{cost['odometry']['graph_keyframes']} keyframes back (jobs before it: verification only).",
        "",
        "| loop job stage | wall / CPU ms |",
        "|---|---|",
    ]
    for stage in LOOP_STAGES:
        lines.append(f"| {stage} | {cell(job, stage)} |")
    lines += [f"| **the job** | **{cell(job, '')}** |", ""]
    if many > 1:
        lines += [f"With {many} torch threads on a loaded machine the threads wait for each other (CPU time grows",
                  "with wall time): one thread is the setting to compare.", ""]
    return lines


def _loop_job_cost(drive: _LongDrive, max_jobs: int = 6) -> dict:
    """Cost of loop jobs on the newest keyframes (four full-size views each, one thread), until one
    closes a loop: a verified loop waits for a second that confirms it, which then enters the graph."""
    placer = drive.placer
    newest = placer.index.newest.kid
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for n in range(max_jobs):
            old, new = newest - 4 - n % 2 - 2 * (n // 2), newest - 1 - n % 2 - 2 * (n // 2)
            placer.loops.submit(LoopCandidate(old, new, "position", 0.0))
            t0, c0 = time.perf_counter(), time.process_time()
            job = placer.loop_job()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            assert job is not None
            prediction = drive.sim.infer(job.frames).with_cameras(job.frames)  # the backend: not counted
            t0, c0 = time.perf_counter(), time.process_time()
            result = placer.close_loop(job, prediction)
            wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
            row = {"wall": wall, "cpu": cpu, "closed": result is not None}
            row.update({f"wall {k}": v for k, v in placer.loop_clock.wall.items()})
            row.update({f"cpu {k}": v for k, v in placer.loop_clock.cpu.items()})
            rows.append(row)
            if result is not None:
                break
    finally:
        torch.set_num_threads(threads)
    return {"jobs": rows, "closed": any(r["closed"] for r in rows), "views": len(job.frames),
            "size": f"{job.frames[0].width}x{job.frames[0].height}"}


def bench_placement() -> list[str]:
    """Markdown lines for docs/benchmarks.md."""
    window_cost = bench_window_cost()
    cost = bench_cost()
    lines = [
        f"## Placement per window ({cost['views']} views, {cost['resolution']}, CPU)",
        "",
        "The core's placement stage (view checks, pose refinement, then the pose graph or the overlap chain) on",
        "two consecutive plane-sweep windows of the synthetic drive, against the plane sweep itself (48 planes,",
        "half resolution); medians of 5 runs of each, alternating, after a warm-up. With plane sweep the node",
        "skips refinement and window links (its poses are its priors): this is the cost a real model pays.",
        "",
        "| step | ms | / backend | target |",
        "|---|---|---|---|",
        f"| planesweep infer (backend) | {cost['backend_s'] * 1e3:.0f} | | |",
        f"| placement with odometry (GTSAM pose graph) | {cost['odometry_s'] * 1e3:.1f} | "
        f"{cost['odometry_fraction'] * 100:.2f} % | <= 5 % |",
        f"| placement without odometry (overlap chain) | {cost['overlap_s'] * 1e3:.1f} | "
        f"{cost['overlap_fraction'] * 100:.2f} % | <= 5 % |",
        "",
    ]
    return lines + window_cost_lines(window_cost)


if __name__ == "__main__":
    print("\n".join(bench_placement()))
