"""mapany_node: the thin rclpy layer around the ROS-free pipeline, as a managed (lifecycle) node.

Callbacks hand messages to :class:`~mapany_ros.ros.inputs.InputHandler` (conversion, checks,
pipeline); the backend runs on the pipeline's worker thread, which publishes what
:class:`~mapany_ros.ros.outputs.OutputBuilder` makes of each placed window; the fused map and the
occupancy grid are packed and published off the executor by
:class:`~mapany_ros.ros.map_publisher.MapPublisher`. Time is the node's ROS clock, so
``use_sim_time`` replay behaves as offline processing does. Bad input gets a throttled warning
naming what is wrong and is dropped; nothing else is lost.

Lifecycle (rclpy's ``LifecycleNode``, as Nav2's nodes): parameters are declared at construction;
*configure* validates them, loads the backend (and the saved map of ``map.load_path``) and builds
pipeline, subscriptions, publishers and services; *activate* starts the timers and the publishing,
and takes images and odometry; *deactivate* publishes nothing more and drops images, odometry and
/tf (camera_info and /tf_static are still taken: they describe the robot, and /tf_static is sent
once); *cleanup* stops the worker and releases backend, map and every entity, and memory is given
back; *shutdown* does the same and lets :func:`main` exit 0, as SIGINT and SIGTERM do (read between
two waits, see :class:`StopSignals`). With ``autostart`` (the default) the node configures and
activates itself.

Threads and locks. The executor runs the callbacks, timers, services and transitions (one mutually
exclusive callback group); the pipeline's worker runs ``_publish_result``, ``_on_backend_error``
and, like any caller of ``Pipeline.reset``, ``_on_reset``; the map publisher's thread calls the map
layers' ``version`` and ``build`` (map_points, map_grid). Every lock is a leaf - no lock is held while
another component is called:

* ``_out_lock`` guards what the outputs remember (the path, map -> odom, the output generation);
  under it only the output builder and the transform smoother run, both pure, and messages are
  published after it is released;
* ``_warn_lock`` guards the warning throttle; the logger is called after it is released;
* the pipeline's, the voxel map's, the occupancy grid's and the map publisher's own locks (see their
  modules). The voxel map's lock is held while the map is packed (a second or more at 2 M voxels),
  the grid's while it is read (pending corrections applied), and a map save is written by the
  pipeline's worker between two jobs (placement is the worker's), so ``~/reset`` and ``~/save_map``
  (callback groups of their own) await them on a thread of their own and the executor goes on
  meanwhile.

A reset and a result may race (the pipeline announces both after releasing its lock): every result
carries the pipeline generation it belongs to, and the outputs drop a stale one and start afresh on a
newer one, whichever is announced first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import difflib
import gc
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from nav_msgs.msg import OccupancyGrid, Odometry, Path
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy_impl
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from rclpy.task import Future
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header
from std_srvs.srv import Trigger
from tf2_msgs.msg import TFMessage

from mapany_ros.core.backends import BackendError, make_backend
from mapany_ros.core.pipeline import Pipeline, WindowResult
from mapany_ros.core.placement import PlacementStatus, TransformSmoother
from mapany_ros.ros import conversions as conv
from mapany_ros.ros.inputs import InputHandler
from mapany_ros.ros.map_publisher import MapPublisher
from mapany_ros.ros.outputs import OutputBuilder, depth_topics
from mapany_ros.ros.params import PARAMETERS, NodeConfig, ParameterError, validate

WARN_PERIOD_S = 5.0
#: Parameters rclpy itself declares or reads; never reported as unknown.
ROS_PARAMETERS = ("use_sim_time", "start_type_description_service", "qos_overrides.")
SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE


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
#: As tf2's listener subscribes /tf.
TF_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE,
                    durability=DurabilityPolicy.VOLATILE)
#: Services keep every request: with the default depth of 10, calls that arrive while one waits
#: for the worker or the voxel map would be dropped by DDS and their callers left waiting forever.
SERVICE_QOS = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)


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


def _give_memory_back() -> None:
    """Free what was released: Python's cycles, torch's CUDA cache, and glibc's free heap pages."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    libc = ctypes.util.find_library("c")
    if libc:
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)  # glibc only
        if trim is not None:
            trim(0)


