"""A robot driving loops in a synthetic scene through the core pipeline, for placement tests and benchmarks.

Frames at a fixed rate from one camera or a rig of several (each with its own extrinsic and stamp
offset), optionally paced in wall time so a slow backend falls behind, optional odometry with its
own errors; what came out is kept by stamp for :mod:`mapany_ros.scoring.trajectory`. The pipeline
runs with the product's own defaults (:class:`PipelineConfig`) unless told otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from mapany_ros.core.frames import CameraModel, Frame
from mapany_ros.core.geometry import invert
from mapany_ros.core.pipeline import Pipeline, PipelineConfig, WindowResult
from mapany_ros.sim.odometry import DriftingOdometry
from mapany_ros.sim.scene import RigCamera, SyntheticScene, make_camera_model

#: The single camera of a drive without a rig: the scene's own, named as the node's default.
DEFAULT_CAMERA = "camera"


@dataclass
class Run:
    """What came out of the pipeline, keyed by image stamp."""

    scene: SyntheticScene
    pipeline: Pipeline
    results: list[WindowResult]
    #: stamp -> T_map_base as finally estimated (corrections applied), for output keyframes. With a
    #: rig every camera's image has its own stamp, and its view gives the base at that stamp.
    base_poses: dict[int, np.ndarray] = field(default_factory=dict)
    #: stamp -> index of the window that output it.
    window_of: dict[int, int] = field(default_factory=dict)
    odometry: DriftingOdometry | None = None
    #: The rig the robot drove with (name -> extrinsic and stamp offset).
    cameras: dict[str, RigCamera] = field(default_factory=dict)
    #: What the pipeline reported failing (backend or placement), in order.
    errors: list[Exception] = field(default_factory=list)
    #: stamp -> the camera whose image it is, for output keyframes.
    camera_of: dict[int, str] = field(default_factory=dict)

    @property
    def stamps(self) -> list[int]:
        return sorted(self.base_poses)

    def truth(self) -> list[np.ndarray]:
        return [self.scene.base_pose(s * 1e-9) for s in self.stamps]


def drive(scene: SyntheticScene, backend, *, loops: float = 2.0, rate_hz: float = 5.0, width: int = 128,
          height: int = 96, odometry: DriftingOdometry | None = None, pace: float | None = None,
          cameras: Mapping[str, RigCamera] | None = None, every_frame_keyframe: bool = False,
          camera: CameraModel | None = None, start_s: float = 0.0, map_folder: str | None = None,
          render: bool = False, raise_errors: bool = True, **config) -> Run:
    """Play ``loops`` of the scene's trajectory into a pipeline running ``backend``.

    ``cameras``: the rig, name -> :class:`RigCamera` (e.g. ``scene.rig("front", "left")``); each
    camera's image i is stamped ``i / rate_hz + stamp_offset_s`` and its extrinsic is set on the
    pipeline. None: the scene's single camera, named ``camera``.
    ``pace``: wall-clock speed-up (frames are fed in real time divided by it) to a pipeline with its
    worker thread, which thins keyframes when the backend lags, as the node does; None runs every
    window and loop closure in this thread as soon as it can, and thins nothing, as offline
    processing does (deterministic).
    The pipeline gets :class:`PipelineConfig`'s defaults (the node's: keyframes every 15 cm, 10 deg or
    1 s), ``use_odometry`` when ``odometry`` is given, and ``config`` on top.
    ``camera`` replaces the default pinhole camera model of every camera (``width`` and ``height``
    are then its own).
    ``start_s``: scene time of the first frame (the robot starts elsewhere on its loop; odometry
    must then start there too, e.g. ``DriftingOdometry(..., t0_s=start_s)``).
    ``map_folder``: start in that saved map (:meth:`Pipeline.load_map`).
    ``raise_errors``: raise the first error the pipeline reported (else they are in ``Run.errors``).
    ``render``: every frame carries its rendered image (appearance, visual keyframes); else blank
    images, all the model simulator needs.
    ``every_frame_keyframe``: every frame a keyframe, whatever the motion (keyframe thresholds off,
    ``max_interval_s`` just under the frame period) with a 100-window queue - dense windows for
    tests of placement on many views.
    """
    rig = dict(cameras) if cameras is not None else {DEFAULT_CAMERA: RigCamera(scene.T_base_camera)}
    order = sorted(rig, key=lambda c: rig[c].stamp_offset_s)  # within one rig snapshot, in stamp order
    cam = camera if camera is not None else make_camera_model(width, height)
    width, height = cam.width, cam.height
    duration = loops * scene.trajectory.loop_length_m / scene.trajectory.speed_mps
    n = int(duration * rate_hz)
    results: list[WindowResult] = []
    errors: list[Exception] = []
    defaults: dict = dict(cameras=tuple(rig), use_odometry=odometry is not None, thin_keyframes=pace is not None)
    if every_frame_keyframe:
        defaults.update(min_translation_m=0.0, min_rotation_deg=0.0, max_interval_s=0.9 / rate_hz, queue_size=100)
    p = Pipeline(PipelineConfig(**{**defaults, **config}), backend, results.append, on_error=errors.append)
    for name, camera in rig.items():
        p.set_extrinsic(name, camera.T_base_camera)
    if map_folder is not None:
        p.load_map(map_folder)
    if pace is not None:
        p.start()
    image = np.zeros((height, width, 3), np.uint8)
    t_odom, dt_odom = start_s, 0.02
    start = time.perf_counter()
    for i in range(n):
        for name in order:
            t = start_s + i / rate_hz + rig[name].stamp_offset_s
            while odometry is not None and t_odom <= t + 0.05:
                p.add_odometry(int(round(t_odom * 1e9)), odometry.pose(t_odom))
                t_odom += dt_odom
            if pace is not None:
                time.sleep(max(0.0, start + t / pace - time.perf_counter()))
            pixels = np.ascontiguousarray(scene.render(scene.camera_pose(t, rig[name].T_base_camera), cam)[0]) \
                if render else image
            p.add_frame(Frame(pixels, int(round(t * 1e9)), name, f"{name}_optical_frame", cam))
            if pace is None:  # as offline processing: every window (and loop closure) in this thread, in order
                p.process_ready()
    p.flush()
    if pace is None:
        p.process_ready()
    else:
        assert p.wait_idle(600), "the pipeline did not finish"
        p.stop()
    if errors and raise_errors:
        raise errors[0]
    run = Run(scene, p, results, odometry=odometry, cameras=rig, errors=errors)
    T_cam_base = {name: invert(camera.T_base_camera) for name, camera in rig.items()}
    for r in results:
        for f, view, out in zip(r.frames, r.prediction.views, r.output_mask, strict=True):
            if out:
                run.base_poses[f.stamp_ns] = view.T_world_camera @ T_cam_base[f.camera]
                run.window_of[f.stamp_ns] = r.window.index
                run.camera_of[f.stamp_ns] = f.camera
        for (camera, stamp), T in r.placement.view_corrections.items():  # the graph's latest word on a view
            if stamp in run.base_poses or stamp in run.window_of:
                run.base_poses[stamp] = T @ T_cam_base[camera]
    return run
