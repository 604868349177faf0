"""mapany_node: the thin rclpy layer around the ROS-free pipeline.

Callbacks only convert messages and hand them to :class:`~mapany_ros.core.pipeline.Pipeline`;
the backend runs on the pipeline's worker thread, which also publishes the results. Bad input
gets a throttled warning naming what is wrong and is dropped; nothing else is lost.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from typing import Any

import numpy as np
import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from nav_msgs.msg import Odometry, Path
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage

from mapany_ros.core.backends import BackendError, make_backend
from mapany_ros.core.frames import CameraModel, Frame
from mapany_ros.core.geometry import invert
from mapany_ros.core.pipeline import FrameStatus, Pipeline, WindowResult
from mapany_ros.core.placement import PlacementStatus, TransformSmoother
from mapany_ros.ros import conversions as conv
from mapany_ros.ros.params import PARAMETERS, NodeConfig, ParameterError, validate
from mapany_ros.ros.static_tf import StaticTransforms

WARN_PERIOD_S = 5.0


def input_qos(reliability: str, depth: int) -> QoSProfile:
    """Sensor-data style QoS (best effort, volatile) unless ``reliable`` is asked for."""
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=ReliabilityPolicy.RELIABLE if reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.VOLATILE,
    )


OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)
TF_STATIC_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)


def _descriptor(p) -> ParameterDescriptor:
    d = ParameterDescriptor(description=p.description)
    if p.choices:
        d.additional_constraints = "one of: " + ", ".join(p.choices)
    if p.low is not None:
        if isinstance(p.default, int) and not isinstance(p.default, bool):
            d.integer_range = [IntegerRange(from_value=int(p.low), to_value=int(p.high), step=1)]
        else:
            d.floating_point_range = [FloatingPointRange(from_value=float(p.low), to_value=float(p.high))]
    return d


class MapanyNode(Node):
    """Subscribes camera images, camera_info, odometry and /tf_static; publishes depth, points, path, TF."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("mapany_node", **kwargs)
        for p in PARAMETERS:
            self.declare_parameter(p.name, p.default, _descriptor(p))
        values = {p.name: self.get_parameter(p.name).value for p in PARAMETERS}
        self.config: NodeConfig = validate(values)
        # Everything is read once at start (the model is loaded with it): refuse changes at run time
        # instead of silently ignoring them.
        self.add_on_set_parameters_callback(self._refuse_parameter_changes)
        self._warned: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._models: dict[str, CameraModel] = {}
        #: Recent registered depth images per camera, matched to colour images by stamp.
        self._depth_priors: dict[str, collections.deque[tuple[int, np.ndarray]]] = {}
        #: Path poses by image stamp, so pose-graph corrections can move earlier ones.
        self._path: dict[int, np.ndarray] = {}
        self._out_lock = threading.Lock()
        self._map_odom = TransformSmoother(self.config["tf.smoothing_s"])
        self._static_tf = StaticTransforms()
        self._last_stats = (time.monotonic(), 0, 0)

        self.get_logger().info(f"loading backend {self.config['backend']!r} ...")
        t0 = time.perf_counter()
        self.backend = make_backend(self.config["backend"], self.config["device"], **self.config.backend_options)
        self.get_logger().info(f"backend {self.backend.name!r} ready in {time.perf_counter() - t0:.1f} s")
        self.pipeline = Pipeline(self.config.pipeline, self.backend, self._publish_result, self._on_backend_error)

        qos = input_qos(self.config["qos.reliability"], self.config["qos.depth"])
        self._pubs: dict[str, dict[str, Any]] = {}
        for cam in self.config.pipeline.cameras:
            self.create_subscription(Image, f"{cam}/image_raw", lambda m, c=cam: self._on_image(c, m), qos)
            self.create_subscription(CameraInfo, f"{cam}/camera_info", lambda m, c=cam: self._on_info(c, m), qos)
            if self.config["backend"] == "mapanything" and self.config["mapanything.use_depth"]:
                self._depth_priors[cam] = collections.deque(maxlen=10)
                self.create_subscription(Image, f"{cam}/depth_prior", lambda m, c=cam: self._on_depth_prior(c, m), qos)
            self._pubs[cam] = {
                "depth": self.create_publisher(Image, f"{cam}/depth", OUTPUT_QOS),
                "info": self.create_publisher(CameraInfo, f"{cam}/depth/camera_info", OUTPUT_QOS),
                "conf": self.create_publisher(Image, f"{cam}/confidence", OUTPUT_QOS),
            }
        if self.config["use_odometry"]:
            self.create_subscription(Odometry, "odom", self._on_odom, qos)
        self.create_subscription(TFMessage, "/tf_static", self._on_tf_static, TF_STATIC_QOS)
        self.points_pub = self.create_publisher(PointCloud2, "points", OUTPUT_QOS)
        self.path_pub = self.create_publisher(Path, "path", OUTPUT_QOS)
        self.tf_pub = self.create_publisher(TFMessage, "/tf", OUTPUT_QOS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", OUTPUT_QOS)
        self._last_counts = {"keyframes_skipped": 0, "windows_rejected": 0, "views_rejected": 0, "chain_breaks": 0,
                             "windows_failed": 0}
        #: Facts about the newest published window (scale, alignment residual, backend timings).
        self._last_window: dict[str, object] = {}
        self.create_timer(0.1, self._on_timer)
        self.create_timer(self.config["stats_period_s"], self._log_stats)
        if self.config["use_odometry"]:
            self.create_timer(1.0 / self.config["tf.rate_hz"], self._publish_map_odom)
        self.pipeline.start()

    def _refuse_parameter_changes(self, params: list) -> SetParametersResult:
        names = ", ".join(p.name for p in params)
        reason = f"{names}: mapany_node reads its parameters at start; restart it to change them"
        return SetParametersResult(successful=False, reason=reason)

    # ------------------------------------------------------------------ warnings
    def warn(self, key: str, message: str) -> None:
        """A warning at most once per WARN_PERIOD_S for each ``key``, counting what it swallowed."""
        now = time.monotonic()
        if now - self._warned.get(key, -1e9) < WARN_PERIOD_S:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        extra = self._suppressed.pop(key, 0)
        self._warned[key] = now
        self.get_logger().warning(message + (f" ({extra} more since last warning)" if extra else ""))

    # ------------------------------------------------------------------ callbacks
    def _on_info(self, cam: str, msg: CameraInfo) -> None:
        try:
            self._models[cam] = conv.camera_info_to_model(msg)
        except conv.ConversionError as exc:
            self.warn(f"info/{cam}", f"{cam}/camera_info dropped: {exc}")

    def _on_depth_prior(self, cam: str, msg: Image) -> None:
        try:
            depth = conv.depth_image_to_array(msg)
        except conv.ConversionError as exc:
            self.warn(f"depth_prior/{cam}", f"{cam}/depth_prior dropped: {exc}")
            return
        self._depth_priors[cam].append((conv.stamp_to_ns(msg.header.stamp), depth))

    def _matching_depth(self, cam: str, stamp_ns: int, size: tuple[int, int]) -> np.ndarray | None:
        """The registered depth image with the colour image's stamp (within sync tolerance), if any."""
        tol = int(self.config["sync.tolerance_s"] * 1e9)
        for t, depth in reversed(self._depth_priors.get(cam, ())):
            if abs(t - stamp_ns) <= tol:
                if depth.shape != (size[1], size[0]):
                    self.warn(f"depth_prior_size/{cam}", f"{cam}/depth_prior is {depth.shape[1]}x{depth.shape[0]}, "
                              f"image is {size[0]}x{size[1]}: depth must be registered to the colour camera")
                    return None
                return depth
        return None

    def _on_tf_static(self, msg: TFMessage) -> None:
        try:
            self._static_tf.add(msg)
        except conv.ConversionError as exc:
            self.warn("tf_static", f"/tf_static transform dropped: {exc}")
        for cam in self.config.pipeline.cameras:
            frame_id = self._static_tf.camera_frames.get(cam)
            if frame_id is None:
                continue
            T = self._static_tf.lookup(self.config["base_frame"], frame_id)
            if T is not None:
                self.pipeline.set_extrinsic(cam, T)

    def _on_odom(self, msg: Odometry) -> None:
        try:
            T = conv.odometry_to_matrix(msg)
            statuses = self.pipeline.add_odometry(conv.stamp_to_ns(msg.header.stamp), T)
        except (conv.ConversionError, ValueError) as exc:
            self.warn("odom", f"odom message dropped: {exc}")
            return
        self._report(statuses)

    def _on_image(self, cam: str, msg: Image) -> None:
        model = self._models.get(cam)
        if model is None:
            self.warn(f"noinfo/{cam}", f"{cam}/image_raw dropped: no {cam}/camera_info received yet")
            return
        try:
            rgb = conv.image_to_rgb(msg)
        except conv.ConversionError as exc:
            self.warn(f"image/{cam}", f"{cam}/image_raw dropped: {exc}")
            return
        if (msg.width, msg.height) != (model.width, model.height):
            self.warn(f"size/{cam}", f"{cam}/image_raw dropped: image is {msg.width}x{msg.height} but "
                      f"{cam}/camera_info says {model.width}x{model.height}")
            return
        if not msg.header.frame_id:
            self.warn(f"frame/{cam}", f"{cam}/image_raw dropped: empty header.frame_id")
            return
        self._static_tf.camera_frames[cam] = msg.header.frame_id
        if self.config["use_odometry"] and self.pipeline.extrinsic(cam) is None:
            T = self._static_tf.lookup(self.config["base_frame"], msg.header.frame_id)
            if T is not None:
                self.pipeline.set_extrinsic(cam, T)
        stamp = conv.stamp_to_ns(msg.header.stamp)
        frame = Frame(rgb, stamp, cam, msg.header.frame_id, model,
                      depth=self._matching_depth(cam, stamp, (model.width, model.height)))
        status, reset = self.pipeline.add_frame(frame)
        if reset:
            self.get_logger().warning(f"{cam}/image_raw stamp went backwards (bag loop or restart): buffers reset")
            with self._out_lock:
                self._path.clear()
                self._map_odom.reset()
        if status is FrameStatus.DROPPED_NO_EXTRINSIC:
            self.warn(f"extrinsic/{cam}", f"{cam}/image_raw dropped: no transform {self.config['base_frame']} -> "
                      f"{msg.header.frame_id} on /tf_static yet (needed with use_odometry)")
        else:
            self._report([status])

    def _report(self, statuses: list[FrameStatus]) -> None:
        for s in statuses:
            if s not in (FrameStatus.ACCEPTED, FrameStatus.WAITING):
                self.warn(f"status/{s.name}", f"image dropped: {s.value}")

    def _on_timer(self) -> None:
        self._report(self.pipeline.poll())

    def _publish_map_odom(self) -> None:
        """map -> odom at a steady rate, stamped ahead (amcl / slam_toolbox style), gliding to each estimate."""
        now = self.get_clock().now()
        with self._out_lock:
            T = self._map_odom.value(now.nanoseconds * 1e-9)
        if T is None:
            return
        stamp = now.nanoseconds + int(self.config["tf.future_tolerance_s"] * 1e9)
        self.tf_pub.publish(TFMessage(transforms=[conv.matrix_to_transform_stamped(
            T, self.config["map_frame"], self.config["odom_frame"], stamp)]))

    def _on_backend_error(self, exc: Exception) -> None:
        self.warn(f"backend/{type(exc).__name__}", f"window not published: {type(exc).__name__}: {exc}")

    def _log_stats(self) -> None:
        status = self.pipeline.status()
        diag = DiagnosticStatus(name=f"{self.get_name()}: pipeline", hardware_id=self.backend.name)
        new = {k: int(status[k]) - v for k, v in self._last_counts.items()}
        self._last_counts = {k: int(status[k]) for k in self._last_counts}
        problems = [f"{n} {k.replace('_', ' ')}" for k, n in new.items() if n > 0]
        diag.level = DiagnosticStatus.WARN if problems else DiagnosticStatus.OK
        diag.message = "since last report: " + ", ".join(problems) if problems else "ok"
        diag.values = [KeyValue(key=k, value=str(v)) for k, v in {**status, **self._last_window}.items()]
        self.diag_pub.publish(DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()), status=[diag]))
        s = self.pipeline.stats
        now = time.monotonic()
        t, frames, windows = self._last_stats
        dt = max(now - t, 1e-6)
        self._last_stats = (now, s.frames_in, s.windows_done)
        self.get_logger().info(
            f"in {(s.frames_in - frames) / dt:.1f} img/s, {(s.windows_done - windows) / dt:.2f} windows/s, "
            f"backend {s.backend_time_s * 1e3:.0f} ms, latency {s.latency_s * 1e3:.0f} ms, keyframes {s.keyframes}, "
            f"dropped frames {s.frames_dropped}, keyframes skipped {s.keyframes_skipped}, windows failed "
            f"{s.windows_failed} rejected {s.windows_rejected}, views rejected {s.views_rejected}, chain breaks "
            f"{s.chain_breaks}"
            + (f", metric scale {self._last_window['last_metric_scale']}, placement scale "
               f"{self._last_window['last_placement_scale']}, residual "
               f"{self._last_window['last_placement_residual_m']} m" if self._last_window else "")
        )

    # ------------------------------------------------------------------ outputs (worker thread)
    def _publish_result(self, result: WindowResult) -> None:
        with self._out_lock:
            self._publish_locked(result)

    def _publish_locked(self, result: WindowResult) -> None:
        pred, placement = result.prediction, result.placement
        self._last_window = {
            "last_window_views": len(pred.views),
            "last_metric_scale": "n/a" if pred.metric_scale is None else f"{pred.metric_scale:.4f}",
            "last_placement": placement.status.name.lower(),
            "last_placement_scale": f"{placement.scale:.4f}",
            "last_placement_residual_m": "n/a" if placement.residual_m is None else f"{placement.residual_m:.4f}",
            **{f"last_{k}_ms": f"{v * 1e3:.1f}" for k, v in pred.timings_s.items()},
            "last_placement_ms": f"{self.pipeline.stats.placement_time_s * 1e3:.1f}",
        }
        if placement.status is PlacementStatus.RELOCALISED:
            self.get_logger().error(f"map chain broken ({placement.message}): continued from the last placed pose")
        map_frame = self.config["map_frame"]
        transforms = []
        for frame, view, out in zip(result.frames, pred.views, result.output_mask, strict=True):
            if not out:
                continue
            header = Header(stamp=conv.ns_to_stamp(frame.stamp_ns), frame_id=frame.frame_id)
            pubs = self._pubs[frame.camera]
            depth = view.depth.detach().float().cpu().numpy()
            pubs["depth"].publish(conv.depth_to_image_msg(depth, header))
            pubs["info"].publish(conv.model_to_camera_info(
                CameraModel(view.width, view.height, view.K, "plumb_bob", np.zeros(5)), header))
            pubs["conf"].publish(conv.float_image_msg(view.confidence.detach().float().cpu().numpy(), header))
            valid = view.valid & torch.isfinite(view.depth)
            cloud = conv.pointcloud2_from_points(
                view.points_world[valid], view.colors[valid], Header(stamp=header.stamp, frame_id=map_frame))
            self.points_pub.publish(cloud)
            T_base_cam = self.pipeline.extrinsic(frame.camera)
            T_map_body = view.T_world_camera @ invert(T_base_cam) if T_base_cam is not None else view.T_world_camera
            if frame.camera == self.config.pipeline.cameras[0]:
                self._path[frame.stamp_ns] = T_map_body
                if not self.config["use_odometry"]:
                    child = self.config["base_frame"] if T_base_cam is not None else frame.frame_id
                    transforms.append(conv.matrix_to_transform_stamped(T_map_body, map_frame, child, frame.stamp_ns))
        for stamp, T_map_base in placement.corrections.items():  # the pose graph moved earlier keyframes
            if stamp in self._path:
                self._path[stamp] = T_map_base
        if placement.T_map_odom is not None:
            self._map_odom.set_target(placement.T_map_odom)
        if transforms:
            self.tf_pub.publish(TFMessage(transforms=transforms))
        if any(result.output_mask):
            self.path_pub.publish(self._path_msg())

    def _path_msg(self) -> Path:
        stamps = sorted(self._path)
        msg = Path(poses=[conv.pose_stamped(self._path[s], self.config["map_frame"], s) for s in stamps])
        msg.header = Header(stamp=conv.ns_to_stamp(stamps[-1]), frame_id=self.config["map_frame"])
        return msg

    def destroy_node(self) -> None:
        pipeline = getattr(self, "pipeline", None)  # absent when start-up failed before it was built
        if pipeline is not None:
            pipeline.stop()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """Console entry point: ``ros2 run mapany_ros mapany_node``."""
    rclpy.init(args=args)
    try:
        node = MapanyNode()
    except (ParameterError, BackendError) as exc:  # one clear message, no second traceback
        rclpy.logging.get_logger("mapany_node").fatal(str(exc))
        rclpy.try_shutdown()
        return 2
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
