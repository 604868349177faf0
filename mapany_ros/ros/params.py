"""The node's parameters: one table declares, documents and validates every one of them.

The README's parameter table and config/mapany.yaml are checked against :data:`PARAMETERS` by
the tests, so code, docs and defaults cannot drift apart. No rclpy import at module level: the
table and the validation are plain Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from mapany_ros.core.backends import BACKENDS, is_backend_name
from mapany_ros.core.fusion import FusionConfig
from mapany_ros.core.occupancy import OccupancyConfig
from mapany_ros.core.pipeline import PipelineConfig
from mapany_ros.core.placement import PlacementConfig
from mapany_ros.core.placement.loops import LoopConfig
from mapany_ros.core.placement.pose_graph import KERNELS


class ParameterError(ValueError):
    """A parameter value the node cannot run with; the message names the parameter and the fix."""


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    description: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None

    def check(self, value: Any) -> None:
        if self.choices is not None and value not in self.choices:
            raise ParameterError(f"{self.name} = {value!r}: must be one of {', '.join(self.choices)}")
        if self.low is not None and not self.low <= value <= self.high:
            raise ParameterError(f"{self.name} = {value!r}: must be in [{self.low}, {self.high}]")


PARAMETERS: tuple[Param, ...] = (
    Param("autostart", True, "Configure and activate at start (lifecycle); false: start unconfigured and wait for "
          "~/change_state (a lifecycle manager, `ros2 lifecycle set`)."),
    Param("backend", "mapanything", "Reconstruction model: mapanything (GPU, weights), planesweep (classical "
          "multi-view stereo, no weights, needs odometry), a name registered under the entry-point group "
          "mapany_ros.backends, or a plugin class as package.module:ClassName."),
    Param("backend_options", "", "Keyword arguments for a plugin backend's constructor, as a YAML mapping "
          "(e.g. '{checkpoint: /opt/model.pt}'); the built-ins take their own parameters below."),
    Param("device", "auto", "Torch device: auto picks CUDA when present.", choices=("auto", "cpu", "cuda")),
    Param("cameras", ["camera"], "Camera namespaces; each C subscribes C/image_raw (or C/image_raw/compressed) "
          "and C/camera_info."),
    Param("image_transport", "raw", "raw: sensor_msgs/Image on C/image_raw; compressed: sensor_msgs/CompressedImage "
          "(jpeg, png) on C/image_raw/compressed, as image_transport names it.", choices=("raw", "compressed")),
    Param("image_rectified", False, "The images are rectified (image_proc's image_rect remapped to C/image_raw): "
          "the camera is CameraInfo P, without distortion."),
    Param("use_odometry", True, "Use odometry (the odom topic, or /tf with odometry.source: tf) + base -> camera "
          "extrinsics (/tf_static, /tf) as metric pose priors."),
    Param("map_frame", "map", "Fixed frame of points, path and the published TF."),
    Param("odom_frame", "odom", "Odometry frame (REP 105): parent of base_frame in the odometry, or, without "
          "odometry, of the node's own chained estimate; map -> odom is published in both modes."),
    Param("base_frame", "base_link", "Robot base frame: child of odom in the odometry messages (or on /tf)."),
    Param("window.size", 8, "Keyframe groups per backend call.", 2, 64),
    Param("window.overlap", 2, "Groups carried into the next window as context (not output again).", 0, 63),
    Param("window.max_latency_s", 2.0, "Send a partial window at the first frame stamped this long after its "
          "oldest keyframe, or, once input stops, when that keyframe has waited this long.", 0.1, 60.0),
    Param("window.queue_size", 2, "Windows that may wait for the backend; beyond, the waiting keyframes are "
          "thinned evenly (never whole windows dropped).", 1, 16),
    Param("keyframe.min_translation_m", 0.15, "Motion that makes a new keyframe (odometry's translation).",
          0.0, 100.0),
    Param("keyframe.min_rotation_deg", 10.0, "Rotation that makes a new keyframe: odometry's, or without odometry "
          "the view's rotation measured in the images (any camera of the group).", 0.0, 180.0),
    Param("keyframe.min_parallax_deg", 1.0, "Without odometry: parallax that makes a new keyframe, the median angle "
          "by which the last keyframe's image patches moved once the view's rotation is taken out (any camera of "
          "the group; independent of resolution and lens).", 0.0, 90.0),
    Param("keyframe.max_interval_s", 1.0, "A keyframe at least this often, moving or not.", 0.01, 3600.0),
    Param("keyframe.min_interval_s", 0.0, "Never two keyframes closer than this (rate cap).", 0.0, 60.0),
    Param("sync.tolerance_s", 0.02, "Largest stamp difference between cameras of one group.", 0.0, 1.0),
    Param("sync.camera_timeout_s", 1.0, "A camera without a frame for this long (message time, against the other "
          "cameras' stamps) is left out of groups, which go on with the others (WARN on /diagnostics naming it); "
          "it rejoins with its next frame. 0 = groups always wait for every camera.", 0.0, 3600.0),
    Param("odometry.source", "topic", "Where odometry comes from: topic (nav_msgs/Odometry on odom) or tf (the "
          "odom_frame -> base_frame transform on /tf, interpolated at each image stamp), for odometry nodes that "
          "publish only TF.", choices=("topic", "tf")),
    Param("odometry.use_covariance", False, "Carry the pose covariance of the odom messages onto each frame "
          "(Frame.odometry_covariance) for the pose graph's odometry noise; where it is zero or unset, "
          "odometry.sigma_* apply."),
    Param("odometry.max_gap_s", 0.25, "Largest odometry gap interpolated across (also between two /tf samples of a "
          "moving transform).", 0.001, 10.0),
    Param("odometry.max_wait_s", 0.5, "How long an image waits for odometry at its stamp; it is dropped after "
          "that only while no odometry arrives (an odometry that lags is waited for).", 0.0, 10.0),
    Param("odometry.sigma_translation", 0.05, "Odometry translation error, as a fraction of the distance driven "
          "(pose-graph noise).", 0.001, 1.0),
    Param("odometry.sigma_rotation_deg_per_m", 5.0, "Odometry heading error per metre driven (pose-graph noise).",
          0.01, 180.0),
    Param("qos.reliability", "best_effort", "Reliability of the image, camera_info and odom subscriptions "
          "(sensor data QoS when best_effort).", choices=("best_effort", "reliable")),
    Param("qos.depth", 5, "History depth of the input subscriptions.", 1, 1000),
    Param("stats_period_s", 5.0, "Period of the rate / latency / drop log line and of /diagnostics.", 0.5, 3600.0),
    Param("time.reset_jump_s", 1.0, "A stamp this far behind the newest (a bag played in a loop) resets the "
          "buffers, the map and the path; smaller steps back are dropped with a warning.", 0.01, 3600.0),
    Param("path.max_poses", 10000, "Longest published path; the oldest poses go first.", 1, 1_000_000),
    Param("diagnostics.stale_input_s", 2.0, "A camera or odometry silent for this long is reported stale (WARN).",
          0.1, 3600.0),
    Param("diagnostics.scale_disagreement", 0.04, "With odometry and a metric model: WARN when the model's scale, "
          "learned over the windows, departs from the odometry's by more than this fraction (and two of its "
          "sigmas): a miscalibrated odometry or a biased model. The map keeps the odometry's scale. 0 = never.",
          0.0, 1.0),
    Param("planesweep.num_planes", 64, "Depth hypotheses, uniform in inverse depth.", 8, 512),
    Param("planesweep.min_depth_m", 0.3, "Nearest depth swept.", 0.01, 100.0),
    Param("planesweep.max_depth_m", 15.0, "Farthest depth swept.", 0.1, 1000.0),
    Param("planesweep.downscale", 2, "Working and output resolution divisor.", 1, 8),
    Param("planesweep.num_neighbors", 4, "Neighbour views per reference view.", 1, 16),
    Param("mapanything.model_id", "facebook/map-anything-apache", "Hugging Face model id (Apache-2.0 weights; "
          "facebook/map-anything is CC-BY-NC)."),
    Param("mapanything.model_path", "", "Local directory with config.json + model.safetensors; wins over model_id."),
    Param("mapanything.cache_dir", "", "Cache filled by `mapany-ros prefetch` (weights + DINOv2 hub code); "
          "empty = default Hugging Face / torch hub caches."),
    Param("mapanything.use_calibration", True, "Feed camera_info intrinsics (or rays when distorted)."),
    Param("mapanything.use_pose", True, "Feed odometry poses as metric pose priors."),
    Param("mapanything.use_depth", True, "Feed the registered depth topic C/depth_prior when it is present."),
    Param("mapanything.output_resolution", "input", "Publish depth at the input camera's resolution or the "
          "model's.", choices=("input", "model")),
    Param("placement.max_residual_m", 0.5, "Reject a window whose placement residual exceeds this: RMS distance to "
          "odometry, or median distance to the placed overlap (0 = never).", 0.0, 100.0),
    Param("placement.view_consistency", 0.85, "Reject a view whose best depth agreement with a neighbour is below "
          "this fraction of the window's median, or that leaves its neighbours' path (0 = keep all).", 0.0, 1.0),
    Param("placement.max_depth_m", 100.0, "Reject a view of a metric model whose median depth is beyond this "
          "(a unit slip, millimetres read as metres) (0 = no limit).", 0.0, 1e5),
    Param("placement.refine_poses", True, "Refine each window's view poses so their depth maps agree "
          "(point-to-plane, unobserved directions left alone)."),
    Param("placement.rig_scale", True, "With odometry and cameras of one group at least 10 cm apart: measure "
          "the odometry's scale against their calibrated distance (the extrinsics) and put the map in those "
          "metres (false: the map keeps the odometry's scale)."),
    Param("placement.robust_kernel", "cauchy", "Robust kernel of the pose graph and the overlap fit.",
          choices=KERNELS),
    Param("placement.robust_threshold", 2.0, "Kernel width, in standard deviations.", 0.1, 100.0),
    Param("placement.view_sigma_m", 0.05, "Expected position error of one view of the model (pose-graph noise, "
          "outlier tests).", 0.001, 10.0),
    Param("placement.view_sigma_deg", 1.0, "Expected orientation error of one view of the model.", 0.01, 90.0),
    Param("placement.metric_scale_sigma", 0.03, "Expected scale error of one metric window (how much each window "
          "may correct the map's scale without odometry).", 0.001, 1.0),
    Param("map.enabled", True, "Fuse every placed keyframe into a voxel map (map_points, ~/save_map, ~/reset)."),
    Param("map.voxel_size_m", 0.05, "Voxel edge of the fused map.", 0.005, 10.0),
    Param("map.max_voxels", 2_000_000, "Memory budget of the fused map: voxels stored in all submaps together, "
          "a surface once per visit (about 100 bytes each with their published union).",
          1000, 200_000_000),
    Param("map.max_depth_m", 10.0, "Depth beyond this is not fused (its error grows with distance).", 0.1, 1000.0),
    Param("map.min_weight", 2.0, "A voxel is published once its summed confidence reaches this (in median "
          "pixels): one stray sample makes no voxel.", 0.0, 1e6),
    Param("map.pixel_stride", 4, "Fuse every n-th pixel in both directions.", 1, 64),
    Param("map.submap_keyframes", 8, "Keyframes per submap: a submap moves as one rigid piece when the pose graph "
          "corrects its keyframes, however old (fewer follow a bending correction more closely; more store a "
          "surface seen by consecutive keyframes fewer times).", 1, 10_000),
    Param("map.evict_radius_m", 0.0, "Over budget, drop voxels farther than this from the robot first "
          "(0: the least recently seen first).", 0.0, 1e6),
    Param("map.edge_threshold", 0.05, "Pixels at a depth jump of more than this fraction (or of more than the "
          "depth's own noise shows), and their neighbours, are not fused: the flying pixels a model puts between "
          "foreground and background never reach the map (0 = fuse every pixel).", 0.0, 1.0),
    Param("map.publish_period_s", 2.0, "Period of map_points and map_grid (transient local; only when they "
          "changed).", 0.1, 3600.0),
    Param("map.save_path", "mapany_map", "Map folder ~/save_map writes (map.ply, the keyframes a later run "
          "relocalises with, the occupancy grid as the Nav2 map_server pair map_grid.yaml + map_grid.pgm; "
          "relative to the node's working directory)."),
    Param("map.load_path", "", "Map folder to start in (written by ~/save_map): the node relocalises in it "
          "before it publishes, then maps in its frame (empty: a new map)."),
    Param("map.update", True, "With map.load_path: false is localisation only, the loaded map is not changed."),
    Param("grid.enabled", True, "Build a 2-D occupancy grid for Nav2 from every placed keyframe (map_grid, "
          "~/save_map writes it into the map folder as a map_server pair, ~/reset clears it)."),
    Param("grid.resolution_m", 0.05, "Cell edge of the occupancy grid.", 0.01, 1.0),
    Param("grid.min_height_m", 0.05, "Surfaces at least this high above the floor are obstacles (lower ones are "
          "floor).", -1.0, 10.0),
    Param("grid.max_height_m", 2.0, "Surfaces higher than this above the floor are passed under (ceiling, "
          "lamps).", 0.0, 100.0),
    Param("grid.base_height_m", 0.0, "Height of base_frame above the floor (0 for a frame on the ground, as "
          "base_footprint); the floor under each keyframe is this far below its base_frame.", -10.0, 10.0),
    Param("grid.pixel_stride", 8, "Cast rays to every n-th depth pixel in both directions.", 1, 64),
    Param("grid.max_range_m", 3.5, "Depth samples farther than this from the camera neither mark nor clear "
          "cells (their error grows with range).", 0.5, 100.0),
    Param("grid.keep_keyframes", 10000, "Keyframes whose samples are kept so pose corrections of any age move "
          "them (2 bytes a sample, 9.6 kB per 640x480 keyframe at stride 8); older ones are frozen.",
          0, 10_000_000),
    Param("loops.enabled", True, "Close loops: recognise revisited places and correct the whole map."),
    Param("loops.min_gap_keyframes", 15, "A loop joins keyframes at least this many keyframes apart.", 2, 100000),
    Param("loops.search_radius_m", 1.0, "Old keyframes within this distance (plus three sigmas of the graph's "
          "drift) of the robot are loop candidates.", 0.0, 1000.0),
    Param("loops.min_similarity", 0.3, "Old keyframes whose image descriptor is at least this alike (cosine, centred "
          "on the map's mean) are loop candidates, however far the map drifted.", -1.0, 1.0),
    Param("loops.min_overlap", 0.5, "Fraction of one place's points that must lie on the other's surfaces when "
          "the backend sees both in one window, for a loop to hold.", 0.05, 1.0),
    Param("loops.every_keyframes", 4, "Look for loop candidates at every n-th keyframe (each costs a backend call "
          "while it is idle).", 1, 1000),
    Param("loops.image_width", 512, "Width of the keyframe images kept in memory (JPEG) to verify loops with.",
          64, 4096),
    Param("tf.buffer_s", 10.0, "How long moving transforms from /tf are kept, per edge, for lookups at image "
          "stamps (a camera on a pan-tilt head; odometry with odometry.source: tf).", 0.1, 3600.0),
    Param("tf.rate_hz", 20.0, "Rate of the map -> odom transform (without odometry with the newest chained "
          "odom -> base at the same stamp).", 1.0, 1000.0),
    Param("tf.future_tolerance_s", 0.1, "map -> odom is stamped now plus this, so lookups at 'now' never "
          "extrapolate (as amcl's transform_tolerance).", 0.0, 10.0),
    Param("tf.smoothing_s", 0.5, "Time constant with which map -> odom glides to each new drift estimate.",
          0.0, 60.0),
)

BY_NAME = {p.name: p for p in PARAMETERS}


def flatten(section: dict, prefix: str = "") -> dict[str, Any]:
    """A params file's nested ``ros__parameters`` as dotted names (``window: {size: 8}`` -> ``window.size``)."""
    out: dict[str, Any] = {}
    for k, v in section.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def plugin_options(text: str) -> dict[str, Any]:
    """``backend_options`` as keyword arguments: a YAML mapping with string keys (empty: none)."""
    if not text.strip():
        return {}
    try:
        options = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParameterError(f"backend_options is not valid YAML ({exc}); give a mapping like "
                             "'{key: value}'") from exc
    if not isinstance(options, dict) or not all(isinstance(k, str) and k.isidentifier() for k in options):
        raise ParameterError(f"backend_options = {text!r}: must be a YAML mapping of keyword names to values")
    return options


