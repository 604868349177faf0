"""Placement and map accuracy against a real model's errors: the targets of the placement issues,
each run as the scenario behind it, for docs/benchmarks.md (``python -m mapany_ros.bench.accuracy``).

The backend is the model simulator (:mod:`mapany_ros.sim.model_simulator`), never planesweep: plane
sweep computes depth from the poses it is given, so it cannot show what placement does. Every
scenario is deterministic (fixed seeds); the suite asserts the same targets on the same scenarios,
this module prints the figures behind them.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mapany_ros.core.fusion.voxel_map import VoxelMap
from mapany_ros.core.geometry import invert
from mapany_ros.core.pipeline import PipelineConfig
from mapany_ros.scoring.trajectory import ate, path_length, revisit_errors, step_errors
from mapany_ros.sim.drive import Run, drive
from mapany_ros.sim.model_simulator import ModelSimulator
from mapany_ros.sim.odometry import DriftingOdometry, OdometryErrors
from mapany_ros.sim.scene import SyntheticScene

#: A model whose errors do not cancel: 3 % too large, bending 0.3 deg and 5 mm more with every view.
DRIFTING_MODEL = dict(metric=True, scale_bias=0.03, drift_deg_per_view=0.3, drift_m_per_view=0.005)


def node_defaults_without_odometry() -> dict:
    """The node's default parameters without odometry, as PipelineConfig keywords (nothing thinned)."""
    from mapany_ros.ros.params import PARAMETERS, validate

    cfg = validate({**{p.name: p.default for p in PARAMETERS}, "use_odometry": False}).pipeline
    return {**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(PipelineConfig) if f.name != "cameras"},
            "thin_keyframes": False}


def _trajectory(run: Run, odometry=None) -> dict:
    stamps, truth = run.stamps, run.truth()
    est = [run.base_poses[s] for s in stamps]
    out = {"keyframes": len(stamps), "path_m": path_length(truth), "ate_m": ate(est, truth, stamps)[0],
           "scale": ate(est, truth, stamps, with_scale=True)[1]}
    if odometry is not None:
        odo = [odometry.pose(s * 1e-9) for s in stamps]
        out["odometry_ate_m"] = ate(odo, truth, stamps)[0]
    return out


def _loops(run: Run, odometry=None) -> dict:
    stamps, truth = run.stamps, run.truth()
    est = [run.base_poses[s] for s in stamps]
    out = {**_trajectory(run, odometry), "revisit_m": float(np.median(revisit_errors(est, truth, stamps))),
           "loops_closed": run.pipeline.stats.loops_closed}
    if odometry is not None:
        odo = [odometry.pose(s * 1e-9) for s in stamps]
        out["odometry_revisit_m"] = float(np.median(revisit_errors(odo, truth, stamps)))
    return out


def no_odometry_defaults() -> dict:
    """9.6 m at 0.5 m/s, the node's defaults (keyframes from the rendered images), unbiased model."""
    scene = SyntheticScene(0)
    sim = ModelSimulator(scene=scene, metric=True, noise_seed=1)
    run = drive(scene, sim, loops=9.6 / scene.trajectory.loop_length_m, rate_hz=10.0, render=True,
                **node_defaults_without_odometry())
    stamps, truth = run.stamps, run.truth()
    steps = step_errors([run.base_poses[s] for s in stamps], truth, stamps)
    # Backend calls are matched to windows by their frames: loop verifications call the backend too.
    windows = {tuple(f.key for f in r.frames): r for r in run.results if r.frames}
    bad = [b for b in sim.log.bad_views if tuple(sim.log.calls[b.call]) in windows]
    rejected = [b for b in bad if b.index in windows[tuple(sim.log.calls[b.call])].placement.rejected_views]
    return {**_trajectory(run), "step_max_m": float(steps.max()), "bad_views": len(bad),
            "bad_views_rejected": len(rejected), "chain_breaks": run.pipeline.stats.chain_breaks}


