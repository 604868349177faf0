"""A rosbag2 of the synthetic robot with its ground truth, for offline runs and ``mapany-ros eval``.

The bag holds what the robot's drivers would record - every camera's images (raw or compressed as
image_transport sends it) and camera_info under its namespace, wheel odometry (exact, drifting or
slipping, optionally late; as nav_msgs/Odometry or, as odometry nodes that publish only TF send it,
odom -> base_link on /tf) and the base -> camera chains (static, or base -> C_link on /tf) - plus
what no real robot has: the true base pose and the true z-depth at every image stamp (with a rig,
of every camera, told apart by stamp and frame id). Playing it into the node and scoring the outputs against the
ground-truth topics needs no live scene. Messages are built with the ROS layer's converters and
serialised with rclpy (no ROS context needed), so they are exactly what the node publishes and
reads; the log time of every message is its header stamp (odometry: plus its delay).
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nav_msgs.msg import Odometry
from PIL import Image as PILImage
from rclpy.serialization import serialize_message
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage

from mapany_ros.core.geometry import invert
from mapany_ros.ros import conversions as conv
from mapany_ros.sim.bag_recorder import ros_type_name
from mapany_ros.sim.odometry import DriftingOdometry, OdometryErrors
from mapany_ros.sim.robot_publisher import T_LINK_OPTICAL
from mapany_ros.sim.scene import RIG_MOUNTS, RigCamera, SyntheticScene, make_rig, make_rig_sequences, make_sequence

CAMERA = "camera"
BASE_FRAME = "base_link"
ODOM_FRAME = "odom"
MAP_FRAME = "map"
LINK_FRAME = f"{CAMERA}_link"
OPTICAL_FRAME = f"{CAMERA}_optical_frame"

IMAGE_TOPIC = f"/{CAMERA}/image_raw"
COMPRESSED_TOPIC = f"/{CAMERA}/image_raw/compressed"
INFO_TOPIC = f"/{CAMERA}/camera_info"
ODOM_TOPIC = "/odom"
TF_STATIC_TOPIC = "/tf_static"
TF_TOPIC = "/tf"
GT_ODOM_TOPIC = "/ground_truth/odom"
GT_DEPTH_TOPIC = "/ground_truth/depth"
GT_INFO_TOPIC = "/ground_truth/camera_info"

#: image_transport's compressed transport names the source encoding and what it compressed.
COMPRESSED_FORMATS = {"jpeg": "rgb8; jpeg compressed bgr8", "png": "rgb8; png compressed bgr8"}
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}

_NO_TIME = QosTime(0, 0)
#: /tf_static is latched: ``ros2 bag play`` offers it transient-local again, as the recorder saw it.
_LATCHED_QOS = Qos(QosHistory.KEEP_LAST, 1, QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL, _NO_TIME,
                   _NO_TIME, QosLiveliness.AUTOMATIC, _NO_TIME, False)


@dataclass(frozen=True)
class _Message:
    log_ns: int
    topic: str
    data: bytes


def _compressed(rgb: np.ndarray, image_format: str, header: Header) -> CompressedImage:
    """CompressedImage as image_transport's compressed publisher sends an rgb8 image.

    The stream is an ordinary JPEG / PNG of the colours (OpenCV's bgr8 order only concerns the
    array it encodes from), so Pillow's encoding of the RGB array is the same image. Quality and
    PNG level are image_transport's defaults.
    """
    buf = io.BytesIO()
    if image_format == "jpeg":
        PILImage.fromarray(rgb).save(buf, format="JPEG", quality=95)
    else:
        PILImage.fromarray(rgb).save(buf, format="PNG", compress_level=3)
    return CompressedImage(header=header, format=COMPRESSED_FORMATS[image_format], data=buf.getvalue())


def _odometry(T: np.ndarray, stamp_ns: int, parent: str) -> Odometry:
    msg = Odometry()
    msg.header = Header(stamp=conv.ns_to_stamp(stamp_ns), frame_id=parent)
    msg.child_frame_id = BASE_FRAME
    msg.pose.pose = conv.matrix_to_pose(T)
    return msg


def write_synthetic_bag(
    out_dir: Path,
    *,
    seed: int = 0,
    width: int = 320,
    height: int = 240,
    duration_s: float = 8.0,
    rate_hz: float = 10.0,
    start_s: float = 4.0,
    storage: str = "mcap",
    image_format: str = "raw",
    odometry_errors: OdometryErrors | None = None,
    odom_rate_hz: float = 50.0,
    odom_delay_s: float = 0.0,
    odom_source: str = "topic",
    extrinsic_source: str = "tf_static",
    stamp_offset_ns: int = 1_700_000_000 * 10**9,
    overwrite: bool = False,
    scene: SyntheticScene | None = None,
    cameras: Mapping[str, RigCamera] | None = None,
) -> Path:
    """Render the synthetic robot and write it, with ground truth, to the rosbag2 ``out_dir``.

    ``start_s`` is where on the scene's trajectory the recording starts (the robot is already
    moving); ``stamp_offset_ns`` maps sequence time to ROS stamps. Odometry starts at the truth
    at its first sample (so ``odom`` coincides with the ground truth's ``map`` there), runs at
    ``odom_rate_hz`` from two periods before the first image to two after the last, and with
    ``odometry_errors`` drifts as :class:`DriftingOdometry` does. ``odom_delay_s`` delays its
    log time only (late odometry); stamps stay on the images' timeline. ``odom_source``: ``topic``
    writes it as nav_msgs/Odometry on /odom, ``tf`` as the odom -> base_link transform on /tf only.
    ``extrinsic_source``: ``tf_static`` latches every camera's base_link -> C_link once; ``tf``
    publishes them on /tf with every odometry sample, as robot_state_publisher does for a joint that
    may move (C_link -> C_optical_frame stays on /tf_static). ``scene``: one already built (building
    takes seconds), which ``seed`` then no longer chooses. ``cameras``: a rig (name ->
    :class:`RigCamera`, e.g. ``make_rig("front", "left")``) whose every camera ``C`` is recorded on
    ``/C/image_raw`` and ``/C/camera_info`` with its own stamps, and its chain on TF; default the
    scene's single camera ``camera``. Returns ``out_dir``.
    """
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    if image_format not in ("raw", *COMPRESSED_FORMATS):
        raise ValueError(f"image_format must be raw, jpeg or png, got {image_format!r}")
    if extrinsic_source not in ("tf_static", "tf"):
        raise ValueError(f"extrinsic_source must be tf_static or tf, got {extrinsic_source!r}")
    if odom_source not in ("topic", "tf"):
        raise ValueError(f"odom_source must be topic or tf, got {odom_source!r}")
    if odom_rate_hz <= 0 or odom_delay_s < 0:
        raise ValueError("need odom_rate_hz > 0 and odom_delay_s >= 0")
    n_frames = int(round(duration_s * rate_hz))
    if n_frames < 1:
        raise ValueError(f"duration_s * rate_hz gives no frame ({duration_s} s at {rate_hz} Hz)")
    if cameras is not None and not cameras:
        raise ValueError("cameras must name at least one camera")
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists; remove it or pass overwrite=True")
        shutil.rmtree(out_dir)
    if cameras is None:
        seqs = {CAMERA: make_sequence(seed, width, height, n_frames, rate_hz, start_s=start_s, scene=scene)}
    else:
        seqs = make_rig_sequences(dict(cameras), seed, width, height, n_frames, rate_hz, start_s=start_s, scene=scene)
    scene = next(iter(seqs.values())).scene
    first_ns = min(seq.frames[0].stamp_ns for seq in seqs.values())
    last_ns = max(seq.frames[-1].stamp_ns for seq in seqs.values())
    dt_odom = int(round(1e9 / odom_rate_hz))
    odom_ns = np.arange(first_ns - 2 * dt_odom, last_ns + 2 * dt_odom + 1, dt_odom)
    drifting = None
    if odometry_errors is not None and not odometry_errors.exact:
        drifting = DriftingOdometry(scene.base_pose, odometry_errors, t0_s=odom_ns[0] * 1e-9)

    messages: list[_Message] = []

    def add(log_ns: int, topic: str, msg: object) -> None:
        messages.append(_Message(int(log_ns), topic, serialize_message(msg)))

    start_ns = stamp_offset_ns + int(odom_ns[0])
    T_base_links = {camera: seq.T_base_camera @ invert(T_LINK_OPTICAL) for camera, seq in seqs.items()}
    transforms = []
    for camera in seqs:
        if extrinsic_source == "tf_static":
            transforms.append(conv.matrix_to_transform_stamped(T_base_links[camera], BASE_FRAME, f"{camera}_link",
                                                               start_ns))
        transforms.append(conv.matrix_to_transform_stamped(T_LINK_OPTICAL, f"{camera}_link",
                                                           f"{camera}_optical_frame", start_ns))
    add(start_ns, TF_STATIC_TOPIC, TFMessage(transforms=transforms))
    for t_ns in odom_ns:
        t_s = int(t_ns) * 1e-9
        T = drifting.pose(t_s) if drifting is not None else scene.base_pose(t_s)
        stamp = stamp_offset_ns + int(t_ns)
        if extrinsic_source == "tf":
            add(stamp, TF_TOPIC, TFMessage(transforms=[
                conv.matrix_to_transform_stamped(T_base_link, BASE_FRAME, f"{camera}_link", stamp)
                for camera, T_base_link in T_base_links.items()]))
        log_ns = stamp + int(round(odom_delay_s * 1e9))
        if odom_source == "tf":
            add(log_ns, TF_TOPIC, TFMessage(transforms=[
                conv.matrix_to_transform_stamped(T, ODOM_FRAME, BASE_FRAME, stamp)]))
        else:
            add(log_ns, ODOM_TOPIC, _odometry(T, stamp, ODOM_FRAME))
    types: dict[str, type] = {TF_STATIC_TOPIC: TFMessage,
                              **({} if odom_source == "tf" else {ODOM_TOPIC: Odometry}),
                              **({TF_TOPIC: TFMessage} if "tf" in (odom_source, extrinsic_source) else {})}
    for camera, seq in seqs.items():
        info_topic = f"/{camera}/camera_info"
        image_topic = f"/{camera}/image_raw" if image_format == "raw" else f"/{camera}/image_raw/compressed"
        types.update({info_topic: CameraInfo, image_topic: Image if image_format == "raw" else CompressedImage})
        for f in seq.frames:
            stamp = stamp_offset_ns + f.stamp_ns
            header = Header(stamp=conv.ns_to_stamp(stamp), frame_id=f"{camera}_optical_frame")
            info = conv.model_to_camera_info(seq.camera_model, header)
            add(stamp, info_topic, info)
            add(stamp, image_topic, conv.rgb_to_image_msg(f.rgb, header) if image_format == "raw"
                else _compressed(f.rgb, image_format, header))
            add(stamp, GT_ODOM_TOPIC, _odometry(f.T_odom_base, stamp, MAP_FRAME))
            add(stamp, GT_DEPTH_TOPIC, conv.depth_to_image_msg(f.depth, header))
            add(stamp, GT_INFO_TOPIC, info)
    types.update({GT_ODOM_TOPIC: Odometry, GT_DEPTH_TOPIC: Image, GT_INFO_TOPIC: CameraInfo})
    typestore = get_typestore(Stores.ROS2_KILTED)
    with Writer(out_dir, version=9, storage_plugin=STORAGES[storage]) as writer:
        conns = {
            topic: writer.add_connection(topic, ros_type_name(cls), typestore=typestore,
                                         offered_qos_profiles=[_LATCHED_QOS] if topic == TF_STATIC_TOPIC else ())
            for topic, cls in types.items()
        }
        # Stable sort: at equal log times the order of creation (static TF first) is kept.
        for m in sorted(messages, key=lambda m: m.log_ns):
            writer.write(conns[m.topic], m.log_ns, m.data)
    return out_dir


def _slip(text: str) -> tuple[float, float, float]:
    try:
        t, m, deg = (float(x) for x in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"a slip is TIME_S,METRES,DEGREES, got {text!r}") from e
    return t, m, deg


def _rig(text: str) -> dict[str, RigCamera]:
    try:
        return make_rig(*[n.strip() for n in text.split(",") if n.strip()])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m mapany_ros.sim.robot_bag", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="bag folder to create")
    ap.add_argument("--seed", type=int, default=0, help="synthetic scene seed")
    ap.add_argument("--width", type=int, default=320, help="camera width in pixels")
    ap.add_argument("--height", type=int, default=240, help="camera height in pixels")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds of robot motion")
    ap.add_argument("--rate", type=float, default=10.0, help="camera rate in Hz")
    ap.add_argument("--start", type=float, default=4.0, help="where on the trajectory the bag starts, seconds")
    ap.add_argument("--format", choices=("raw", "jpeg", "png"), default="raw",
                    help="raw: sensor_msgs/Image; jpeg / png: image_transport's compressed topic")
    ap.add_argument("--storage", choices=tuple(STORAGES), default="mcap", help="rosbag2 storage plugin")
    ap.add_argument("--odom-rate", type=float, default=50.0, help="odometry rate in Hz")
    ap.add_argument("--odom-delay", type=float, default=0.0,
                    help="odometry is logged this many seconds after its stamp (late odometry)")
    ap.add_argument("--odom-source", choices=("topic", "tf"), default="topic",
                    help="odometry as nav_msgs/Odometry on /odom, or as the odom -> base_link transform on /tf only")
    ap.add_argument("--odom-scale-error", type=float, default=0.0,
                    help="odometry translations are too long by this fraction")
    ap.add_argument("--odom-yaw-drift", type=float, default=0.0, help="odometry heading drift, degrees per metre")
    ap.add_argument("--odom-noise-m", type=float, default=0.0, help="odometry random walk, metres per sqrt(metre)")
    ap.add_argument("--odom-noise-deg", type=float, default=0.0, help="odometry heading random walk, deg per sqrt(m)")
    ap.add_argument("--odom-slip", type=_slip, action="append", default=[], metavar="TIME_S,METRES,DEGREES",
                    help="the odometry jumps once at TIME_S (sequence time) by METRES forward and DEGREES in "
                         "heading (a wheel slip); repeat for several")
    ap.add_argument("--cameras", type=_rig, default=None, metavar="NAMES",
                    help=f"a camera rig, comma-separated names of {', '.join(RIG_MOUNTS)} (e.g. front,left), "
                         "each on /NAME/image_raw, stamped 4 ms apart; default one camera on /camera")
    ap.add_argument("--overwrite", action="store_true", help="replace the bag folder when it exists")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    errors = OdometryErrors(scale_error=args.odom_scale_error, yaw_drift_deg_per_m=args.odom_yaw_drift,
                            noise_m=args.odom_noise_m, noise_deg=args.odom_noise_deg, seed=args.seed,
                            slips=args.odom_slip)
    try:
        path = write_synthetic_bag(
            args.out, seed=args.seed, width=args.width, height=args.height, duration_s=args.duration,
            rate_hz=args.rate, start_s=args.start, storage=args.storage, image_format=args.format,
            odometry_errors=errors, odom_rate_hz=args.odom_rate, odom_delay_s=args.odom_delay,
            odom_source=args.odom_source, overwrite=args.overwrite, cameras=args.cameras,
        )
    except (ValueError, FileExistsError) as e:
        print(f"synthetic_bag: error: {e}", file=sys.stderr)
        return 2
    odom = "exact" if errors.exact else (f"scale error {errors.scale_error:+.1%}, yaw drift "
                                         f"{errors.yaw_drift_deg_per_m} deg/m, {len(errors.slips)} slips")
    cams = ", ".join(args.cameras) if args.cameras else CAMERA
    n_frames = int(round(args.duration * args.rate))
    print(f"wrote {path} ({args.storage}, {args.format} images of {cams}, {n_frames} frames "
          f"{args.width}x{args.height}, odometry {odom}) with ground truth on /ground_truth/*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
