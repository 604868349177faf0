"""What mapany_node publishes for each placed window, as messages: shared by the node and offline processing.

The node publishes these messages; ``mapany-ros process`` writes the very same ones to a bag, so
an offline run and a live replay cannot drift apart. Topic names are relative to the node's
namespace, as the node's publishers use them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from nav_msgs.msg import Path
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage

from mapany_ros.core.frames import CameraModel
from mapany_ros.core.geometry import invert
from mapany_ros.core.pipeline import WindowResult
from mapany_ros.ros import conversions as conv
from mapany_ros.ros.params import NodeConfig


def depth_topics(camera: str) -> dict[str, str]:
    return {"depth": f"{camera}/depth", "info": f"{camera}/depth/camera_info", "conf": f"{camera}/confidence"}


class OutputBuilder:
    """Depth, depth camera_info, confidence, points, path and TF of each window; keeps the path."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        #: Path poses by image stamp, so pose-graph corrections can move earlier ones.
        self._path: dict[int, np.ndarray] = {}

    def reset(self) -> None:
        self._path.clear()

    def window(self, result: WindowResult) -> list[tuple[str, Any]]:
        """(topic, message) for every output of ``result``, in publishing order."""
        cfg = self.config
        map_frame = cfg["map_frame"]
        out: list[tuple[str, Any]] = []
        transforms = []
        # The path follows each group's first camera: a group may lack a camera that went silent.
        firsts, i = set(), 0
        for group in result.window.groups:
            firsts.add(i)
            i += len(group)
        for k, (frame, view, emit) in enumerate(zip(result.frames, result.prediction.views, result.output_mask,
                                                    strict=True)):
            if not emit:
                continue
            header = Header(stamp=conv.ns_to_stamp(frame.stamp_ns), frame_id=frame.frame_id)
            topics = depth_topics(frame.camera)
            # The depth lies on the camera's own (possibly distorted) grid, scaled to the output size:
            # the distortion coefficients hold in normalised coordinates, K is the output grid's.
            cam = frame.camera_model
            grid = CameraModel(view.width, view.height, view.K, cam.distortion_model, cam.D)
            out.append((topics["depth"], conv.depth_to_image_msg(view.depth.detach().float().cpu().numpy(), header)))
            out.append((topics["info"], conv.model_to_camera_info(grid, header)))
            out.append((topics["conf"], conv.float_image_msg(view.confidence.detach().float().cpu().numpy(), header)))
            valid = view.valid & torch.isfinite(view.depth)
            out.append(("points", conv.pointcloud2_from_points(
                view.points_world[valid], view.colors[valid], Header(stamp=header.stamp, frame_id=map_frame))))
            T_base_cam = frame.T_base_camera
            T_map_body = view.T_world_camera @ invert(T_base_cam) if T_base_cam is not None else view.T_world_camera
            if k in firsts:
                self._path[frame.stamp_ns] = T_map_body
                if not cfg["use_odometry"]:
                    child = cfg["base_frame"] if T_base_cam is not None else frame.frame_id
                    transforms.append(conv.matrix_to_transform_stamped(T_map_body, map_frame, child, frame.stamp_ns))
        for stamp, T_map_base in result.placement.corrections.items():  # the pose graph moved earlier keyframes
            if stamp in self._path:
                self._path[stamp] = T_map_base
        while len(self._path) > cfg["path.max_poses"]:
            del self._path[min(self._path)]
        if transforms:
            out.append(("/tf", TFMessage(transforms=transforms)))
        if any(result.output_mask) and self._path:
            out.append(("path", self.path()))
        return out

    @property
    def has_path(self) -> bool:
        return bool(self._path)

    def path_stamps(self) -> list[int]:
        return sorted(self._path)

    def path(self) -> Path:
        stamps = sorted(self._path)
        map_frame = self.config["map_frame"]
        msg = Path(poses=[conv.pose_stamped(self._path[s], map_frame, s) for s in stamps])
        msg.header = Header(stamp=conv.ns_to_stamp(stamps[-1]), frame_id=map_frame)
        return msg

    def map_odom(self, T_map_odom: np.ndarray, stamp_ns: int) -> TFMessage:
        return TFMessage(transforms=[conv.matrix_to_transform_stamped(
            T_map_odom, self.config["map_frame"], self.config["odom_frame"], stamp_ns)])
