"""mapany_node: the thin rclpy layer around the ROS-free pipeline.

Callbacks hand messages to :class:`~mapany_ros.ros.inputs.InputHandler` (conversion, checks,
pipeline); the backend runs on the pipeline's worker thread, which publishes what
:class:`~mapany_ros.ros.outputs.OutputBuilder` makes of each placed window. Time is the node's
ROS clock, so ``use_sim_time`` replay behaves as offline processing does. Bad input gets a
throttled warning naming what is wrong and is dropped; nothing else is lost.
"""

from __future__ import annotations

import difflib
import sys
import threading
import time
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from nav_msgs.msg import OccupancyGrid, Odometry, Path
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy_impl
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header
from std_srvs.srv import Trigger
from tf2_msgs.msg import TFMessage

from mapany_ros.core.backends import BackendError, make_backend
from mapany_ros.core.occupancy import grid_paths, write_nav2_map
from mapany_ros.core.pipeline import Pipeline, WindowResult
from mapany_ros.core.placement import PlacementStatus, TransformSmoother
from mapany_ros.ros import conversions as conv
from mapany_ros.ros.inputs import InputHandler
from mapany_ros.ros.outputs import OutputBuilder, depth_topics
from mapany_ros.ros.params import PARAMETERS, NodeConfig, ParameterError, validate

WARN_PERIOD_S = 5.0
#: Parameters rclpy itself declares or reads; never reported as unknown.
ROS_PARAMETERS = ("use_sim_time", "start_type_description_service", "qos_overrides.")


def input_qos(reliability: str, depth: int) -> QoSProfile:
    """Sensor-data style QoS (best effort, volatile) unless ``reliable`` is asked for."""
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=ReliabilityPolicy.RELIABLE if reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.VOLATILE,
    )


OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)
#: For what a late RViz or Foxglove should still get: the latest path (and map).
LATCHED_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
TF_STATIC_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE,
                           durability=DurabilityPolicy.TRANSIENT_LOCAL)


