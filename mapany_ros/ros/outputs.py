"""What mapany_node publishes for each placed window, as messages: shared by the node and offline processing.

The node publishes these messages; ``mapany-ros process`` writes the very same ones to a bag, so
an offline run and a live replay cannot drift apart. Topic names are relative to the node's
namespace, as the node's publishers use them.

The builder has no lock and calls nothing that locks: the node guards it with its output lock
(a leaf) and publishes what it returns after releasing that lock.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from nav_msgs.msg import Path
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage

from mapany_ros.core.frames import CameraModel
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
        #: Without odometry: (child frame, T_odom_base) of the newest keyframe's chained estimate.
        self._latest_vo: tuple[str, np.ndarray] | None = None

    def reset(self) -> None:
        self._path.clear()
        self._latest_vo = None

    def window(self, result: WindowResult) -> list[tuple[str, Any]]:
        """(topic, message) for every output of ``result``, in publishing order."""
        cfg = self.config
        map_frame = cfg["map_frame"]
        out: list[tuple[str, Any]] = []
        transforms = []
        depth_only = result.depth_only_mask or [False] * len(result.frames)
        for frame, view, placed, depth in zip(result.frames, result.prediction.views, result.output_mask, depth_only,
                                              strict=True):
            if not (placed or depth):
                continue
            header = Header(stamp=conv.ns_to_stamp(frame.stamp_ns), frame_id=frame.frame_id)
            topics = depth_topics(frame.camera)
            # The depth lies on the camera's own (possibly distorted) grid, scaled to the output size:
            # the distortion coefficients hold in normalised coordinates, K is the output grid's.
            cam = frame.camera_model
            grid = view.camera if view.camera is not None else CameraModel(
                view.width, view.height, view.K, cam.distortion_model, cam.D)
            out.append((topics["depth"], conv.depth_to_image_msg(view.depth.detach().float().cpu().numpy(), header)))
            out.append((topics["info"], conv.model_to_camera_info(grid, header)))
            out.append((topics["conf"], conv.float_image_msg(view.confidence.detach().float().cpu().numpy(), header)))
            if not placed:  # depth in its own camera frame is right; its place in the map is not known
                continue
            valid = view.valid & torch.isfinite(view.depth)
            out.append(("points", conv.pointcloud2_from_points(
                view.points_world[valid], view.colors[valid], Header(stamp=header.stamp, frame_id=map_frame))))
        if not cfg["use_odometry"] and result.placement.visual_odometry:  # as a visual odometry publishes it
            first = result.frames[0]
            child = cfg["base_frame"] if first.T_base_camera is not None else first.frame_id
            for stamp, T_odom_base in sorted(result.placement.visual_odometry.items()):
                transforms.append(conv.matrix_to_transform_stamped(T_odom_base, cfg["odom_frame"], child, stamp))
            self._latest_vo = (child, T_odom_base)
        # The base of every keyframe group the graph placed or moved, this window's and earlier ones.
        self._path.update(result.placement.corrections)
        while len(self._path) > cfg["path.max_poses"]:
            del self._path[min(self._path)]
        if transforms:
            out.append(("/tf", TFMessage(transforms=transforms)))
        if (any(result.output_mask) or result.placement.corrections) and self._path:
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
        """map -> odom at ``stamp_ns``; without odometry also the newest chained odom -> base, so that
        map -> base_link resolves at that stamp too."""
        cfg = self.config
        transforms = [conv.matrix_to_transform_stamped(T_map_odom, cfg["map_frame"], cfg["odom_frame"], stamp_ns)]
        if self._latest_vo is not None:
            child, T_odom_base = self._latest_vo
            transforms.append(conv.matrix_to_transform_stamped(T_odom_base, cfg["odom_frame"], child, stamp_ns))
        return TFMessage(transforms=transforms)
