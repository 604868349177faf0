"""Figures of `mapany-ros eval` (the trajectories from above and the depth error of every frame) and of
`mapany-ros demo --loops` (paths and fused maps from above, with and without loop closure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def write_eval_figure(path: Path, report: dict[str, Any], plot: dict[str, np.ndarray]) -> None:
    """Top view of the trajectories and the AbsRel of every depth frame."""
    fig = Figure(figsize=(12, 5), layout="constrained")
    ax_traj, ax_depth = fig.subplots(1, 2)
    styles = {"truth": ("ground truth", "k", "-"), "estimate": ("estimate (SE(3)-aligned)", "tab:blue", "-"),
              "odometry": ("odometry (SE(3)-aligned)", "tab:orange", "--")}
    for key, xyz in plot.items():
        label, color, line = styles[key]
        ax_traj.plot(xyz[:, 0], xyz[:, 1], line, color=color, label=label, marker=".", markersize=3)
    ax_traj.set(title="trajectory, top view", xlabel="x (m)", ylabel="y (m)")
    ax_traj.set_aspect("equal", adjustable="datalim")
    ax_traj.legend(loc="best")
    frames = report["depth"]["per_frame"]
    abs_rel = np.array([100.0 * f["abs_rel"] for f in frames])
    if frames:
        t = (np.array([f["stamp_ns"] for f in frames]) - frames[0]["stamp_ns"]) * 1e-9
        ax_depth.plot(t, abs_rel, "o-", color="tab:blue")
    ax_depth.set(title=f"depth AbsRel per frame ({report['depth']['frames']} frames)",
                 xlabel="time since first depth frame (s)", ylabel="AbsRel (%)")
    top = np.nanmax(abs_rel, initial=0.0)
    ax_depth.set_ylim(0.0, 1.15 * top if top > 0 else 1.0)
    ax_depth.grid(True, alpha=0.3)
    fig.savefig(path, dpi=100)


def _scene_outline(ax, scene) -> None:
    """The room's walls and every object's footprint, as thin lines (the map's true place)."""
    r = scene.room
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1], [-1, -1]]) * [r.half_x, r.half_y]
    ax.plot(corners[:, 0], corners[:, 1], color="0.35", lw=0.8)
    for box in scene.boxes:
        c = box.corners()[[0, 1, 3, 2, 0], :2]  # the four bottom corners, in order round the footprint
        ax.plot(c[:, 0], c[:, 1], color="0.35", lw=0.8)
    for cyl in scene.cylinders:
        a = np.linspace(0.0, 2.0 * np.pi, 48)
        ax.plot(cyl.center_xy[0] + cyl.radius * np.cos(a), cyl.center_xy[1] + cyl.radius * np.sin(a),
                color="0.35", lw=0.8)


def write_loop_figure(path: Path, scene, paths: dict[str, np.ndarray], maps: dict[str, np.ndarray],
                      report: dict[str, Any], label: str) -> None:
    """Top views: the paths (ground truth, odometry, placed without and with loop closure), then the
    fused map of each run (points 30 cm off the floor and ceiling, coloured by height) over the scene's
    true outline, so a doubled wall shows. ``label`` (SIMULATED BACKEND) heads the figure."""
    fig = Figure(figsize=(18, 6.2), layout="constrained")
    ax_path, *ax_maps = fig.subplots(1, 1 + len(maps))
    styles = {"ground truth": ("k", "-", 1.5), "odometry": ("tab:orange", "--", 1.0),
              "without loop closure": ("tab:red", "-", 1.0), "with loop closure": ("tab:blue", "-", 1.2)}
    _scene_outline(ax_path, scene)
    for name, xyz in paths.items():
        color, line, width = styles[name]
        key = {"ground truth": None, "odometry": "odometry"}.get(name, name.replace(" ", "_"))
        text = name if key is None else (f"{name if key == 'odometry' else 'placed, ' + name}: ATE "
                                         f"{report[key]['ate_m'] * 100:.1f} cm, revisit "
                                         f"{report[key]['revisit']['median_m'] * 100:.1f} cm")
        ax_path.plot(xyz[:, 0], xyz[:, 1], line, color=color, lw=width, label=text)
    ax_path.set(title=f"paths, top view ({report['loops']:g} loops, {report['path_length_m']:.0f} m)",
                xlabel="x (m)", ylabel="y (m)")
    ax_path.set_aspect("equal", adjustable="datalim")
    ax_path.legend(loc="upper left", fontsize=8)
    lo, hi = 0.3, scene.room.height - 0.3  # walls and objects, not the floor and ceiling
    for ax, (name, xyz) in zip(ax_maps, maps.items(), strict=True):
        keep = (xyz[:, 2] > lo) & (xyz[:, 2] < hi)
        ax.scatter(xyz[keep, 0], xyz[keep, 1], c=xyz[keep, 2], s=0.5, cmap="viridis", vmin=lo, vmax=hi,
                   linewidths=0, rasterized=True)
        _scene_outline(ax, scene)
        m = report[name.replace(" ", "_")]
        ax.set(title=f"fused map {name} ({m['loops_closed']} loops closed)\n"
                     f"to the true surface: median {m['map']['surface_error_median_m'] * 100:.1f} cm, "
                     f"p90 {m['map']['surface_error_p90_m'] * 100:.1f} cm", xlabel="x (m)", ylabel="y (m)")
        ax.set_aspect("equal", adjustable="datalim")
    fig.suptitle(f"{label} - model simulator with a real model's errors, poor wheel odometry "
                 "(grey: the scene's true walls and objects)", color="tab:red", fontweight="bold")
    fig.savefig(path, dpi=100)
