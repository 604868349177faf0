"""`mapany-ros demo --loops N`: what placement and loop closure do against drifting odometry.

Plane sweep computes depth from the odometry poses, so the main demo cannot show placement
correcting them. Here the backend is the model simulator (``mapany_ros.sim.model_simulator``):
the scene's true geometry with a real model's errors - a steady 3 % scale bias, windows whose
trajectory bends, pose and depth noise, bad views - and it is labelled SIMULATED everywhere. The
robot drives N loops with a poor wheel odometry (5 % scale, 5 deg/m heading drift), twice through
the same core pipeline, placement and fused map the node runs: once with loop closure disabled,
once with the defaults. It runs in this process, offline-like (every window and every loop
verification in turn, deterministic; no DDS, no node), so it takes seconds and gives the same
figures on every machine.

Writes ``demo_loops.png`` (top view of ground truth, odometry and both placed paths; the fused
map of both runs over the scene's true outline) and ``metrics.json`` (ATE, revisit error, loops
closed, map accuracy for the odometry and both runs), and prints them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from mapany_ros.core.placement import PlacementConfig
from mapany_ros.core.placement.loops import LoopConfig
from mapany_ros.scoring.plots import write_loop_figure
from mapany_ros.scoring.trajectory import ate, path_length, revisit_errors, revisit_summary
from mapany_ros.sim.drive import Run, drive
from mapany_ros.sim.model_simulator import ModelSimulator
from mapany_ros.sim.odometry import DriftingOdometry, OdometryErrors
from mapany_ros.sim.scene import SyntheticScene

LABEL = "SIMULATED BACKEND"
#: The model simulator's errors that do not average out (README, *Placement*).
SIMULATOR_ERRORS = {"scale_bias": 0.03, "drift_deg_per_view": 0.3, "drift_m_per_view": 0.005}
RUNS = ("without_loop_closure", "with_loop_closure")


def _drive(scene: SyntheticScene, loops: float, rate_hz: float, width: int, height: int, seed: int,
           loop_closure: bool) -> tuple[Run, DriftingOdometry, float]:
    odometry = DriftingOdometry(scene.base_pose, OdometryErrors.poor(seed=seed))
    sim = ModelSimulator(scene=scene, **SIMULATOR_ERRORS)
    placement = PlacementConfig(loops=LoopConfig(enabled=loop_closure))
    t0 = time.perf_counter()
    run = drive(scene, sim, loops=loops, rate_hz=rate_hz, width=width, height=height, odometry=odometry,
                placement=placement)
    return run, odometry, time.perf_counter() - t0


def _scores(estimate: list[np.ndarray], truth: list[np.ndarray], stamps: list[int]) -> dict[str, Any]:
    """ATE after an SE(3) fit, and after a Sim(3) fit with its scale (placement takes the odometry's
    scale, which loop closure cannot correct: the Sim(3) figure is what is left without it)."""
    sim3, scale = ate(estimate, truth, stamps, with_scale=True)
    return {"ate_m": ate(estimate, truth, stamps)[0], "ate_sim3_m": sim3, "sim3_scale": scale,
            "revisit": revisit_summary(revisit_errors(estimate, truth, stamps))}


def _map(run: Run) -> tuple[np.ndarray, dict[str, Any]]:
    """The fused map's points and their distance to the scene's true surfaces."""
    assert run.pipeline.map is not None
    xyz = run.pipeline.map.points()[0]
    d = run.scene.surface_distance(xyz) if len(xyz) else np.zeros(0)
    return xyz, {"points": int(len(xyz)),
                 "surface_error_median_m": float(np.median(d)) if d.size else float("nan"),
                 "surface_error_p90_m": float(np.percentile(d, 90)) if d.size else float("nan")}


def run_loop_demo(out: Path, *, loops: float = 3.0, seed: int = 0, rate_hz: float = 5.0, width: int = 128,
                  height: int = 96) -> dict[str, Any]:
    """Drive, score, write ``out/demo_loops.png`` and ``out/metrics.json``; returns the metrics."""
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    scene = SyntheticScene(seed)
    runs, report = {}, {}
    for name in RUNS:
        print(f"[demo --loops] driving {loops:g} loops, loop closure {'on' if name == RUNS[1] else 'off'} ...",
              flush=True)
        run, odometry, seconds = _drive(scene, loops, rate_hz, width, height, seed, name == RUNS[1])
        stamps, truth = run.stamps, run.truth()
        xyz, map_scores = _map(run)
        s = run.pipeline.stats
        report[name] = {**_scores([run.base_poses[t] for t in stamps], truth, stamps), "map": map_scores,
                        "keyframes": len(stamps), "loop_candidates": s.loop_candidates,
                        "loops_rejected": s.loops_rejected, "loops_closed": s.loops_closed, "seconds": seconds}
        runs[name] = (run, odometry, xyz)
    run, odometry, _ = runs[RUNS[1]]
    stamps, truth = run.stamps, run.truth()
    odo = [odometry.pose(t * 1e-9) for t in stamps]
    report = {
        "backend": f"{LABEL}: model simulator (true geometry with a real model's errors: "
                   + ", ".join(f"{k} {v}" for k, v in SIMULATOR_ERRORS.items()) + ")",
        "how": "core pipeline in process, offline-like (no DDS, no node)",
        "scene_seed": seed, "loops": loops, "image_size": [width, height], "rate_hz": rate_hz,
        "path_length_m": path_length(truth),
        "odometry": {"errors": "OdometryErrors.poor (5 % scale, 5 deg/m heading drift, noise)",
                     **_scores(odo, truth, stamps)},
        **report,
    }
    paths = {"ground truth": np.stack([T[:3, 3] for T in truth]), "odometry": np.stack([T[:3, 3] for T in odo])}
    for name in RUNS:
        r = runs[name][0]
        paths[name.replace("_", " ")] = np.stack([r.base_poses[t][:3, 3] for t in r.stamps])
    maps = {name.replace("_", " "): runs[name][2] for name in RUNS}
    write_loop_figure(out / "demo_loops.png", scene, paths, maps, report, LABEL)
    report["total_s"] = time.perf_counter() - t_start
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    return report


def print_loop_report(report: dict[str, Any], out: Path) -> None:
    print()
    print(f"[demo --loops] {report['backend']}")
    print(f"  {report['how']}; scene {report['scene_seed']}, {report['loops']:g} loops"
          f" ({report['path_length_m']:.1f} m), {report['image_size'][0]}x{report['image_size'][1]}")
    print(f"  {'':<24}{'ATE':>10}{'ATE Sim(3)':>12}{'revisit median':>16}{'revisit p90':>13}{'pairs':>7}"
          f"{'loops closed':>14}{'map to surface':>16}")
    for name, label in (("odometry", "odometry"), (RUNS[0], "placed, no loop closure"),
                        (RUNS[1], "placed, loop closure")):
        r = report[name]
        rv = r["revisit"]
        closed = f"{r['loops_closed']}" if "loops_closed" in r else "-"
        surface = f"{r['map']['surface_error_median_m'] * 100:.2f} cm" if "map" in r else "-"
        print(f"  {label:<24}{r['ate_m'] * 100:7.1f} cm{r['ate_sim3_m'] * 100:9.1f} cm"
              f"{rv['median_m'] * 100:13.1f} cm{rv['p90_m'] * 100:10.1f} cm{rv['pairs']:7d}{closed:>14}{surface:>16}")
    print("  (the placed path takes the odometry's scale (sim3 scale"
          f" {report[RUNS[1]]['sim3_scale']:.3f}); loop closure cannot change a scale, so ATE Sim(3) is the rest)")
    print(f"  ({LABEL}: these figures measure placement and loop closure against simulated model errors,"
          " not a real model)")
    print(f"  total {report['total_s']:.1f} s; wrote {out / 'demo_loops.png'}, {out / 'metrics.json'}")


def main(args: argparse.Namespace) -> int:
    """``mapany-ros demo --loops N`` (arguments parsed by :mod:`mapany_ros.commands.demo`)."""
    import torch

    torch.set_num_threads(args.threads)
    report = run_loop_demo(args.out, loops=args.loops, seed=args.seed, rate_hz=args.rate, width=args.width,
                           height=args.height)
    print_loop_report(report, args.out)
    return 0