def _descriptor(p) -> ParameterDescriptor:
    """Description, range or choices, and read-only: the model is loaded with these values."""
    d = ParameterDescriptor(description=p.description, read_only=True)
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
        self._warn_unknown_overrides()
        self.config: NodeConfig = validate({p.name: self.get_parameter(p.name).value for p in PARAMETERS})
        self._warned: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._out_lock = threading.Lock()
        self._map_odom = TransformSmoother(self.config["tf.smoothing_s"])

        self.get_logger().info(f"loading backend {self.config['backend']!r} ...")
        t0 = time.perf_counter()
        self.backend = make_backend(self.config["backend"], self.config["device"], **self.config.backend_options)
        self.get_logger().info(f"backend {self.backend.name!r} ready in {time.perf_counter() - t0:.1f} s")
        self.pipeline = Pipeline(self.config.pipeline, self.backend, self._publish_result, self._on_backend_error,
                                 clock=self._now_ns, on_reset=self._on_reset)
        self.inputs = InputHandler(self.config, self.pipeline, self.warn)
        self.outputs = OutputBuilder(self.config)

        qos = input_qos(self.config["qos.reliability"], self.config["qos.depth"])
        self._pubs: dict[str, Any] = {}
        for cam in self.config.pipeline.cameras:
            if self.config["image_transport"] == "compressed":
                self.create_subscription(CompressedImage, f"{cam}/image_raw/compressed",
                                         lambda m, c=cam: self.inputs.on_compressed_image(c, m, self._now_ns()), qos)
            else:
                self.create_subscription(Image, f"{cam}/image_raw",
                                         lambda m, c=cam: self.inputs.on_image(c, m, self._now_ns()), qos)
            self.create_subscription(CameraInfo, f"{cam}/camera_info",
                                     lambda m, c=cam: self.inputs.on_camera_info(c, m), qos)
            if self.config["backend"] == "mapanything" and self.config["mapanything.use_depth"]:
                self.create_subscription(Image, f"{cam}/depth_prior",
                                         lambda m, c=cam: self.inputs.on_depth_prior(c, m), qos)
            topics = depth_topics(cam)
            self._pubs[topics["depth"]] = self.create_publisher(Image, topics["depth"], OUTPUT_QOS)
            self._pubs[topics["info"]] = self.create_publisher(CameraInfo, topics["info"], OUTPUT_QOS)
            self._pubs[topics["conf"]] = self.create_publisher(Image, topics["conf"], OUTPUT_QOS)
        if self.config["use_odometry"]:
            self.create_subscription(Odometry, "odom", self._on_odometry, qos)
        self.create_subscription(TFMessage, "/tf_static", self.inputs.on_tf_static, TF_STATIC_QOS)
        self._pubs["points"] = self.create_publisher(PointCloud2, "points", OUTPUT_QOS)
        self._pubs["path"] = self.create_publisher(Path, "path", LATCHED_QOS)
        self._pubs["/tf"] = self.tf_pub = self.create_publisher(TFMessage, "/tf", OUTPUT_QOS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", OUTPUT_QOS)
        if self.pipeline.map is not None:
            self.map_pub = self.create_publisher(PointCloud2, "map_points", LATCHED_QOS)
            self._map_published = -1
            self.create_timer(self.config["map.publish_period_s"], self._publish_map)
        if self.pipeline.grid is not None:
            self._start_grid()
        if self.pipeline.map is not None or self.pipeline.grid is not None:
            self.create_service(Trigger, "~/save_map", self._save_map)
        self.create_service(Trigger, "~/reset", self._reset)
        self._last_odom_ns: int | None = None
        self._last_counts = {"keyframes_skipped": 0, "windows_rejected": 0, "views_rejected": 0, "chain_breaks": 0,
                             "windows_failed": 0, "frames_dropped": 0}
        self._last_images: dict[str, int] = {}
        self._last_stats_ns = self._now_ns()
        #: Facts about the newest published window (scale, residual, backend timings).
        self._last_window: dict[str, object] = {}
        self.create_timer(0.1, self._on_timer)
        self.create_timer(self.config["stats_period_s"], self._log_stats)
        if self.config["use_odometry"]:
            self.create_timer(1.0 / self.config["tf.rate_hz"], self._publish_map_odom)
        self.pipeline.start()

    def _now_ns(self) -> int:
        """The node's ROS clock (sim time under use_sim_time)."""
        return self.get_clock().now().nanoseconds

    def _warn_unknown_overrides(self) -> None:
        """A misspelled override (``-p model.path:=...``) is ignored by rclpy: name it, and the nearest one."""
        declared = [p.name for p in PARAMETERS]
        for name in sorted(getattr(self, "_parameter_overrides", {})):
            if name in declared or name.startswith(ROS_PARAMETERS):
                continue
            near = difflib.get_close_matches(name, declared, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else "; `ros2 param list` shows the parameters"
            self.get_logger().warning(f"parameter {name!r} is not a parameter of mapany_node and is ignored{hint}")

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
    def _on_odometry(self, msg: Odometry) -> None:
        self._last_odom_ns = self._now_ns()
        self.inputs.on_odometry(msg)

    def _on_reset(self, reason: str) -> None:
        self.get_logger().warning(f"input restarted ({reason}): buffers, map and path reset")
        with self._out_lock:
            self.outputs.reset()
            self._map_odom.reset()

    def _on_timer(self) -> None:
        self.inputs.report(self.pipeline.poll())

    def _publish_map_odom(self) -> None:
        """map -> odom at a steady rate, stamped ahead (amcl / slam_toolbox style), gliding to each estimate."""
        now = self._now_ns()
        with self._out_lock:
            T = self._map_odom.value(now * 1e-9)
        if T is not None:
            self.tf_pub.publish(self.outputs.map_odom(T, now + int(self.config["tf.future_tolerance_s"] * 1e9)))

    def _publish_map(self) -> None:
        """The fused map, when it changed, at most every map.publish_period_s (transient local)."""
        voxel_map = self.pipeline.map
        assert voxel_map is not None
        version = voxel_map.keyframes_integrated + voxel_map.keyframes_reposed
        if version == self._map_published:
            return
        self._map_published = version
        xyz, rgb, confidence = voxel_map.points()
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id=self.config["map_frame"])
        self.map_pub.publish(conv.map_cloud(xyz, rgb, confidence, header))

    def _save_map(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        """The fused map as PLY at map.save_path, the occupancy grid beside it (same stem, .yaml + .pgm)."""
        voxel_map = self.pipeline.map
        path = self.config["map.save_path"]
        written = []
        try:
            if voxel_map is not None:
                written.append(f"{voxel_map.save_ply(path)} points to {path}")
            if self.pipeline.grid is not None:
                written.append(self._save_grid(path))
        except OSError as exc:
            response.success, response.message = False, f"cannot write {path}: {exc} (set map.save_path)"
            return response
        response.success, response.message = True, "wrote " + " and ".join(written)
        self.get_logger().info(response.message)
        return response

    def _reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        """Empty the map, the grid and the path and start a new map; the input keeps flowing."""
        self.pipeline.reset("~/reset service")
        if self.pipeline.map is not None:
            self.pipeline.map.reset()
            self._map_published = -1
        if self.pipeline.grid is not None:
            self.pipeline.grid.reset()
        response.success, response.message = True, "map and path reset; mapping continues"
        return response

    # ------------------------------------------------------------------ occupancy grid
    def _start_grid(self) -> None:
        """map_grid: the occupancy grid for Nav2, transient local, on change, at most every map.publish_period_s."""
        self.grid_pub = self.create_publisher(OccupancyGrid, "map_grid", LATCHED_QOS)
        self._grid_published = -1
        self.create_timer(self.config["map.publish_period_s"], self._publish_grid)

    def _publish_grid(self) -> None:
        grid = self.pipeline.grid
        assert grid is not None
        if grid.version == self._grid_published:
            return
        snapshot = grid.snapshot()
        self._grid_published = snapshot.version
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id=self.config["map_frame"])
        self.grid_pub.publish(conv.occupancy_grid(snapshot, header))

    def _save_grid(self, path: str) -> str:
        """The grid as a Nav2 map_server pair beside ``path``; says what it wrote."""
        grid = self.pipeline.grid
        assert grid is not None
        snapshot = grid.snapshot()
        yaml_path, pgm_path = write_nav2_map(grid_paths(path)[0], snapshot)
        return f"the occupancy grid ({snapshot.width} x {snapshot.height} cells) to {yaml_path} and {pgm_path}"

    def _on_backend_error(self, exc: Exception) -> None:
        self.warn(f"backend/{type(exc).__name__}", f"window not published: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ diagnostics
    def _log_stats(self) -> None:
        status = self.pipeline.status()
        now = self._now_ns()
        dt = max((now - self._last_stats_ns) * 1e-9, 1e-6)
        self._last_stats_ns = now
        new = {k: int(status[k]) - v for k, v in self._last_counts.items()}
        self._last_counts = {k: int(status[k]) for k in self._last_counts}
        rates = {cam: (self.inputs.images[cam] - self._last_images.get(cam, 0)) / dt
                 for cam in self.config.pipeline.cameras}
        self._last_images = dict(self.inputs.images)
        errors = [f"{new[k]} {k.replace('_', ' ')}" for k in ("windows_failed", "chain_breaks") if new[k] > 0]
        warnings = [f"{new[k]} {k.replace('_', ' ')}" for k in ("keyframes_skipped", "windows_rejected",
                                                               "views_rejected", "frames_dropped") if new[k] > 0]
        stale_s = self.config["diagnostics.stale_input_s"]
        for cam in self.config.pipeline.cameras:
            last = self.inputs.last_image_ns.get(cam)
            if last is None or (now - last) * 1e-9 > stale_s:
                warnings.append(f"no image from {cam} for {stale_s:g} s")
        if self.config["use_odometry"] and (self._last_odom_ns is None or (now - self._last_odom_ns) * 1e-9 > stale_s):
            warnings.append(f"no odometry for {stale_s:g} s")
        diag = DiagnosticStatus(name=f"{self.get_name()}: pipeline", hardware_id=self.backend.name)
        diag.level = DiagnosticStatus.ERROR if errors else DiagnosticStatus.WARN if warnings else DiagnosticStatus.OK
        diag.message = "; ".join(errors + warnings) if errors or warnings else "ok"
        values = {**status, **{f"input_rate_hz/{c}": f"{r:.2f}" for c, r in rates.items()}, **self._last_window}
        diag.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        self.diag_pub.publish(DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()), status=[diag]))
        s = self.pipeline.stats
        self.get_logger().info(
            f"in {', '.join(f'{c} {r:.1f}' for c, r in rates.items())} img/s, keyframes {s.keyframes} "
            f"(skipped {s.keyframes_skipped}), windows {s.windows_done} (failed {s.windows_failed}, rejected "
            f"{s.windows_rejected}), views rejected {s.views_rejected}, chain breaks {s.chain_breaks}, backend "
            f"{s.backend_time_s * 1e3:.0f} ms, placement {s.placement_time_s * 1e3:.0f} ms, latency "
            f"{s.latency_s * 1e3:.0f} ms, dropped frames {s.frames_dropped}"
            + (f", placement scale {self._last_window['last_placement_scale']}, residual "
               f"{self._last_window['last_placement_residual_m']} m" if self._last_window else "")
        )

    # ------------------------------------------------------------------ outputs (worker thread)
    def _publish_result(self, result: WindowResult) -> None:
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
        with self._out_lock:
            messages = self.outputs.window(result)
            if placement.T_map_odom is not None:
                self._map_odom.set_target(placement.T_map_odom)
        for topic, msg in messages:
            self._pubs[topic].publish(msg)

    def destroy_node(self) -> None:
        pipeline = getattr(self, "pipeline", None)  # absent when start-up failed before it was built
        if pipeline is not None:
            pipeline.stop()
        super().destroy_node()


RCLError = _rclpy_impl.RCLError


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
    except RCLError:
        # SIGINT shuts the context down from the signal handler; a spin that was between two waits
        # then fails to build its wait set. That is a normal shutdown, not a crash.
        if rclpy.ok():
            raise
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