class MapanyNode(LifecycleNode):
    """Subscribes camera images, camera_info, odometry, /tf_static and /tf; publishes depth, points, path, TF, map."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("mapany_node", **kwargs)
        for p in PARAMETERS:
            self.declare_parameter(p.name, p.default, _descriptor(p))
        self._warn_unknown_overrides()
        self._warned: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._warn_lock = threading.Lock()
        self._out_lock = threading.Lock()
        #: Done once the node is shut down (the shutdown transition): main() then exits 0.
        self.finished: Future = Future()
        self.config: NodeConfig | None = None
        self.backend: Any = None
        self.pipeline: Pipeline | None = None
        self.inputs: InputHandler | None = None
        self.outputs: OutputBuilder | None = None
        self.map_publisher: MapPublisher | None = None
        self._active = False
        self._entities: list[Any] = []  # subscriptions and services of the configured node
        self._timers: list[Any] = []  # of the active node
        self._pubs: dict[str, Any] = {}
        #: Why the last configure failed (None after a good one).
        self.configure_error: Exception | None = None
        self._autostarting = False
        if self.get_parameter("autostart").value:
            self._autostart()

    def _autostart(self) -> None:
        """Configure and activate now; a failure raises (main prints one FATAL line and exits 2)."""
        self._autostarting = True
        try:
            if self.trigger_configure() != SUCCESS:
                raise self.configure_error or RuntimeError("configure failed")
            if self.trigger_activate() != SUCCESS:
                raise RuntimeError("activate failed")
        except BaseException:
            self.destroy_node()
            raise
        finally:
            self._autostarting = False

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

    # ------------------------------------------------------------------ lifecycle transitions
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Validate the parameters, load the backend, build pipeline, subscriptions, publishers, services."""
        try:
            self._configure()
        except Exception as exc:  # stays unconfigured; the reason is logged (or raised by autostart)
            self.configure_error = exc
            self._release()
            if not self._autostarting:
                kind = "" if isinstance(exc, ParameterError | BackendError) else f"{type(exc).__name__}: "
                self.get_logger().error(f"configure failed, still unconfigured: {kind}{exc}")
            return FAILURE
        self.configure_error = None
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Publishers on, timers started, images and odometry taken."""
        result = super().on_activate(state)  # the lifecycle publishers first: a result may come at once
        if result != SUCCESS:
            return result
        config = self.config
        assert config is not None and self.pipeline is not None
        self._last_stats_ns = self._now_ns()
        self._timers = [self.create_timer(0.1, self._on_timer),
                        self.create_timer(config["stats_period_s"], self._log_stats)]
        # with odometry map -> odom; without, also the chained odom -> base (the node is its own odometry)
        self._timers.append(self.create_timer(1.0 / config["tf.rate_hz"], self._publish_map_odom))
        if self.map_publisher is not None:
            self.map_publisher.resume()
            self.map_publisher.start()
        self._active = True
        self.get_logger().info("active")
        return SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Nothing is published any more; images and odometry are dropped. Map and path are kept."""
        self._active = False
        for timer in self._timers:
            self.destroy_timer(timer)
        self._timers = []
        if self.map_publisher is not None and not self.map_publisher.pause():
            self.get_logger().warning("the map publisher did not finish its publish in time")
        result = super().on_deactivate(state)  # lifecycle publishers drop whatever the worker still sends
        self.get_logger().info("inactive")
        return result

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Back to unconfigured: worker stopped, backend, map and every entity released, memory given back."""
        self._release()
        self.get_logger().info("cleaned up: backend and map released")
        return SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release everything; main() exits 0 once the transition has been answered."""
        self._active = False
        self._release()
        if not self.finished.done():
            self.finished.set_result(True)
        return SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """A transition raised: release what was built and go back to unconfigured."""
        self.get_logger().error(f"transition from {state.label} failed: releasing everything, back to unconfigured")
        self._active = False
        self._release()
        return SUCCESS

    def _configure(self) -> None:
        self.config = config = validate({p.name: self.get_parameter(p.name).value for p in PARAMETERS})
        self._out_generation = 0  # the pipeline generation the outputs (path, map -> odom) belong to
        self._map_odom = TransformSmoother(config["tf.smoothing_s"])
        self._restart_map_odom()
        self._map_resets = 0
        self.get_logger().info(f"loading backend {config['backend']!r} ...")
        t0 = time.perf_counter()
        self.backend = make_backend(config["backend"], config["device"], **config.backend_options)
        self.get_logger().info(f"backend {self.backend.name!r} ready in {time.perf_counter() - t0:.1f} s")
        self.pipeline = Pipeline(config.pipeline, self.backend, self._publish_result, self._on_backend_error,
                                 clock=self._now_ns, on_reset=self._on_reset)
        if config["map.load_path"]:
            try:
                n = self.pipeline.load_map(config["map.load_path"])
            except (OSError, ValueError) as exc:
                raise ParameterError(f"map.load_path = {config['map.load_path']!r}: {exc}") from exc
            only = "" if config["map.update"] else ", localisation only"
            self.get_logger().info(f"loaded {n} keyframes from {config['map.load_path']}: relocalising "
                                   f"(nothing is placed until then){only}")
        self.inputs = InputHandler(config, self.pipeline, self.warn)
        self.outputs = OutputBuilder(config)

        qos = input_qos(config["qos.reliability"], config["qos.depth"])
        subscribe = self._entities.append
        for cam in config.pipeline.cameras:
            if config["image_transport"] == "compressed":
                subscribe(self.create_subscription(CompressedImage, f"{cam}/image_raw/compressed",
                                                   lambda m, c=cam: self._on_compressed_image(c, m), qos))
            else:
                subscribe(self.create_subscription(Image, f"{cam}/image_raw", lambda m, c=cam: self._on_image(c, m),
                                                   qos))
            subscribe(self.create_subscription(CameraInfo, f"{cam}/camera_info",
                                               lambda m, c=cam: self.inputs.on_camera_info(c, m), qos))
            if config["backend"] == "mapanything" and config["mapanything.use_depth"]:
                subscribe(self.create_subscription(Image, f"{cam}/depth_prior",
                                                   lambda m, c=cam: self._on_depth_prior(c, m), qos))
            topics = depth_topics(cam)
            self._publisher(Image, topics["depth"], OUTPUT_QOS)
            self._publisher(CameraInfo, topics["info"], OUTPUT_QOS)
            self._publisher(Image, topics["conf"], OUTPUT_QOS)
        if config["use_odometry"] and config["odometry.source"] == "topic":
            subscribe(self.create_subscription(Odometry, "odom", self._on_odometry, qos))
        # Callbacks reach the handler through the node: a destroyed subscription the executor still
        # holds for a moment must not keep the pipeline (and the model) alive after cleanup.
        subscribe(self.create_subscription(TFMessage, "/tf_static", lambda m: self.inputs.on_tf_static(m),
                                           TF_STATIC_QOS))
        subscribe(self.create_subscription(TFMessage, "/tf", self._on_tf, TF_QOS))
        self._publisher(PointCloud2, "points", OUTPUT_QOS)
        self._publisher(Path, "path", LATCHED_QOS)
        self._publisher(TFMessage, "/tf", OUTPUT_QOS)
        self._publisher(DiagnosticArray, "/diagnostics", OUTPUT_QOS)
        if self.pipeline.map is not None or self.pipeline.grid is not None:
            self.map_publisher = MapPublisher(self.get_name(), self.get_namespace(), config["map.publish_period_s"],
                                              lambda message: self.warn("map_publisher", message))
        if self.pipeline.map is not None:
            self.map_publisher.add_layer(self.resolve_topic_name("map_points"), PointCloud2, LATCHED_QOS,
                                         self._map_version, self._build_map)
        if self.pipeline.grid is not None:
            self.map_publisher.add_layer(self.resolve_topic_name("map_grid"), OccupancyGrid, LATCHED_QOS,
                                         self._grid_version, self._build_grid)
        # Groups of their own: while one awaits the worker or the voxel map, the other callbacks go on.
        subscribe(self.create_service(Trigger, "~/save_map", self._save_map, qos_profile=SERVICE_QOS,
                                      callback_group=MutuallyExclusiveCallbackGroup()))
        subscribe(self.create_service(Trigger, "~/reset", self._reset, qos_profile=SERVICE_QOS,
                                      callback_group=MutuallyExclusiveCallbackGroup()))
        self._last_odom_ns: int | None = None
        self._last_counts = {"keyframes_skipped": 0, "windows_rejected": 0, "views_rejected": 0, "chain_breaks": 0,
                             "views_unplaced": 0, "odometry_slips": 0,
                             "windows_failed": 0, "frames_dropped": 0}
        self._last_images: dict[str, int] = {}
        self._missing_cameras: list[str] = []
        self._last_stats_ns = self._now_ns()
        #: Facts about the newest published window (scale, residual, backend timings).
        self._last_window: dict[str, object] = {}
        self.pipeline.start()

    def _publisher(self, msg_type: type, topic: str, qos: QoSProfile) -> None:
        """A lifecycle publisher: it publishes only while the node is active."""
        self._pubs[topic] = self.create_lifecycle_publisher(msg_type, topic, qos)

    def _release(self) -> None:
        """Stop the worker and the map publisher; drop backend, map, entities; give the memory back."""
        self._active = False
        if self.map_publisher is not None:
            self.map_publisher.close()
            self.map_publisher = None
        if self.pipeline is not None:
            self.pipeline.stop()
            if self.pipeline._worker.is_alive():
                self.get_logger().warning("the backend is still running a window: its memory goes when it ends")
        for timer in self._timers:
            self.destroy_timer(timer)
        for entity in self._entities:
            if hasattr(entity, "srv_type"):
                self.destroy_service(entity)
            else:
                self.destroy_subscription(entity)
        for pub in self._pubs.values():
            self.destroy_lifecycle_publisher(pub)
        self._timers, self._entities, self._pubs = [], [], {}
        had_backend = self.backend is not None
        self.backend = self.pipeline = self.inputs = self.outputs = None
        if had_backend:
            _give_memory_back()

    # ------------------------------------------------------------------ warnings
    def warn(self, key: str, message: str) -> None:
        """A warning at most once per WARN_PERIOD_S for each ``key``, counting what it swallowed."""
        now = time.monotonic()
        with self._warn_lock:
            if now - self._warned.get(key, -1e9) < WARN_PERIOD_S:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            extra = self._suppressed.pop(key, 0)
            self._warned[key] = now
        self.get_logger().warning(message + (f" ({extra} more since last warning)" if extra else ""))

    # ------------------------------------------------------------------ callbacks (dropped while inactive)
    def _on_image(self, cam: str, msg: Image) -> None:
        if self._active:
            self.inputs.on_image(cam, msg, self._now_ns())

    def _on_compressed_image(self, cam: str, msg: CompressedImage) -> None:
        if self._active:
            self.inputs.on_compressed_image(cam, msg, self._now_ns())

    def _on_depth_prior(self, cam: str, msg: Image) -> None:
        if self._active:
            self.inputs.on_depth_prior(cam, msg)

    def _on_odometry(self, msg: Odometry) -> None:
        if self._active:
            self._last_odom_ns = self._now_ns()
            self.inputs.on_odometry(msg)

    def _on_tf(self, msg: TFMessage) -> None:
        """Moving extrinsics and, with ``odometry.source: tf``, odometry: dropped while inactive as odometry is."""
        if self._active and self.inputs.on_tf(msg):  # odometry from TF
            self._last_odom_ns = self._now_ns()

    def _on_reset(self, reason: str) -> None:
        """A reset announced by the pipeline (any thread, no pipeline lock held); a looping bag or a
        burst of ~/reset calls is told once per WARN_PERIOD_S, with the count."""
        self.warn("reset", f"input restarted ({reason}): buffers, map and path reset")
        pipeline = self.pipeline
        if pipeline is None:
            return
        generation = pipeline.generation  # asked before taking our own lock
        with self._out_lock:
            self._new_generation_locked(generation)

    def _new_generation_locked(self, generation: int) -> None:
        """The outputs start afresh for ``generation``, unless a newer result already made them."""
        if generation > self._out_generation:
            self._out_generation = generation
            self.outputs.reset()
            self._restart_map_odom()

    def _restart_map_odom(self) -> None:
        """A new map starts at the odometry frame: map -> odom is the identity until a window says otherwise."""
        self._map_odom.reset()
        if self.config["use_odometry"] and not self.config["map.load_path"]:  # a loaded map: once localised
            self._map_odom.set_target(np.eye(4))

    def _on_timer(self) -> None:
        self.inputs.report(self.pipeline.poll())

    def _publish_map_odom(self) -> None:
        """map -> odom at a steady rate, stamped ahead (amcl / slam_toolbox style), gliding to each estimate.

        Without odometry the node is its own odometry: the newest chained odom -> base goes out with
        it, stamped the same, so a lookup of map -> base_link at "now" works as with wheel odometry.
        """
        now = self._now_ns()
        with self._out_lock:
            T = self._map_odom.value(now * 1e-9)
            msg = None if T is None else self.outputs.map_odom(T, now + int(self.config["tf.future_tolerance_s"] * 1e9))
        pub = self._pubs.get("/tf")  # none once cleaned up meanwhile
        if msg is not None and pub is not None:
            pub.publish(msg)

    # ------------------------------------------------------------------ the fused map (map publisher's thread)
    def _map_version(self) -> tuple[int, ...]:
        """Changes whenever the published map would: a reset, a keyframe fused or moved."""
        pipeline = self.pipeline
        voxel_map = pipeline.map
        return (pipeline.stats.resets, self._map_resets, voxel_map.keyframes_integrated, voxel_map.keyframes_reposed)

    def _build_map(self, buffer) -> PointCloud2:
        """The fused map's cloud, packed into the map publisher's shared buffer."""
        xyz, rgb, confidence = self.pipeline.map.points()
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id=self.config["map_frame"])
        return conv.map_cloud(xyz, rgb, confidence, header, buffer=buffer)

    # ------------------------------------------------------------------ the occupancy grid (map publisher's thread)
    def _grid_version(self) -> tuple[int, ...]:
        """Changes whenever map_grid would: a reset, a keyframe cast or a correction recorded."""
        return (self.pipeline.stats.resets, self._map_resets, self.pipeline.grid.version)

    def _build_grid(self, buffer) -> OccupancyGrid:
        """The occupancy grid for Nav2 (pending corrections applied under the grid's lock), packed into
        the map publisher's shared buffer."""
        snapshot = self.pipeline.grid.snapshot()
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id=self.config["map_frame"])
        return conv.occupancy_grid(snapshot, header, buffer=buffer)

    # ------------------------------------------------------------------ services
    def _off_executor(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on a thread of its own; the executor is woken when it is done (await the Future).

        What waits for the worker (a map save is answered between two jobs) or for the voxel map's
        lock (held while the map publisher packs a 2 M voxel map, a second or more) must not wait on
        the executor: images, odometry and TF would wait with it.
        """
        future = Future(executor=self.executor)
        future.add_done_callback(lambda f: None)  # its scheduling wakes the executor

        def run() -> None:
            try:
                future.set_result(fn())
            except Exception as exc:  # handed to the awaiting service
                future.set_exception(exc)

        threading.Thread(target=run, name="mapany-service", daemon=True).start()
        return future

    async def _save_map(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        """Write the map folder (map.save_path): fused map, keyframes for relocalisation, the occupancy
        grid's Nav2 pair."""
        pipeline = self.pipeline
        folder = self.config["map.save_path"]
        try:
            wrote = await self._off_executor(lambda: pipeline.save_map(folder))
        except (OSError, ValueError) as exc:
            response.success, response.message = False, f"cannot write {folder}: {exc} (set map.save_path)"
            return response
        response.success, response.message = True, f"wrote {wrote} to the map folder {folder}"
        self.get_logger().info(response.message)
        return response

    async def _reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        """Empty the map, the grid and the path and start a new map; the input keeps flowing."""
        pipeline = self.pipeline
        pipeline.reset("~/reset service")
        layers = [layer for layer in (pipeline.map, pipeline.grid) if layer is not None]
        if layers:  # each waits for its own lock (held while the map publisher packs it)
            await self._off_executor(lambda: [layer.reset() for layer in layers])
            self._map_resets += 1
        response.success, response.message = True, "map, grid and path reset; mapping continues"
        return response

    def _on_backend_error(self, exc: Exception) -> None:
        self.warn(f"backend/{type(exc).__name__}", f"window not published: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ diagnostics
    def _scale_warnings(self, status: dict) -> list[str]:
        """The odometry's scale against a camera rig's baseline, else the model's against the odometry's,
        when it departs from 1 by more than ``diagnostics.scale_disagreement`` and two of its sigmas."""
        limit = self.config["diagnostics.scale_disagreement"]

        def off(ratio: float, sigma: float) -> bool:
            return ratio > 0 and limit > 0 and abs(np.log(ratio)) > max(np.log1p(limit), 2.0 * sigma)

        odometry, odometry_sigma = float(status["odometry_scale"]), float(status["odometry_scale_sigma"])
        if odometry > 0:
            return [f"the odometry's distances are {odometry:.3f} x the camera rig's calibrated ones: its "
                    "calibration (wheel radius) is off; the map is in the rig's metres"] \
                if off(odometry, odometry_sigma) else []
        ratio, sigma = float(status["model_scale_vs_odometry"]), float(status["model_scale_sigma"])
        if off(ratio, sigma):
            return [f"the model's scale is {ratio:.3f} x the odometry's over the windows so far: the "
                    "odometry's calibration (wheel radius) or the model's metric scale is off; the map "
                    "keeps the odometry's scale"]
        return []

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
        warnings = [f"{new[k]} {k.replace('_', ' ')}" for k in ("odometry_slips", "keyframes_skipped",
                                                               "windows_rejected", "views_rejected", "views_unplaced",
                                                               "frames_dropped") if new[k] > 0]
        stale_s = self.config["diagnostics.stale_input_s"]
        for cam in self.config.pipeline.cameras:
            last = self.inputs.last_image_ns.get(cam)
            if last is None or (now - last) * 1e-9 > stale_s:
                warnings.append(f"no image from {cam} for {stale_s:g} s")
        if self.config["use_odometry"] and (self._last_odom_ns is None or (now - self._last_odom_ns) * 1e-9 > stale_s):
            warnings.append(f"no odometry for {stale_s:g} s")
        warnings += self._scale_warnings(status)
        if not status["localised"]:
            warnings.append("not localised in the loaded map yet: only depth is published")
        missing = self.pipeline.missing_cameras()
        if missing:
            warnings.append(f"camera {', '.join(missing)} missing: no frame for sync.camera_timeout_s = "
                            f"{self.config['sync.camera_timeout_s']:g} s, groups go on without it")
        for cam in sorted(set(missing) - set(self._missing_cameras)):
            self.get_logger().warning(f"camera {cam} is missing: mapping goes on with the other cameras")
        for cam in sorted(set(self._missing_cameras) - set(missing)):
            self.get_logger().info(f"camera {cam} is back: it joins the groups again")
        self._missing_cameras = missing
        diag = DiagnosticStatus(name=f"{self.get_name()}: pipeline", hardware_id=self.backend.name)
        diag.level = DiagnosticStatus.ERROR if errors else DiagnosticStatus.WARN if warnings else DiagnosticStatus.OK
        diag.message = "; ".join(errors + warnings) if errors or warnings else "ok"
        values = {**status, **{f"input_rate_hz/{c}": f"{r:.2f}" for c, r in rates.items()},
                  "cameras_missing": ",".join(missing), **self._last_window}
        diag.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        self._pubs["/diagnostics"].publish(DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()),
                                                           status=[diag]))
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
        pipeline, outputs = self.pipeline, self.outputs
        if pipeline is None or outputs is None:
            return  # released while the backend ran
        pred, placement = result.prediction, result.placement
        if not result.frames:  # a closed loop or a relocalisation: no window, the newest window's facts stay
            self.get_logger().info(f"{placement.status.value}: {placement.message}")
            self._publish_messages(result)
            return
        self._last_window = {
            "last_window_views": len(pred.views),
            "last_metric_scale": "n/a" if pred.metric_scale is None else f"{pred.metric_scale:.4f}",
            "last_placement": placement.status.name.lower(),
            "last_placement_scale": f"{placement.scale:.4f}",
            "last_placement_residual_m": "n/a" if placement.residual_m is None else f"{placement.residual_m:.4f}",
            **{f"last_{k}_ms": f"{v * 1e3:.1f}" for k, v in pred.timings_s.items()},
            "last_placement_ms": f"{pipeline.stats.placement_time_s * 1e3:.1f}",
        }
        if placement.status is PlacementStatus.RELOCALISED:
            self.get_logger().error(f"map chain broken ({placement.message}): continued from the last placed pose")
        self._publish_messages(result)

    def _publish_messages(self, result: WindowResult) -> None:
        """The result's messages (path, points, depth, TF); map -> odom glides to its estimate."""
        outputs = self.outputs
        if outputs is None:
            return  # released while the backend ran
        with self._out_lock:
            if result.generation < self._out_generation:
                return  # the input restarted while this window ran
            self._new_generation_locked(result.generation)  # a reset not announced yet: it starts here
            messages = outputs.window(result)  # the path is kept while inactive too
            if result.placement.T_map_odom is not None:
                self._map_odom.set_target(result.placement.T_map_odom)
        if not self._active:
            return
        pubs = self._pubs
        for topic, msg in messages:
            pub = pubs.get(topic)  # none once cleaned up meanwhile
            if pub is not None:
                pub.publish(msg)

    def destroy_node(self) -> None:
        self._release()
        super().destroy_node()


