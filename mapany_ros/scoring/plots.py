"""Figures of `mapany-ros eval`: the trajectories from above and the depth error of every frame."""

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
