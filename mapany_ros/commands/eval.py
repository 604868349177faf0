"""`mapany-ros eval RESULT_BAG GT_BAG`: score a recorded run of the node against ground truth.

RESULT_BAG holds the node's outputs (recorded live, or written by an offline run): ``/path``
(its last message is the final trajectory: base poses in the map frame, stamped with the image
stamps), ``/<camera>/depth`` (32FC1 metres, NaN invalid) and optionally ``/tf`` with map ->
odom. GT_BAG holds ``/ground_truth/odom`` (true base poses in ``map`` at the image stamps) and
``/ground_truth/depth`` (true z-depth), as ``mapany_ros.sim.robot_bag`` writes them, and
optionally the input ``/odom``, scored the same way as the drift the node has to beat.

Trajectories are scored with evo: ATE is the translation RMSE after an SE(3) fit and after a
Sim(3) fit (with its scale); RPE is the translation and rotation error between consecutive
matched poses (keyframes are irregularly spaced, so a per-metre delta would skip most pairs).
Revisits: for keyframe pairs at the same true place on different passes (true positions within
30 cm, at least 10 s and 2 m driven apart), the error of the estimated position of one in the
other's frame - where the robot came back, how far apart the map puts the two visits.
Depth: AbsRel, median relative error, delta < 1.25 and valid fraction, per image with a
ground-truth depth of the same stamp and size, then averaged over images (each weighs the same).
Writes ``eval.json`` and ``eval.png`` and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.highlevel import AnyReader, AnyReaderError
from rosbags.rosbag2 import ReaderError
from rosbags.typesys import Stores, get_typestore

from mapany_ros.core.geometry import invert, rotation_angle
from mapany_ros.core.odometry import Lookup, OdometryBuffer
from mapany_ros.ros import conversions as conv
from mapany_ros.scoring.metrics import depth_frame_errors
from mapany_ros.scoring.plots import write_eval_figure
from mapany_ros.scoring.trajectory import revisit_errors, revisit_summary, trajectory_errors

GT_ODOM_TOPIC = "/ground_truth/odom"
GT_DEPTH_TOPIC = "/ground_truth/depth"
ODOM_TOPIC = "/odom"
PATH_TOPIC = "/path"
TF_TOPIC = "/tf"
#: Path poses are matched to ground truth of the same stamp, else the nearest within this.
MATCH_TOLERANCE_NS = 1_000_000
#: Odometry is interpolated at ground-truth stamps across gaps up to this long.
ODOM_MAX_GAP_S = 0.5
RPE_PAIRS = "consecutive matched poses"
#: Revisit pairs: true positions this close, this far apart in time and in distance driven.
REVISIT = {"radius_m": 0.3, "min_gap_s": 10.0, "min_travel_m": 2.0}
REVISIT_PAIRS = (f"each matched pose with its nearest true neighbour within {REVISIT['radius_m']:g} m of an earlier"
                 f" pass (>= {REVISIT['min_gap_s']:g} s and >= {REVISIT['min_travel_m']:g} m driven before)")


class EvalError(Exception):
    """The bags cannot be scored; the message names the bag and the topic at fault."""


@dataclass
class GroundTruth:
    stamps: np.ndarray  # (N,) int64, sorted, unique
    poses: np.ndarray  # (N, 4, 4) T_map_base
    depth: dict[int, np.ndarray]  # stamp -> (H, W) float32 z-depth
    odometry: OdometryBuffer | None  # the input odometry, T_odom_base
    odom_frame: str


@dataclass
class Estimate:
    stamps: np.ndarray  # (M,) int64, sorted, unique
    poses: np.ndarray  # (M, 4, 4) T_map_base
    frame_id: str
    T_map_odom: np.ndarray | None  # the last map -> odom on /tf


# --------------------------------------------------------------------------- reading


def _open(path: Path, what: str) -> AnyReader:
    if not path.exists():
        raise EvalError(f"{what} {path}: no such bag")
    reader = AnyReader([path], default_typestore=get_typestore(Stores.ROS2_KILTED))
    try:
        reader.open()
    except (AnyReaderError, ReaderError, OSError) as e:
        raise EvalError(f"{what} {path}: cannot read the bag ({e})") from e
    return reader


def _connections(reader: AnyReader, topic: str, what: str, required: bool) -> list[Any]:
    """The connections of ``topic``; a required topic must have messages."""
    conns = [c for c in reader.connections if c.topic == topic]
    if required and sum(c.msgcount for c in conns) == 0:
        raise EvalError(f"{what} {reader.paths[0]} has no messages on {topic}"
                        f" (topics: {', '.join(sorted(reader.topics)) or 'none'})")
    return conns


def _messages(reader: AnyReader, topic: str, what: str, required: bool = True) -> Iterator[Any]:
    """Deserialised messages of ``topic`` in log order."""
    conns = _connections(reader, topic, what, required)
    if conns:  # rosbags reads every topic when given no connection
        for conn, _, raw in reader.messages(connections=conns):
            yield reader.deserialize(raw, conn.msgtype)


def _last_message(reader: AnyReader, topic: str, what: str) -> Any:
    """The last message of a required ``topic``; only that one is deserialised (paths grow long)."""
    conn, _, raw = deque(reader.messages(connections=_connections(reader, topic, what, True)), maxlen=1)[0]
    return reader.deserialize(raw, conn.msgtype)


def _convert(fn: Callable[[Any], Any], msg: Any, topic: str, what: str) -> Any:
    try:
        return fn(msg)
    except conv.ConversionError as e:
        raise EvalError(f"{what}: a message on {topic} is unusable: {e}") from e


def read_ground_truth(path: Path) -> GroundTruth:
    """True poses and depth, and the input odometry when the bag has it."""
    what = "GT_BAG"
    reader = _open(path, what)
    try:
        poses = {conv.stamp_to_ns(m.header.stamp): _convert(conv.odometry_to_matrix, m, GT_ODOM_TOPIC, what)
                 for m in _messages(reader, GT_ODOM_TOPIC, what)}
        depth = {conv.stamp_to_ns(m.header.stamp): _convert(conv.depth_image_to_array, m, GT_DEPTH_TOPIC, what)
                 for m in _messages(reader, GT_DEPTH_TOPIC, what)}
        odometry, odom_frame = None, "odom"
        for m in _messages(reader, ODOM_TOPIC, what, required=False):
            if odometry is None:
                odometry, odom_frame = OdometryBuffer(max_gap_s=ODOM_MAX_GAP_S, max_samples=10**9), m.header.frame_id
            odometry.add(conv.stamp_to_ns(m.header.stamp), _convert(conv.odometry_to_matrix, m, ODOM_TOPIC, what))
    finally:
        reader.close()
    stamps = np.array(sorted(poses), dtype=np.int64)
    return GroundTruth(stamps, np.stack([poses[s] for s in stamps]), depth, odometry, odom_frame.lstrip("/"))


def read_estimate(reader: AnyReader, odom_frame: str) -> Estimate:
    """The final trajectory (the last /path) and the last map -> odom of the result bag."""
    what = "RESULT_BAG"
    last = _last_message(reader, PATH_TOPIC, what)
    if not last.poses:
        raise EvalError(f"{what} {reader.paths[0]}: the last message on {PATH_TOPIC} has no poses")
    frame = last.header.frame_id.lstrip("/")
    by_stamp = {conv.stamp_to_ns(p.header.stamp): _convert(conv.pose_to_matrix, p.pose, PATH_TOPIC, what)
                for p in last.poses}
    stamps = np.array(sorted(by_stamp), dtype=np.int64)
    T_map_odom = None
    for m in _messages(reader, TF_TOPIC, what, required=False):
        for tf in m.transforms:
            if tf.header.frame_id.lstrip("/") == frame and tf.child_frame_id.lstrip("/") == odom_frame:
                T_map_odom = _convert(conv.transform_to_matrix, tf.transform, TF_TOPIC, what)
    return Estimate(stamps, np.stack([by_stamp[s] for s in stamps]), frame, T_map_odom)


# --------------------------------------------------------------------------- trajectory


def associate(stamps: np.ndarray, ref_stamps: np.ndarray, tol_ns: int = MATCH_TOLERANCE_NS
              ) -> tuple[np.ndarray, np.ndarray, int]:
    """Indices (into ``stamps``, into ``ref_stamps``) of matched pairs, and how many match exactly.

    Each stamp takes the nearest reference stamp (the same one when there is one) within
    ``tol_ns``; a reference is used once. Both inputs sorted ascending.
    """
    hi = np.clip(np.searchsorted(ref_stamps, stamps), 0, len(ref_stamps) - 1)
    lo = np.clip(hi - 1, 0, len(ref_stamps) - 1)
    d_hi, d_lo = np.abs(ref_stamps[hi] - stamps), np.abs(stamps - ref_stamps[lo])
    ref = np.where(d_hi <= d_lo, hi, lo)
    dist = np.minimum(d_hi, d_lo)
    ok = np.flatnonzero(dist <= tol_ns)
    _, first = np.unique(ref[ok], return_index=True)
    ok = ok[first]
    return ok, ref[ok], int(np.count_nonzero(dist[ok] == 0))


def _odometry_at(odometry: OdometryBuffer, stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask of stamps the odometry covers, their interpolated T_odom_base)."""
    looked = [odometry.lookup(int(s)) for s in stamps]
    ok = np.array([status is Lookup.OK for status, _ in looked])
    return ok, np.array([T for status, T in looked if status is Lookup.OK]).reshape(-1, 4, 4)