@dataclass(frozen=True)
class NodeConfig:
    """Validated parameter values, grouped the way the node uses them."""

    values: dict[str, Any]
    pipeline: PipelineConfig
    backend_options: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.values[name]


def validate(values: dict[str, Any]) -> NodeConfig:
    """Check every value and the constraints between them; build the configs."""
    for name, value in values.items():
        BY_NAME[name].check(value)
    if not is_backend_name(values["backend"]):
        raise ParameterError(f"backend = {values['backend']!r}: must be one of {', '.join(BACKENDS)}, a name "
                             "registered under mapany_ros.backends, or package.module:ClassName")
    cams = list(values["cameras"])
    if not cams or any(not c or not isinstance(c, str) for c in cams) or len(set(cams)) != len(cams):
        raise ParameterError(f"cameras = {cams!r}: must be a non-empty list of distinct names")
    if values["window.overlap"] >= values["window.size"]:
        raise ParameterError("window.overlap must be smaller than window.size")
    if values["planesweep.min_depth_m"] >= values["planesweep.max_depth_m"]:
        raise ParameterError("planesweep.min_depth_m must be smaller than planesweep.max_depth_m")
    if not values["use_odometry"] and values["window.overlap"] < 1:
        raise ParameterError("window.overlap = 0 with use_odometry: false: windows could not be chained into one "
                             "map; set window.overlap: 2 (at least 1) or use_odometry: true")
    if values["backend"] == "planesweep" and not values["use_odometry"]:
        raise ParameterError("backend planesweep needs pose priors: set use_odometry: true (odom topic and "
                             "/tf_static extrinsics) or use backend mapanything")
    if not values["map.update"] and not values["map.load_path"]:
        raise ParameterError("map.update = false is localisation only and needs a map to localise in: set "
                             "map.load_path to a folder written by ~/save_map (or map.update: true)")
    for frame in ("map_frame", "odom_frame", "base_frame"):
        if not values[frame] or values[frame].startswith("/"):
            raise ParameterError(f"{frame} = {values[frame]!r}: must be a non-empty frame id without leading '/'")
    if len({values["map_frame"], values["odom_frame"], values["base_frame"]}) < 3:
        raise ParameterError(f"map_frame, odom_frame and base_frame must be three different frames, got "
                             f"{values['map_frame']!r}, {values['odom_frame']!r}, {values['base_frame']!r}")
    timeout = values["sync.camera_timeout_s"]
    if 0 < timeout <= values["sync.tolerance_s"]:
        raise ParameterError(f"sync.camera_timeout_s = {timeout} must exceed sync.tolerance_s = "
                             f"{values['sync.tolerance_s']} (a camera is late only after a group could have formed), "
                             "or be 0 (groups always wait for every camera)")
    fusion = None
    if values["map.enabled"]:
        try:
            fusion = FusionConfig(
                voxel_size_m=values["map.voxel_size_m"], max_voxels=values["map.max_voxels"],
                max_depth_m=values["map.max_depth_m"], min_weight=values["map.min_weight"],
                pixel_stride=values["map.pixel_stride"], submap_keyframes=values["map.submap_keyframes"],
                evict_radius_m=values["map.evict_radius_m"], edge_threshold=values["map.edge_threshold"])
        except ValueError as exc:
            raise ParameterError(str(exc).replace("FusionConfig.", "map.")) from exc
    grid = None
    if values["grid.enabled"]:
        try:
            grid = OccupancyConfig(
                resolution_m=values["grid.resolution_m"], min_height_m=values["grid.min_height_m"],
                max_height_m=values["grid.max_height_m"], base_height_m=values["grid.base_height_m"],
                pixel_stride=values["grid.pixel_stride"], max_range_m=values["grid.max_range_m"],
                keep_keyframes=values["grid.keep_keyframes"])
        except ValueError as exc:
            raise ParameterError(str(exc).replace("OccupancyConfig.", "grid.")) from exc
    pipeline = PipelineConfig(
        cameras=tuple(cams),
        use_odometry=values["use_odometry"],
        window_size=values["window.size"],
        window_overlap=values["window.overlap"],
        min_translation_m=values["keyframe.min_translation_m"],
        min_rotation_deg=values["keyframe.min_rotation_deg"],
        max_interval_s=values["keyframe.max_interval_s"],
        min_interval_s=values["keyframe.min_interval_s"],
        min_parallax_deg=values["keyframe.min_parallax_deg"],
        sync_tolerance_s=values["sync.tolerance_s"],
        camera_timeout_s=values["sync.camera_timeout_s"],
        odom_max_gap_s=values["odometry.max_gap_s"],
        odom_max_wait_s=values["odometry.max_wait_s"],
        queue_size=values["window.queue_size"],
        max_window_latency_s=values["window.max_latency_s"],
        reset_jump_s=values["time.reset_jump_s"],
        fusion=fusion,
        grid=grid,
        placement=PlacementConfig(
            max_residual_m=values["placement.max_residual_m"],
            view_consistency=values["placement.view_consistency"],
            max_depth_m=values["placement.max_depth_m"],
            refine_poses=values["placement.refine_poses"],
            rig_scale=values["placement.rig_scale"],
            robust_kernel=values["placement.robust_kernel"],
            robust_threshold=values["placement.robust_threshold"],
            view_sigma_m=values["placement.view_sigma_m"],
            view_sigma_deg=values["placement.view_sigma_deg"],
            metric_scale_sigma=values["placement.metric_scale_sigma"],
            odom_sigma_ratio=values["odometry.sigma_translation"],
            odom_sigma_deg_per_m=values["odometry.sigma_rotation_deg_per_m"],
            loops=LoopConfig(
                enabled=values["loops.enabled"],
                min_gap_keyframes=values["loops.min_gap_keyframes"],
                search_radius_m=values["loops.search_radius_m"],
                min_similarity=values["loops.min_similarity"],
                min_overlap=values["loops.min_overlap"],
                every_keyframes=values["loops.every_keyframes"],
                image_width=values["loops.image_width"],
            ),
        ),
        update_map=values["map.update"],
    )
    if values["backend"] not in BACKENDS:
        options = plugin_options(values["backend_options"])
    elif values["backend"] == "planesweep":
        options = {
            "num_planes": values["planesweep.num_planes"],
            "min_depth_m": values["planesweep.min_depth_m"],
            "max_depth_m": values["planesweep.max_depth_m"],
            "downscale": values["planesweep.downscale"],
            "num_neighbors": values["planesweep.num_neighbors"],
        }
    else:
        options = {
            "model_id": values["mapanything.model_id"],
            "model_path": values["mapanything.model_path"],
            "cache_dir": values["mapanything.cache_dir"],
            "use_calibration_prior": values["mapanything.use_calibration"],
            "use_pose_prior": values["mapanything.use_pose"],
            "use_depth_prior": values["mapanything.use_depth"],
            "output_resolution": values["mapanything.output_resolution"],
        }
    return NodeConfig(values, pipeline, options)
