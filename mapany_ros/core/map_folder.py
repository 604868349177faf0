"""A saved map: one folder with the fused map and what a later run needs to relocalise in it.

::

    <folder>/map.yaml        what is in the folder (version, frame, counts, the parameters that matter,
                             and the odometry's scale where a camera rig measured it)
    <folder>/map.ply         the fused map (x y z red green blue confidence), as ~/save_map always wrote
    <folder>/keyframes.npz   every keyframe: its pose in the map, and per camera its camera model,
                             place on the base, global descriptor and small depth image
    <folder>/images/         per keyframe and camera, the JPEG loop closure verifies with
    <folder>/map_grid.yaml   the occupancy grid as Nav2's map_server loads it, with map_grid.pgm

Other layers (the occupancy grid's Nav2 pair) are written beside them by their owners. Nothing
here is pickled: arrays, JPEG and YAML only, so a map folder is safe to load from anywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from mapany_ros.core.frames import CameraModel
from mapany_ros.core.placement.loops.memory import SavedKeyframes, StoredKeyframe, StoredView
from mapany_ros.core.placement.scale import OdometryCalibration

VERSION = 1
MAP_PLY = "map.ply"
#: The occupancy grid's Nav2 pair: this YAML and the PGM of the same stem (core.occupancy.write_nav2_map).
GRID_YAML = "map_grid.yaml"
MAX_D = 14  # rational_polynomial has 8 coefficients; room for the longest ROS model


def write_keyframes(folder: Path, saved: SavedKeyframes, extra: dict | None = None) -> None:
    """Write ``keyframes.npz``, ``images/`` and ``map.yaml`` into ``folder`` (created if needed)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    kfs = [kf for kf in saved.keyframes if kf.kid in saved.poses and kf.views]
    views = [(kf, v) for kf in kfs for v in kf.views]
    names = []
    for kf, v in views:
        name = f"{kf.kid:06d}_{v.camera}.jpg"
        (folder / "images" / name).write_bytes(v.jpeg)
        names.append(name)
    D = np.zeros((len(views), MAX_D))
    for n, (_, v) in enumerate(views):
        D[n, : min(MAX_D, v.camera_model.D.size)] = np.ravel(v.camera_model.D)[:MAX_D]
    np.savez(
        folder / "keyframes.npz",
        kid=np.array([kf.kid for kf in kfs], dtype=np.int64),
        stamp_ns=np.array([kf.stamp_ns for kf in kfs], dtype=np.int64),
        T_map_base=np.array([saved.poses[kf.kid] for kf in kfs], dtype=np.float64).reshape(-1, 4, 4),
        view_kid=np.array([kf.kid for kf, _ in views], dtype=np.int64),
        view_camera=np.array([v.camera for _, v in views], dtype=str),
        view_stamp_ns=np.array([v.stamp_ns for _, v in views], dtype=np.int64),
        view_frame_id=np.array([v.frame_id for _, v in views], dtype=str),
        view_size=np.array([[v.camera_model.width, v.camera_model.height] for _, v in views], dtype=np.int64),
        view_K=np.array([v.camera_model.K for _, v in views], dtype=np.float64).reshape(-1, 3, 3),
        view_distortion_model=np.array([v.camera_model.distortion_model for _, v in views], dtype=str),
        view_D=D,
        view_D_len=np.array([v.camera_model.D.size for _, v in views], dtype=np.int64),
        view_T_base_camera=np.array([v.T_base_camera for _, v in views], dtype=np.float64).reshape(-1, 4, 4),
        view_descriptor=np.array([v.descriptor for _, v in views], dtype=np.float32),
        view_depth=np.array([v.depth for _, v in views], dtype=np.float32),
        view_image=np.array(names, dtype=str),
    )
    info = {"version": VERSION, "map_frame": saved.map_frame, "keyframes": len(kfs), "views": len(views),
            **(extra or {})}
    c = saved.odometry_calibration
    if c is not None:  # the robot's wheel calibration as its rig measured it; ratio for people to read
        info["odometry_scale"] = {"ratio": round(float(np.exp(c.log_scale)), 6), "log_scale": c.log_scale,
                                  "variance": c.variance, "rig_windows": c.rig_windows}
    (folder / "map.yaml").write_text(yaml.safe_dump(info, sort_keys=False))


def read_keyframes(folder: Path) -> SavedKeyframes:
    """Read what :func:`write_keyframes` wrote; raises ValueError naming what is missing or wrong."""
    folder = Path(folder)
    info_path, npz_path = folder / "map.yaml", folder / "keyframes.npz"
    for p in (info_path, npz_path):
        if not p.is_file():
            raise ValueError(f"{folder} is not a saved map: {p.name} is missing (write one with ~/save_map)")
    info = yaml.safe_load(info_path.read_text()) or {}
    if info.get("version") != VERSION:
        raise ValueError(f"{info_path}: version {info.get('version')!r}, this node reads version {VERSION}")
    with np.load(npz_path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    by_kid = {int(k): StoredKeyframe(int(k), int(s)) for k, s in zip(data["kid"], data["stamp_ns"], strict=True)}
    poses = {int(k): T for k, T in zip(data["kid"], data["T_map_base"], strict=True)}
    for n, kid in enumerate(data["view_kid"]):
        w, h = (int(x) for x in data["view_size"][n])
        model = CameraModel(w, h, data["view_K"][n], str(data["view_distortion_model"][n]),
                            data["view_D"][n][: int(data["view_D_len"][n])].copy())
        image = folder / "images" / str(data["view_image"][n])
        if not image.is_file():
            raise ValueError(f"{folder}: image {image.name} of keyframe {int(kid)} is missing")
        by_kid[int(kid)].views.append(StoredView(
            str(data["view_camera"][n]), int(data["view_stamp_ns"][n]), str(data["view_frame_id"][n]), model,
            image.read_bytes(), data["view_T_base_camera"][n], data["view_descriptor"][n], data["view_depth"][n]))
    return SavedKeyframes(list(by_kid.values()), poses, str(info.get("map_frame", "map")),
                          _calibration(info.get("odometry_scale"), info_path))


def _calibration(entry: object, info_path: Path) -> OdometryCalibration | None:
    """map.yaml's ``odometry_scale`` (absent in a map no rig measured); raises ValueError when malformed."""
    if entry is None:
        return None
    try:
        c = OdometryCalibration(float(entry["log_scale"]), float(entry["variance"]), int(entry["rig_windows"]))
    except (TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"{info_path}: odometry_scale needs log_scale, variance and rig_windows ({exc!r})") from exc
    if not (np.isfinite(c.log_scale) and abs(c.log_scale) < 1.0 and np.isfinite(c.variance) and c.variance > 0
            and c.rig_windows > 0):
        raise ValueError(f"{info_path}: odometry_scale {entry} is out of range")
    return c
