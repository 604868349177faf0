"""Trajectory accuracy against ground truth: evo's ATE after an SE(3) or Sim(3) fit, path length, step errors,
and the error where the robot came back to a place it had seen (revisits)."""

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


def revisit_pairs(truth: list[np.ndarray], stamps: list[int], *, radius_m: float = 0.3, min_gap_s: float = 10.0,
                  min_travel_m: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (earlier a, later b) of keyframe pairs at the same true place on different passes.

    Each keyframe b is paired with its nearest true neighbour a among the keyframes stamped at least
    ``min_gap_s`` earlier with at least ``min_travel_m`` driven (along the true path) in between, when
    that neighbour lies within ``radius_m``. Time alone would pair a robot that stood still with
    itself; distance driven alone, a robot that shuffled on the spot: together they mean it left and
    came back.
    """
    if len(truth) != len(stamps):
        raise ValueError(f"{len(truth)} true poses for {len(stamps)} stamps")
    ts = np.asarray(stamps, dtype=np.float64) * 1e-9
    p = np.stack([np.asarray(T)[:3, 3] for T in truth]) if len(truth) else np.zeros((0, 3))
    driven = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(p, axis=0), axis=1))])
    a_idx, b_idx = [], []
    for b in range(len(ts)):
        earlier = np.flatnonzero((ts <= ts[b] - min_gap_s) & (driven <= driven[b] - min_travel_m))
        if earlier.size == 0:
            continue
        d = np.linalg.norm(p[earlier] - p[b], axis=1)
        i = int(np.argmin(d))
        if d[i] <= radius_m:
            a_idx.append(int(earlier[i]))
            b_idx.append(b)
    return np.asarray(a_idx, dtype=np.int64), np.asarray(b_idx, dtype=np.int64)


def revisit_errors(estimate: list[np.ndarray], truth: list[np.ndarray], stamps: list[int], *,
                   radius_m: float = 0.3, min_gap_s: float = 10.0, min_travel_m: float = 2.0) -> np.ndarray:
    """Error (m) of the estimated relative position of keyframe pairs at the same true place on
    different passes (:func:`revisit_pairs`): where the robot came back, how far apart the map puts
    the two visits - a double wall shows as this offset.

    The relative position of b is taken in a's frame, for the estimate and the truth (the
    translation part of evo's relative pose error, RPE, for these pairs): no global fit, so the
    error is the pair's own, whatever the rest of the trajectory does and whatever its frame.
    """
    if len(estimate) != len(truth):
        raise ValueError(f"{len(estimate)} estimated poses for {len(truth)} true ones")
    a, b = revisit_pairs(truth, stamps, radius_m=radius_m, min_gap_s=min_gap_s, min_travel_m=min_travel_m)
    if a.size == 0:
        return np.zeros(0)
    P, Q = np.stack([np.asarray(T) for T in estimate]), np.stack([np.asarray(T) for T in truth])

    def relative(T: np.ndarray) -> np.ndarray:  # position of b in a's frame
        return np.einsum("nji,nj->ni", T[a, :3, :3], T[b, :3, 3] - T[a, :3, 3])

    return np.linalg.norm(relative(P) - relative(Q), axis=1)


def revisit_summary(errors: np.ndarray) -> dict[str, float | int]:
    """Pairs, median and 90th percentile of :func:`revisit_errors` (NaN without pairs)."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.size == 0:
        return {"pairs": 0, "median_m": math.nan, "p90_m": math.nan}
    return {"pairs": int(errors.size), "median_m": float(np.median(errors)), "p90_m": float(np.percentile(errors, 90))}
