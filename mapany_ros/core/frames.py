"""Frames and camera models: what a camera delivers, independent of any ROS message type."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class CameraModel:
    """Pinhole intrinsics plus optional distortion, as in sensor_msgs/CameraInfo.

    K is float64 3x3 in pixels for an image of ``width`` x ``height``. ``D`` follows the
    ROS distortion model named by ``distortion_model`` (empty or all zeros = pinhole).
    """

    width: int
    height: int
    K: np.ndarray
    distortion_model: str = "plumb_bob"
    D: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def is_pinhole(self) -> bool:
        """True when the distortion is absent or all zero, so K alone describes the rays."""
        return self.D.size == 0 or not np.any(self.D)

    def scaled(self, width: int, height: int) -> CameraModel:
        """The same camera resampled to ``width`` x ``height`` (pixel-centre convention)."""
        sx, sy = width / self.width, height / self.height
        K = self.K.copy()
        K[0, 0] *= sx
        K[1, 1] *= sy
        K[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
        K[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
        return CameraModel(width, height, K, self.distortion_model, self.D.copy())


@dataclass
class Frame:
    """One camera image with everything the backends may use.

    ``T_world_camera`` is the optional pose prior: float64 4x4, camera-to-world, OpenCV optical
    convention (x right, y down, z forward), world being the odometry frame when odometry is
    used. ``depth`` is an optional registered depth prior in metres (NaN or 0 = missing).
    ``T_base_camera`` is the base -> optical extrinsic at the image stamp, when known: whoever
    needs the robot's pose from a camera's (path, TF, placement) reads it from the frame itself;
    with a moving camera (a pan-tilt head) it is looked up at each image's own stamp.
    ``odometry_covariance`` is the 6x6 pose covariance of ``T_world_base`` at the image stamp, as
    nav_msgs/Odometry carries it (row-major x, y, z, rotX, rotY, rotZ, in the odometry frame), when
    the odometry has one and ``odometry.use_covariance`` is set; else None.
    :func:`mapany_ros.core.odometry.odometry_between_sigmas` turns two of them into pose-graph noise.
    """

    image: np.ndarray  # (H, W, 3) uint8 RGB
    stamp_ns: int
    camera: str
    frame_id: str
    camera_model: CameraModel
    T_world_camera: np.ndarray | None = None
    depth: np.ndarray | None = None
    T_world_base: np.ndarray | None = None
    T_base_camera: np.ndarray | None = None
    odometry_covariance: np.ndarray | None = None

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def key(self) -> tuple[str, int]:
        """Identity of a frame across windows: camera name and stamp."""
        return (self.camera, self.stamp_ns)
