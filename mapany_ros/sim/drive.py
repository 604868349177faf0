"""A robot driving loops in a synthetic scene through the core pipeline, for placement tests and benchmarks.

Frames at a fixed rate (optionally paced in wall time so a slow backend falls behind), optional
odometry with its own errors; what came out is kept by stamp for :mod:`mapany_ros.scoring.trajectory`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from mapany_ros.core.frames import Frame
from mapany_ros.core.geometry import invert
from mapany_ros.core.pipeline import Pipeline, PipelineConfig, WindowResult
from mapany_ros.sim.odometry import DriftingOdometry
from mapany_ros.sim.scene import SyntheticScene, make_camera_model


@dataclass
class Run:
    """What came out of the pipeline, keyed by image stamp."""

    scene: SyntheticScene
    pipeline: Pipeline
    results: list[WindowResult]
    #: stamp -> T_map_base as finally estimated (corrections applied), for output keyframes.
    base_poses: dict[int, np.ndarray] = field(default_factory=dict)
    #: stamp -> index of the window that output it.
    window_of: dict[int, int] = field(default_factory=dict)
    odometry: DriftingOdometry | None = None

    @property
    def stamps(self) -> list[int]:
        return sorted(self.base_poses)

    def truth(self) -> list[np.ndarray]:
        return [self.scene.base_pose(s * 1e-9) for s in self.stamps]


def drive(scene: SyntheticScene, backend, *, loops: float = 2.0, rate_hz: float = 5.0, width: int = 128,
          height: int = 96, odometry: DriftingOdometry | None = None, pace: float | None = None,
          render: bool = False, **config) -> Run:
    """Play ``loops`` of the scene's trajectory into a pipeline running ``backend``.

    ``pace``: wall-clock speed-up (frames are fed in real time divided by it); None feeds them as
    fast as the callbacks take them, then waits for the backend. ``render``: every frame carries the
    image the camera sees (what keyframe selection without odometry looks at); else a blank one.
    """
    cam = make_camera_model(width, height)
    duration = loops * scene.trajectory.loop_length_m / scene.trajectory.speed_mps
    n = int(duration * rate_hz)
    results: list[WindowResult] = []
    errors: list[Exception] = []
    defaults = dict(use_odometry=odometry is not None, window_size=8, window_overlap=2, queue_size=100,
                    min_translation_m=0.15 if odometry is not None else 0.0,
                    max_interval_s=1.0 if odometry is not None else 0.9 / rate_hz)
    p = Pipeline(PipelineConfig(**{**defaults, **config}), backend, results.append, on_error=errors.append)
    p.set_extrinsic("camera", scene.T_base_camera)
    p.start()
    image = np.zeros((height, width, 3), np.uint8)
    t_odom, dt_odom = 0.0, 0.02
    start = time.perf_counter()
    for i in range(n):
        t = i / rate_hz
        while odometry is not None and t_odom <= t + 0.05:
            p.add_odometry(int(round(t_odom * 1e9)), odometry.pose(t_odom))
            t_odom += dt_odom
        if pace is not None:
            time.sleep(max(0.0, start + t / pace - time.perf_counter()))
        if render:
            image = np.ascontiguousarray(scene.render(scene.camera_pose(t), cam)[0])
        p.add_frame(Frame(image, int(round(t * 1e9)), "camera", "camera_optical_frame", cam))
    p.flush()
    assert p.wait_idle(600), "the pipeline did not finish"
    p.stop()
    if errors:
        raise errors[0]
    run = Run(scene, p, results, odometry=odometry)
    T_cam_base = invert(scene.T_base_camera)
    for r in results:
        for f, view, out in zip(r.frames, r.prediction.views, r.output_mask, strict=True):
            if out:
                run.base_poses[f.stamp_ns] = view.T_world_camera @ T_cam_base
                run.window_of[f.stamp_ns] = r.window.index
        for stamp, T in r.placement.corrections.items():  # the pose graph's latest word on a keyframe
            if stamp in run.base_poses:
                run.base_poses[stamp] = T
    return run
