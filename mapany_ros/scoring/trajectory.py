"""Trajectory accuracy against ground truth: evo's ATE after an SE(3) or Sim(3) fit, path length, step errors."""

from __future__ import annotations

import copy
import math

import numpy as np
from evo.core import metrics
from evo.core.geometry import GeometryException
from evo.core.trajectory import PoseTrajectory3D
from evo.core.units import Unit


def ate(estimate: list[np.ndarray], truth: list[np.ndarray], stamps: list[int], *, with_scale: bool = False
        ) -> tuple[float, float]:
    """(RMS translation error after an SE(3) or Sim(3) fit with evo, fitted scale)."""
    ts = np.asarray(stamps, dtype=np.float64) * 1e-9
    est = PoseTrajectory3D(poses_se3=[np.asarray(T) for T in estimate], timestamps=ts)
    ref = PoseTrajectory3D(poses_se3=[np.asarray(T) for T in truth], timestamps=ts)
    est = copy.deepcopy(est)
    _, _, scale = est.align(ref, correct_scale=with_scale)
    ape = metrics.APE(metrics.PoseRelation.translation_part)
    ape.process_data((ref, est))
    return float(ape.get_statistic(metrics.StatisticsType.rmse)), float(scale)


def path_length(poses: list[np.ndarray]) -> float:
    c = np.stack([T[:3, 3] for T in poses])
    return float(np.sum(np.linalg.norm(np.diff(c, axis=0), axis=1)))


def step_errors(estimate: list[np.ndarray], truth: list[np.ndarray], stamps: list[int], with_scale: bool = False
                ) -> np.ndarray:
    """|estimated - true| translation between consecutive keyframes, after the trajectory fit."""
    ts = np.asarray(stamps, dtype=np.float64) * 1e-9
    est = PoseTrajectory3D(poses_se3=[np.asarray(T) for T in estimate], timestamps=ts)
    ref = PoseTrajectory3D(poses_se3=[np.asarray(T) for T in truth], timestamps=ts)
    est.align(ref, correct_scale=with_scale)
    d_est = np.diff(est.positions_xyz, axis=0)
    d_ref = np.diff(ref.positions_xyz, axis=0)
    return np.linalg.norm(d_est - d_ref, axis=1)


def trajectory_errors(stamps: np.ndarray, estimate: np.ndarray, truth: np.ndarray
                      ) -> tuple[dict[str, float], np.ndarray]:
    """ATE (SE(3) and Sim(3) fits) and consecutive-pair RPE with evo; and the SE(3)-aligned positions."""
    ts = (stamps - stamps[0]) * 1e-9
    ref = PoseTrajectory3D(poses_se3=list(truth), timestamps=ts)
    out: dict[str, float] = {"poses": len(stamps), "path_length_m": float(ref.path_length)}
    aligned = np.full((len(stamps), 3), np.nan)
    for key, with_scale in (("se3", False), ("sim3", True)):
        est = PoseTrajectory3D(poses_se3=list(estimate), timestamps=ts)
        try:
            _, _, scale = est.align(ref, correct_scale=with_scale)
        except GeometryException:  # collinear positions: no unique fit
            out.update({f"ate_{key}_rmse_m": math.nan, f"ate_{key}_max_m": math.nan})
            continue
        ape = metrics.APE(metrics.PoseRelation.translation_part)
        ape.process_data((ref, est))
        out[f"ate_{key}_rmse_m"] = float(ape.get_statistic(metrics.StatisticsType.rmse))
        out[f"ate_{key}_max_m"] = float(ape.get_statistic(metrics.StatisticsType.max))
        if with_scale:
            out["sim3_scale"] = float(scale)
        else:
            aligned = est.positions_xyz
    est = PoseTrajectory3D(poses_se3=list(estimate), timestamps=ts)
    for key, relation in (("trans", metrics.PoseRelation.translation_part),
                          ("rot", metrics.PoseRelation.rotation_angle_deg)):
        rpe = metrics.RPE(relation, delta=1, delta_unit=Unit.frames, all_pairs=False)
        rpe.process_data((ref, est))
        unit = "m" if key == "trans" else "deg"
        out[f"rpe_{key}_rmse_{unit}"] = float(rpe.get_statistic(metrics.StatisticsType.rmse))
        out[f"rpe_{key}_max_{unit}"] = float(rpe.get_statistic(metrics.StatisticsType.max))
    return out, aligned


def revisit_errors(estimate: list[np.ndarray], truth: list[np.ndarray], stamps: list[int], *,
                   radius_m: float = 0.3, min_gap_s: float = 10.0) -> np.ndarray:
    """Error (m) of the estimated relative position of keyframe pairs at the same true place on
    different passes: true positions within ``radius_m``, stamps at least ``min_gap_s`` apart.

    The estimate is first SE(3)-aligned to the truth (evo), so the error is that of the map where
    the robot came back: a double wall shows as the pair's offset, whatever the frame. Each keyframe
    is paired with its nearest true neighbour of an earlier pass.
    """
    ts = np.asarray(stamps, dtype=np.float64) * 1e-9
    est = PoseTrajectory3D(poses_se3=[np.asarray(T) for T in estimate], timestamps=ts)
    ref = PoseTrajectory3D(poses_se3=[np.asarray(T) for T in truth], timestamps=ts)
    est.align(ref, correct_scale=False)
    p_est, p_ref = est.positions_xyz, ref.positions_xyz
    errors = []
    for b in range(len(ts)):
        earlier = np.flatnonzero(ts < ts[b] - min_gap_s)
        if earlier.size == 0:
            continue
        d = np.linalg.norm(p_ref[earlier] - p_ref[b], axis=1)
        a = earlier[int(np.argmin(d))]
        if d.min() <= radius_m:
            errors.append(np.linalg.norm((p_est[b] - p_est[a]) - (p_ref[b] - p_ref[a])))
    return np.asarray(errors)
