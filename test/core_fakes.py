"""Small fakes shared by the core tests: frames on a straight track and a controllable backend."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import torch

from mapany_ros.core.backends.base import BackendError, ViewPrediction, WindowPrediction
from mapany_ros.core.frames import CameraModel, Frame
from mapany_ros.core.geometry import backproject, make_pose, pixel_rays

K = np.array([[50.0, 0, 15.5], [0, 50.0, 11.5], [0, 0, 1]])
MODEL = CameraModel(32, 24, K, "plumb_bob", np.zeros(5))


def frame(stamp_s: float, camera: str = "camera", pose: np.ndarray | None = None) -> Frame:
    return Frame(np.zeros((24, 32, 3), np.uint8), int(round(stamp_s * 1e9)), camera, f"{camera}_optical", MODEL,
                 T_world_camera=pose)


def base_pose(x: float) -> np.ndarray:
    return make_pose(np.eye(3), [x, 0.0, 0.0])


class RecordingBackend:
    """Records its calls; predicts each camera at its prior pose (identity when absent) looking at one
    wall, geometrically consistent so placement accepts it; can be made slow or failing."""

    name = "fake"
    needs_pose_priors = False

    def __init__(self, delay_s: float = 0.0, fail_on: int | tuple[int, ...] | None = None) -> None:
        self.delay_s = delay_s
        #: Calls (1-based) that raise.
        self.fail_on = {fail_on} if isinstance(fail_on, int) else set(fail_on or ())
        self.calls: list[list[Frame]] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def infer(self, frames):
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self.calls.append(list(frames))
            if len(self.calls) in self.fail_on:
                raise RuntimeError("backend failure on purpose")
            time.sleep(self.delay_s)
            poses = [f.T_world_camera if f.T_world_camera is not None else np.eye(4) for f in frames]
            # One wall for every window (the plane normal . X = 10 across the first camera's view):
            # consistent across views and windows while the cameras stay a few metres from the origin.
            normal = poses[0][:3, 2]
            offset = 10.0
            views = []
            for f, T in zip(frames, poses, strict=True):
                rays = pixel_rays(f.camera_model.K, f.height, f.width).double() @ torch.as_tensor(T[:3, :3]).T
                depth = ((offset - normal @ T[:3, 3]) / (rays @ torch.as_tensor(normal))).float()
                depth = torch.where(depth > 0, depth, torch.full_like(depth, float("nan")))
                views.append(ViewPrediction(depth, torch.ones_like(depth), torch.isfinite(depth),
                                            backproject(depth, f.camera_model.K, T),
                                            torch.zeros(f.height, f.width, 3, dtype=torch.uint8), T, f.camera_model.K))
            return WindowPrediction(views)
        finally:
            with self._lock:
                self.active -= 1


class BallastBackend(RecordingBackend):
    """A plugin (``core_fakes:BallastBackend``) that loads like a model: it needs its weights file and
    holds ``ballast_mb`` of torch memory, touched, so the process's resident size shows it."""

    def __init__(self, device: torch.device | str = "cpu", weights: str = "", ballast_mb: int = 300) -> None:
        super().__init__()
        if not Path(weights).is_file():
            raise BackendError(f"no weights at {weights}: put the model file there")
        self.device = torch.device(device)
        self.ballast = torch.ones(ballast_mb * 2**20 // 4, dtype=torch.float32, device=self.device)