def no_odometry_dense() -> dict:
    """Two loops without odometry, every frame a keyframe (dense windows): the chain over many
    windows, and the gross bad views (30 cm / 10 deg, about one window in ten) it must reject."""
    scene = SyntheticScene(0)
    sim = ModelSimulator(scene=scene, metric=True, noise_seed=1)
    run = drive(scene, sim, every_frame_keyframe=True)
    stamps, truth = run.stamps, run.truth()
    steps = step_errors([run.base_poses[s] for s in stamps], truth, stamps)
    windows = {tuple(f.key for f in r.frames): r for r in run.results if r.frames}
    bad = [b for b in sim.log.bad_views if tuple(sim.log.calls[b.call]) in windows]
    rejected = [b for b in bad if b.index in windows[tuple(sim.log.calls[b.call])].placement.rejected_views]
    return {**_trajectory(run), "step_rms_m": float(np.sqrt(np.mean(steps**2))), "step_max_m": float(steps.max()),
            "bad_views": len(bad), "bad_views_rejected": len(rejected),
            "views_rejected": run.pipeline.stats.views_rejected, "chain_breaks": run.pipeline.stats.chain_breaks}


def prior_leaning_model() -> dict:
    """Drifting odometry (5 %, 5 deg/m) fed to a model whose poses lean halfway towards it."""
    scene = SyntheticScene(0)
    odometry = DriftingOdometry(scene.base_pose, OdometryErrors.poor(seed=5))
    sim = ModelSimulator(scene=scene, metric=True, noise_seed=4, follow_priors=0.5)
    return _trajectory(drive(scene, sim, odometry=odometry, rate_hz=10.0, loops=1.0), odometry)


def good_odometry() -> dict:
    """Wheel odometry of 1 %, 0.5 deg/m against the default parameters (which assume far worse)."""
    scene = SyntheticScene(0)
    odometry = DriftingOdometry(scene.base_pose, OdometryErrors.good(seed=5))
    sim = ModelSimulator(scene=scene, metric=True, noise_seed=4)
    return _trajectory(drive(scene, sim, odometry=odometry, rate_hz=10.0, loops=1.0), odometry)


def wheel_slip() -> dict:
    """One 30 cm forward jump of drifting odometry at 10 s: the largest step error across it, and
    whether placement named it."""
    scene = SyntheticScene(0)
    odometry = DriftingOdometry(scene.base_pose, OdometryErrors.poor(seed=5, slips=((10.0, 0.3, 0.0),)))
    run = drive(scene, ModelSimulator(scene=scene, metric=True, noise_seed=4), odometry=odometry, rate_hz=10.0,
                loops=0.5)
    stamps, truth = run.stamps, run.truth()
    steps = step_errors([run.base_poses[s] for s in stamps], truth, stamps)
    t = np.array(stamps[1:]) * 1e-9
    named = any(a * 1e-9 < 10.0 <= b * 1e-9 + 0.05 and m > 0.2 for r in run.results for a, b, m in r.placement.slips)
    return {"step_max_across_m": float(steps[(t > 9.5) & (t < 11.0)].max()), "named": named,
            "slips_reported": run.pipeline.stats.odometry_slips}


def _map_quality(scene: SyntheticScene, points: np.ndarray) -> tuple[float, float]:
    d = scene.surface_distance(points)
    return float(np.median(d)), float(np.percentile(d, 90))


def camera_rig(errors: OdometryErrors, cameras: tuple[str, ...] = ("front", "left"), **model) -> dict:
    """Front and left camera (36 cm apart; or ``cameras``), stamped apart, two loops at 10 Hz with
    ``errors`` odometry: the fused map to the true surfaces, against the model's own depth fused at
    the true poses; the map's scale, and the odometry's scale as measured against the rig's
    baseline. ``model``: more errors of the model simulator (e.g. ``follow_priors``)."""
    scene = SyntheticScene(0)
    rig = scene.rig(*cameras)
    odometry = DriftingOdometry(scene.base_pose, errors)
    run = drive(scene, ModelSimulator(scene=scene, metric=True, noise_seed=4, **model), odometry=odometry,
                cameras=rig, rate_hz=10.0)
    model = VoxelMap(run.pipeline.map.config)
    for r in run.results:
        for f, v, out, ok in zip(r.frames, r.prediction.views, r.output_mask, r.placement.accepted, strict=True):
            if out and ok:
                T = scene.base_pose(f.stamp_ns * 1e-9) @ rig[f.camera].T_base_camera
                model.integrate(f.key, v.depth / r.placement.scale, v.grid_camera, T, v.colors, v.confidence,
                                v.valid)
    stamps, truth = run.stamps, run.truth()
    status = run.pipeline.status()
    return {"map": _map_quality(scene, run.pipeline.map.points()[0]),
            "model_depth": _map_quality(scene, model.points()[0]),
            "map_scale": 1.0 / ate([run.base_poses[s] for s in stamps], truth, stamps, with_scale=True)[1],
            "odometry_scale": (status["odometry_scale"], status["odometry_scale_sigma"], 1.0 + errors.scale_error),
            "model_vs_odometry": (status["model_scale_vs_odometry"], status["model_scale_sigma"])}