def _map_odom(est: Estimate, gt: GroundTruth, stamps: np.ndarray) -> dict[str, float] | None:
    """The node's final map -> odom against the true one, over the trajectory it covers.

    The node's map is the odometry frame at its first keyframe, so the true correction at the
    last keyframe is the drift accumulated between the first and the last:
    T(first)^-1 T(last) with T(t) = T_map_base_true(t) T_odom_base(t)^-1.
    """
    if est.T_map_odom is None or gt.odometry is None:
        return None
    ok, T_ob = _odometry_at(gt.odometry, stamps[[0, -1]])
    if not ok.all():
        return None
    idx = np.searchsorted(gt.stamps, stamps[[0, -1]])
    T_first, T_last = (gt.poses[i] @ invert(T) for i, T in zip(idx, T_ob))
    truth = invert(T_first) @ T_last
    err = invert(est.T_map_odom) @ truth
    return {
        "estimate_translation_m": float(np.linalg.norm(est.T_map_odom[:3, 3])),
        "estimate_rotation_deg": math.degrees(rotation_angle(est.T_map_odom)),
        "truth_translation_m": float(np.linalg.norm(truth[:3, 3])),
        "truth_rotation_deg": math.degrees(rotation_angle(truth)),
        "error_translation_m": float(np.linalg.norm(err[:3, 3])),
        "error_rotation_deg": math.degrees(rotation_angle(err)),
    }