RCLError = _rclpy_impl.RCLError

#: How often the main loop looks at the stop request between two waits [s]: a signal waits at most this.
STOP_POLL_S = 0.1


class StopSignals:
    """SIGINT and SIGTERM (Ctrl-C, ``ros2 launch`` stopping) ask for a clean stop; they raise nothing.

    rclpy's own handlers chain to Python's, whose ``KeyboardInterrupt`` lands wherever the main thread
    is: inside rclpy's message conversion it surfaces as a pybind11 ``RuntimeError`` from
    ``take_message`` and a traceback. A flag the main loop reads between two waits cannot do that; the
    callback that was running finishes first.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.received = signum  # only a store: it runs between two bytecodes of whatever was running


def spin_until_stopped(node: Any, stop: StopSignals) -> None:
    """Run the node's callbacks until its shutdown transition, a stop signal or a shut-down context."""
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        while stop.received is None and not node.finished.done() and rclpy.ok():
            executor.spin_once(timeout_sec=STOP_POLL_S)
    finally:
        executor.remove_node(node)
        executor.shutdown()


def main(args: list[str] | None = None) -> int:
    """Console entry point: ``ros2 run mapany_ros mapany_node``; exits 0 after the shutdown transition
    or on SIGINT / SIGTERM."""
    # Signals are this function's (StopSignals); until the node is built Python's default applies.
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    try:
        node = MapanyNode()
    except (ParameterError, BackendError) as exc:  # one clear message, no second traceback
        rclpy.logging.get_logger("mapany_node").fatal(str(exc))
        rclpy.try_shutdown()
        return 2
    except KeyboardInterrupt:  # Ctrl-C while the backend loads
        rclpy.try_shutdown()
        return 0
    stop = StopSignals()
    stop.install()
    try:
        spin_until_stopped(node, stop)
    except ExternalShutdownException:
        pass
    except RCLError:
        # A context shut down from elsewhere while the executor was between two waits makes building
        # the wait set fail. That is a normal shutdown, not a crash.
        if rclpy.ok():
            raise
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
        stop.uninstall()
    return 0


if __name__ == "__main__":
    sys.exit(main())