def medium_bad_views() -> dict:
    """12 cm / 4 deg views in one window in ten, flying pixels at 30 % of depth-edge pixels, confidence
    that only roughly follows the error; default parameters, no odometry."""
    scene = SyntheticScene(0)
    sim = ModelSimulator(scene=scene, metric=True, noise_seed=1, medium_bad_view_rate=0.1, flying_pixel_rate=0.3,
                         confidence_follows_error=True)
    run = drive(scene, sim, loops=1.0)
    stamps, truth = run.stamps, run.truth()
    est = [run.base_poses[s] for s in stamps]
    windows = {tuple(f.key for f in r.frames): r for r in run.results if r.frames}
    T_cam_base = invert(scene.T_base_camera)
    fine = 0
    for b in sim.log.medium_bad_views:
        r = windows.get(tuple(sim.log.calls[b.call]))
        if r is None or b.index in r.placement.rejected_views or not r.placement.accepted[b.index]:
            fine += 1
            continue
        stamp = r.frames[b.index].stamp_ns
        if stamp in stamps:
            i = stamps.index(stamp)
            placed = truth[i] @ invert(est[i]) @ r.prediction.views[b.index].T_world_camera @ T_cam_base
            fine += np.linalg.norm(placed[:3, 3] - truth[i][:3, 3]) <= 0.03
    return {**_trajectory(run), "bad_views": len(sim.log.medium_bad_views), "fine": fine,
            "chain_breaks": run.pipeline.stats.chain_breaks}


def loops_without_odometry() -> dict:
    scene = SyntheticScene(3)
    return _loops(drive(scene, ModelSimulator(scene=scene, noise_seed=4, **DRIFTING_MODEL), loops=3.0))


def loops_with_drifting_odometry() -> dict:
    scene = SyntheticScene(3)
    odometry = DriftingOdometry(scene.base_pose, OdometryErrors.poor(seed=5))
    run = drive(scene, ModelSimulator(scene=scene, noise_seed=4, **DRIFTING_MODEL), odometry=odometry, rate_hz=10.0,
                loops=2.0)
    return _loops(run, odometry)


class _StartsAtIdentity:
    """Odometry whose frame is where the robot starts (as a real robot's, unknown to the map)."""

    def __init__(self, odometry: DriftingOdometry, t0_s: float) -> None:
        self.odometry, self.T0 = odometry, invert(odometry.pose(t0_s))

    def pose(self, t_s: float) -> np.ndarray:
        return self.T0 @ self.odometry.pose(t_s)


def restart_in_saved_map(with_odometry: bool) -> dict:
    """Map 1.2 loops, save, restart 12 s further on with ``map.load_path``: windows until localised,
    and the median error of where the second run puts places the first run mapped (its keyframes
    against the first run's estimate of the nearest true place: the offset must be the true one)."""
    scene = SyntheticScene(3)
    rate = 10.0 if with_odometry else 5.0
    odo_a = DriftingOdometry(scene.base_pose, OdometryErrors.poor(seed=5)) if with_odometry else None
    first = drive(scene, ModelSimulator(scene=scene, noise_seed=4, **DRIFTING_MODEL), odometry=odo_a, rate_hz=rate,
                  loops=1.2, render=True)
    start = 12.0
    odo_b = _StartsAtIdentity(DriftingOdometry(scene.base_pose, OdometryErrors.poor(seed=7), t0_s=start), start) \
        if with_odometry else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "map"
        first.pipeline.save_map(folder)
        saved = sorted(p.name for p in folder.iterdir())
        second = drive(scene, ModelSimulator(scene=scene, noise_seed=9, **DRIFTING_MODEL), odometry=odo_b,
                       rate_hz=rate, loops=0.5, start_s=start, map_folder=str(folder), render=True)
    a_stamps = np.array(first.stamps)
    a_true = np.stack([scene.base_pose(s * 1e-9)[:3, 3] for s in a_stamps])
    errors = []
    for s in second.stamps:
        true = scene.base_pose(s * 1e-9)[:3, 3]
        d = np.linalg.norm(a_true - true, axis=1)
        if d.min() <= 0.3:
            k = int(np.argmin(d))
            errors.append(np.linalg.norm((second.base_poses[s][:3, 3] - first.base_poses[a_stamps[k]][:3, 3])
                                         - (true - a_true[k])))
    placer = second.pipeline.placer
    return {"localised": placer.localised, "windows_unlocalised": placer.stats.windows_unlocalised,
            "median_m": float(np.median(errors)) if errors else float("nan"), "places": len(errors), "saved": saved}


