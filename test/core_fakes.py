"""Small fakes shared by the core tests: frames on a straight track and a controllable backend."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from mapany_ros.core.backends.base import ViewPrediction, WindowPrediction
from mapany_ros.core.frames import CameraModel, Frame
from mapany_ros.core.geometry import make_pose

K = np.array([[50.0, 0, 15.5], [0, 50.0, 11.5], [0, 0, 1]])
MODEL = CameraModel(32, 24, K, "plumb_bob", np.zeros(5))


def frame(stamp_s: float, camera: str = "camera", pose: np.ndarray | None = None) -> Frame:
    return Frame(np.zeros((24, 32, 3), np.uint8), int(round(stamp_s * 1e9)), camera, f"{camera}_optical", MODEL,
                 T_world_camera=pose)


def base_pose(x: float) -> np.ndarray:
    return make_pose(np.eye(3), [x, 0.0, 0.0])


class RecordingBackend:
    """Returns each prior pose unchanged (identity when absent); can be made slow or failing."""

    name = "fake"
    needs_pose_priors = False

    def __init__(self, delay_s: float = 0.0, fail_on: int | None = None) -> None:
        self.delay_s = delay_s
        self.fail_on = fail_on
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
            if self.fail_on is not None and len(self.calls) == self.fail_on:
                raise RuntimeError("backend failure on purpose")
            time.sleep(self.delay_s)
            views = []
            for f in frames:
                depth = torch.full((f.height, f.width), 2.0)
                T = f.T_world_camera if f.T_world_camera is not None else np.eye(4)
                views.append(ViewPrediction(depth, torch.ones_like(depth), torch.ones_like(depth, dtype=torch.bool),
                                            torch.zeros(f.height, f.width, 3),
                                            torch.zeros(f.height, f.width, 3, dtype=torch.uint8), T, f.camera_model.K))
            return WindowPrediction(views)
        finally:
            with self._lock:
                self.active -= 1