# --------------------------------------------------------------------------- depth


def _depth_report(reader: AnyReader, topic: str, gt: GroundTruth) -> dict[str, Any]:
    per_frame, no_gt, size_mismatch = [], 0, 0
    for m in _messages(reader, topic, "RESULT_BAG"):
        stamp = conv.stamp_to_ns(m.header.stamp)
        truth = gt.depth.get(stamp)
        if truth is None:
            no_gt += 1
        elif truth.shape != (m.height, m.width):
            size_mismatch += 1
        else:
            depth = _convert(conv.depth_image_to_array, m, topic, "RESULT_BAG")
            per_frame.append({"stamp_ns": stamp, **depth_frame_errors(depth, truth)})
    report: dict[str, Any] = {"topic": topic, "frames": len(per_frame), "skipped_no_ground_truth": no_gt,
                              "skipped_size_mismatch": size_mismatch}
    for key in ("abs_rel", "median_rel", "delta_1_25", "valid_fraction"):
        values = [f[key] for f in per_frame if not math.isnan(f[key])]
        report[key] = float(np.mean(values)) if values else math.nan
    report["per_frame"] = per_frame
    return report


# --------------------------------------------------------------------------- evaluation


def evaluate(result_bag: Path, gt_bag: Path, camera: str = "camera") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The report (eval.json's content) and the positions to plot (truth, aligned estimate, odometry)."""
    gt = read_ground_truth(gt_bag)
    reader = _open(result_bag, "RESULT_BAG")
    try:
        est = read_estimate(reader, gt.odom_frame)
        depth = _depth_report(reader, f"/{camera.strip('/')}/depth", gt)
    finally:
        reader.close()
    i_est, i_gt, exact = associate(est.stamps, gt.stamps)
    if len(i_est) < 3:
        raise EvalError(
            f"only {len(i_est)} of the {len(est.stamps)} poses of the last {PATH_TOPIC} in RESULT_BAG have a"
            f" pose on {GT_ODOM_TOPIC} in GT_BAG within {MATCH_TOLERANCE_NS / 1e6:g} ms; need 3"
        )
    stamps, truth = gt.stamps[i_gt], gt.poses[i_gt]
    estimate, aligned = trajectory_errors(stamps, est.poses[i_est], truth)
    estimate["revisit"] = revisit_summary(revisit_errors(est.poses[i_est], truth, stamps, **REVISIT))
    plot = {"truth": truth[:, :3, 3], "estimate": aligned}
    odometry = None
    if gt.odometry is not None:
        ok, T_ob = _odometry_at(gt.odometry, stamps)
        if ok.sum() >= 3:
            odometry, plot["odometry"] = trajectory_errors(stamps[ok], T_ob, truth[ok])
            odometry["revisit"] = revisit_summary(revisit_errors(T_ob, truth[ok], stamps[ok], **REVISIT))
    report = {
        "result_bag": str(result_bag),
        "gt_bag": str(gt_bag),
        "trajectory": {
            "frame_id": est.frame_id,
            "path_poses": len(est.stamps),
            "matched": len(i_est),
            "matched_exact": exact,
            "match_tolerance_ms": MATCH_TOLERANCE_NS / 1e6,
            "rpe_pairs": RPE_PAIRS,
            "revisit_pairs": REVISIT_PAIRS,
            "estimate": estimate,
            "odometry": odometry,
        },
        "map_odom": _map_odom(est, gt, stamps),
        "depth": depth,
    }
    return report, plot


def _finite(x: Any) -> Any:
    """NaN and inf become null, so eval.json is strict JSON."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def print_summary(report: dict[str, Any], out: Path) -> None:
    tr, d, mo = report["trajectory"], report["depth"], report["map_odom"]
    print(f"[eval] {report['result_bag']} against {report['gt_bag']}")
    print(f"  trajectory: {tr['matched']} of {tr['path_poses']} path poses matched ({tr['matched_exact']} exactly);"
          f" RPE over {tr['rpe_pairs']}")
    print(f"  {'':<10}{'ATE SE(3)':>12}{'ATE Sim(3)':>12}{'scale':>8}{'RPE trans':>12}{'RPE rot':>11}")
    for name in ("estimate", "odometry"):
        e = tr[name]
        if e is not None:
            print(f"  {name:<10}{e['ate_se3_rmse_m'] * 100:9.2f} cm{e['ate_sim3_rmse_m'] * 100:9.2f} cm"
                  f"{e.get('sim3_scale', math.nan):8.3f}{e['rpe_trans_rmse_m'] * 100:9.2f} cm"
                  f"{e['rpe_rot_rmse_deg']:7.2f} deg")
    for name in ("estimate", "odometry"):
        e = tr[name]
        if e is None:
            continue
        rv = e["revisit"]
        text = (f"median {rv['median_m'] * 100:.2f} cm, p90 {rv['p90_m'] * 100:.2f} cm over {rv['pairs']} pairs"
                if rv["pairs"] else "no place visited twice")
        print(f"  revisit error, {name:<9} {text}")
    if mo is not None:
        print(f"  map -> odom: estimate {mo['estimate_translation_m'] * 100:.1f} cm / {mo['estimate_rotation_deg']:.2f}"
              f" deg, truth {mo['truth_translation_m'] * 100:.1f} cm / {mo['truth_rotation_deg']:.2f} deg,"
              f" error {mo['error_translation_m'] * 100:.1f} cm / {mo['error_rotation_deg']:.2f} deg")
    print(f"  depth ({d['topic']}, {d['frames']} frames): AbsRel {d['abs_rel'] * 100:.2f} %, median rel"
          f" {d['median_rel'] * 100:.2f} %, delta<1.25 {d['delta_1_25'] * 100:.1f} %,"
          f" valid {d['valid_fraction'] * 100:.1f} %")
    if d["skipped_no_ground_truth"] or d["skipped_size_mismatch"]:
        print(f"  depth frames skipped: {d['skipped_no_ground_truth']} without ground truth of the same stamp,"
              f" {d['skipped_size_mismatch']} of another size than the ground truth")
    print(f"  wrote {out / 'eval.json'}, {out / 'eval.png'}")


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = argparse.ArgumentParser(prog="mapany-ros eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result_bag", type=Path, help="bag with the node's /path and /<camera>/depth")
    ap.add_argument("gt_bag", type=Path, help="bag with /ground_truth/odom and /ground_truth/depth (and /odom)")
    ap.add_argument("--out", type=Path, default=Path("out/eval"), help="folder for eval.json and eval.png")
    ap.add_argument("--camera", default="camera", help="camera name: the depth topic is /<camera>/depth")
    return ap, ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ap, args = parse_args(argv)
    try:
        report, plot = evaluate(args.result_bag, args.gt_bag, args.camera)
    except EvalError as e:
        ap.error(str(e))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval.json").write_text(json.dumps(_finite(report), indent=2))
    write_eval_figure(args.out / "eval.png", report, plot)
    print_summary(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