def bench_accuracy(progress: Callable[[str], None] | None = None) -> dict:
    """Every scenario's figures (one torch thread: the figures do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    scenarios = {
        "no_odometry_defaults": no_odometry_defaults, "no_odometry_dense": no_odometry_dense,
        "prior_leaning": prior_leaning_model,
        "good_odometry": good_odometry, "slip": wheel_slip,
        "two_cameras_poor": lambda: camera_rig(OdometryErrors.poor(seed=5)),
        "two_cameras_good": lambda: camera_rig(OdometryErrors.good(seed=5)),
        "two_cameras_leaning": lambda: camera_rig(OdometryErrors.poor(seed=5), follow_priors=0.5),
        "three_cameras_poor": lambda: camera_rig(OdometryErrors.poor(seed=5), ("front", "left", "right")),
        "medium_bad_views": medium_bad_views, "loops_no_odometry": loops_without_odometry,
        "loops_odometry": loops_with_drifting_odometry,
        "restart_odometry": lambda: restart_in_saved_map(True),
        "restart_no_odometry": lambda: restart_in_saved_map(False),
    }
    out = {}
    try:
        for name, run in scenarios.items():
            out[name] = run()
            if progress is not None:
                progress(f"accuracy: {name} done")
    finally:
        torch.set_num_threads(threads)
    return out


def _pct(a: float, b: float) -> str:
    return f"{a / b * 100:.0f} %"


def accuracy_lines(r: dict) -> list[str]:
    """Markdown: one row per target."""
    a, d, p = r["no_odometry_defaults"], r["no_odometry_dense"], r["prior_leaning"]
    g, s = r["good_odometry"], r["slip"]
    m, ln, lo = r["medium_bad_views"], r["loops_no_odometry"], r["loops_odometry"]

    def cams(c: dict, label: str, rig: str = "2 cameras (front + left, 36 cm apart)") -> str:
        (mm, m90), (dm, d90) = c["map"], c["model_depth"]
        odo, odo_sigma, odo_true = c["odometry_scale"]
        return (f"| {rig}, {label}, 2 loops | fused map median / p90: "
                f"{mm * 100:.2f} / {m90 * 100:.2f} cm; the model's own depth at the true poses {dm * 100:.2f} / "
                f"{d90 * 100:.2f} cm: **{mm / dm:.2f}x / {m90 / d90:.2f}x**. Map scale {c['map_scale']:.4f}; the "
                f"odometry's scale measured against the rig's baseline {odo:.3f} +- {odo_sigma:.3f} (truly "
                f"{odo_true:.2f}) | within 1.25x |")

    lines = [
        "## Placement and the map against a real model's errors",
        "",
        "`python -m mapany_ros.bench.accuracy`: the scenarios behind the placement targets, with the model",
        "simulator as the backend (2 cm / 0.5 deg pose noise per view, 3 % scale error per window, 1 %",
        "depth noise, bad views; other errors as named), 128x96, scored with evo against ground truth.",
        "\"poor\" odometry: 5 % scale error, 5 deg/m heading drift; \"good\": 1 %, 0.5 deg/m.",
        "",
        "| scenario | measured | target |",
        "|---|---|---|",
        f"| no odometry, the node's default parameters (keyframes from the images), {a['path_m']:.1f} m | "
        f"{a['keyframes']} keyframes, ATE {a['ate_m'] * 100:.1f} cm ({a['ate_m'] / a['path_m'] * 100:.2f} % of the "
        f"path), scale {a['scale']:.4f}, worst keyframe step {a['step_max_m'] * 100:.1f} cm; "
        + (f"gross bad views (30 cm / 10 deg) rejected: {a['bad_views_rejected']} of {a['bad_views']}; "
           if a["bad_views"] else "no gross bad view came up; ")
        + f"{a['chain_breaks']} chain breaks | <= 1 %, within 2 %, <= 8 cm |",
        f"| no odometry, every frame a keyframe, 2 loops, {d['path_m']:.1f} m | {d['keyframes']} keyframes, ATE "
        f"{d['ate_m'] * 100:.1f} cm ({d['ate_m'] / d['path_m'] * 100:.2f} %), scale {d['scale']:.4f}, keyframe step "
        f"error RMS / max {d['step_rms_m'] * 100:.1f} / {d['step_max_m'] * 100:.1f} cm; gross bad views rejected "
        f"{d['bad_views_rejected']} of {d['bad_views']} ({d['views_rejected']} views rejected in all); "
        f"{d['chain_breaks']} chain breaks | <= 1 %, all, none |",
        f"| poor odometry fed to a model whose poses lean halfway towards it, 1 loop | path ATE {p['ate_m']:.3f} m "
        f"against the odometry's {p['odometry_ate_m']:.3f} m ({_pct(p['ate_m'], p['odometry_ate_m'])}) | <= 30 % |",
        f"| good odometry, 1 loop | path ATE {g['ate_m']:.3f} m against the odometry's {g['odometry_ate_m']:.3f} m "
        f"| <= the odometry's |",
        f"| one 30 cm slip of poor odometry | largest step error across it {s['step_max_across_m'] * 100:.1f} cm; "
        f"slip named on /diagnostics: {'yes' if s['named'] else 'no'} | back within 5 cm, or named |",
        cams(r["two_cameras_poor"], "poor odometry"),
        cams(r["two_cameras_good"], "good odometry"),
        cams(r["two_cameras_leaning"], "poor odometry fed to a model whose poses lean halfway towards it"),
        cams(r["three_cameras_poor"], "poor odometry", "3 cameras (front, left, right)"),
        f"| medium bad views (12 cm / 4 deg), flying pixels, rough confidence, no odometry, 1 loop | "
        f"{m['fine']} of {m['bad_views']} bad views rejected or within 3 cm; {m['chain_breaks']} chain breaks; ATE "
        f"{m['ate_m'] * 100:.1f} cm ({m['ate_m'] / m['path_m'] * 100:.2f} % of the path) | >= 90 %, none, <= 1 % |",
        f"| no odometry, a drifting model (3 % scale bias, 0.3 deg + 5 mm more per view), 3 loops, "
        f"{ln['path_m']:.1f} m | ATE {ln['ate_m'] * 100:.1f} cm ({ln['ate_m'] / ln['path_m'] * 100:.2f} %), revisit "
        f"median {ln['revisit_m'] * 100:.1f} cm, {ln['loops_closed']} loops closed | <= 1 %, <= 5 cm |",
        f"| poor odometry, the same model, 2 loops, {lo['path_m']:.1f} m | ATE {lo['ate_m']:.3f} m against the "
        f"odometry's {lo['odometry_ate_m']:.3f} m ({_pct(lo['ate_m'], lo['odometry_ate_m'])}); revisit median "
        f"{lo['revisit_m'] * 100:.1f} cm (odometry {lo['odometry_revisit_m'] * 100:.0f} cm); {lo['loops_closed']} "
        f"loops closed | <= 25 %, <= 5 cm |",
    ]
    for key, label in (("restart_odometry", "with poor odometry"), ("restart_no_odometry", "without odometry")):
        x = r[key]
        lines.append(f"| restart in a saved map, 12 s further on, {label} | localised: "
                     f"{'yes' if x['localised'] else 'no'}, after {x['windows_unlocalised']} windows; median "
                     f"{x['median_m'] * 100:.1f} cm from where the saved map put {x['places']} places | within 3 "
                     f"windows, <= 5 cm |")
    return lines + [""]


if __name__ == "__main__":
    print("\n".join(accuracy_lines(bench_accuracy(progress=print))))
