"""Conversions between ROS 2 messages and the core's numpy/torch types, with numpy only.

Why numpy only: ``cv_bridge``, ``sensor_msgs_py`` and ``tf_transformations`` are not
installable next to the PyPI ROS 2 wheels (and cv_bridge is broken under numpy 2 anyway).
The pieces needed here are small: images and clouds are strided views onto the message's
byte buffer, poses go through scipy via :mod:`mapany_ros.core.geometry`.

Speed rules, measured: read ``msg.data`` through strided numpy views (no copy); write byte
fields from ``arr.tobytes()`` (0.7 ms for 4.8 MB) - assigning an ndarray to ``msg.data``
makes rclpy iterate element by element (265 ms for 4.8 MB). No per-pixel Python loops.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Point, Pose, PoseStamped, Quaternion, Transform, TransformStamped, Vector3
from nav_msgs.msg import Odometry
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import Header

from mapany_ros.core.frames import CameraModel
from mapany_ros.core.geometry import pose_from_quat, quat_from_pose

__all__ = [
    "ConversionError",
    "camera_info_to_model",
    "depth_image_to_array",
    "depth_to_image_msg",
    "float_image_msg",
    "image_to_rgb",
    "matrix_to_pose",
    "matrix_to_transform_stamped",
    "model_to_camera_info",
    "ns_to_stamp",
    "odometry_to_matrix",
    "pointcloud2_from_points",
    "pointcloud2_to_arrays",
    "pose_stamped",
    "pose_to_matrix",
    "rgb_to_image_msg",
    "stamp_to_ns",
    "transform_to_matrix",
]

NS_PER_S = 1_000_000_000
#: Quaternions further than this from unit norm are rejected rather than silently normalised:
#: they indicate a broken publisher, not rounding.
QUAT_NORM_TOL = 1e-3

_HOST_BIG_ENDIAN = sys.byteorder == "big"

# encoding -> (channels in the message, channel order to get RGB; None = replicate mono)
_COLOR_ENCODINGS: dict[str, tuple[int, tuple[int, int, int] | None]] = {
    "rgb8": (3, (0, 1, 2)),
    "bgr8": (3, (2, 1, 0)),
    "rgba8": (4, (0, 1, 2)),
    "bgra8": (4, (2, 1, 0)),
    "mono8": (1, None),
}
_DEPTH_ENCODINGS: dict[str, str] = {"16UC1": "u2", "32FC1": "f4"}

#: PointCloud2 layout published by :func:`pointcloud2_from_points` (what RViz expects).
CLOUD_POINT_STEP = 16
#: Bytes a point of the fused map's cloud: x, y, z, rgb, confidence.
MAP_POINT_STEP = CLOUD_POINT_STEP + 4


class ConversionError(ValueError):
    """A message cannot be converted; the message says which field is wrong and why."""


# --------------------------------------------------------------------------- images


def _strided_view(msg: Image, channels: int, dtype: np.dtype) -> np.ndarray:
    """(H, W, channels) view onto ``msg.data`` honouring ``step`` padding, without copying.

    Validates the geometry first so that a truncated or mislabelled message raises a clear
    :class:`ConversionError` instead of a numpy reshape error or reading garbage.
    """
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise ConversionError(f"empty image ({w}x{h}, encoding {msg.encoding!r})")
    row_bytes = w * channels * dtype.itemsize
    if step < row_bytes:
        raise ConversionError(
            f"image step {step} < width*bytes_per_pixel = {w}*{channels * dtype.itemsize} = {row_bytes}"
            f" (encoding {msg.encoding!r})"
        )
    size = len(msg.data)
    if size != h * step:
        raise ConversionError(f"image data has {size} bytes, expected height*step = {h}*{step} = {h * step}")
    return np.ndarray(
        shape=(h, w, channels),
        dtype=dtype,
        buffer=msg.data,
        strides=(step, channels * dtype.itemsize, dtype.itemsize),
    )


def image_to_rgb(msg: Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB array from an rgb8/bgr8/rgba8/bgra8/mono8 Image.

    For unpadded rgb8 the result is a zero-copy view onto ``msg.data`` (writable when the data
    is rclpy's ``array.array``); every other case costs exactly one copy. ``is_bigendian`` is
    irrelevant for 8-bit encodings. Raises :class:`ConversionError` on an unsupported encoding
    or inconsistent size fields.
    """
    try:
        channels, order = _COLOR_ENCODINGS[msg.encoding]
    except KeyError:
        raise ConversionError(
            f"unsupported image encoding {msg.encoding!r}; supported: {', '.join(_COLOR_ENCODINGS)}"
        ) from None
    view = _strided_view(msg, channels, np.dtype(np.uint8))
    if order is None:
        return np.repeat(view, 3, axis=2)
    if order == (0, 1, 2) and channels == 3:
        return np.ascontiguousarray(view)
    return np.ascontiguousarray(view[..., list(order)])


def depth_image_to_array(msg: Image) -> np.ndarray:
    """(H, W) float32 depth in metres from a 16UC1 (millimetres) or 32FC1 (metres) Image.

    Invalid pixels become NaN, the core's single "missing" marker: 0 for 16UC1; 0, negative,
    NaN and +-inf (REP 118's too-far/too-close) for 32FC1. Honours ``step`` and
    ``is_bigendian``.
    """
    try:
        kind = _DEPTH_ENCODINGS[msg.encoding]
    except KeyError:
        raise ConversionError(
            f"unsupported depth encoding {msg.encoding!r}; supported: {', '.join(_DEPTH_ENCODINGS)}"
        ) from None
    dtype = np.dtype((">" if msg.is_bigendian else "<") + kind)
    raw = _strided_view(msg, 1, dtype)[..., 0]
    if kind == "u2":
        depth = raw.astype(np.float32) * np.float32(1e-3)
        depth[raw == 0] = np.nan
    else:
        depth = raw.astype(np.float32)  # also converts byte order and makes it contiguous
        with np.errstate(invalid="ignore"):
            depth[~(np.isfinite(depth) & (depth > 0))] = np.nan
    return depth


def _to_numpy(x: Any) -> np.ndarray:
    """Host numpy array from a numpy array or a (possibly GPU) torch tensor, without copying when on CPU."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _image_msg(arr: np.ndarray, header: Header | None, encoding: str) -> Image:
    """Image message around a C-contiguous (H, W[, C]) array; one ``tobytes`` copy."""
    arr = np.ascontiguousarray(arr)
    msg = Image()
    msg.header = header if header is not None else Header()
    msg.height, msg.width = int(arr.shape[0]), int(arr.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = int(arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and _HOST_BIG_ENDIAN))
    msg.step = int(arr.strides[0])
    msg.data = arr.tobytes()
    return msg


def rgb_to_image_msg(rgb: np.ndarray | torch.Tensor, header: Header | None = None) -> Image:
    """rgb8 Image from an (H, W, 3) uint8 RGB array or tensor."""
    arr = _to_numpy(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ConversionError(f"rgb image must be (H, W, 3) uint8, got {arr.shape} {arr.dtype}")
    return _image_msg(arr, header, "rgb8")


def float_image_msg(values: np.ndarray | torch.Tensor, header: Header | None = None) -> Image:
    """32FC1 Image from an (H, W) float array or tensor (e.g. confidence); NaN passes through."""
    arr = _to_numpy(values)
    if arr.ndim != 2:
        raise ConversionError(f"float image must be (H, W), got shape {arr.shape}")
    return _image_msg(arr.astype(np.float32, copy=False), header, "32FC1")


def depth_to_image_msg(depth_m: np.ndarray | torch.Tensor, header: Header | None = None) -> Image:
    """32FC1 depth Image in metres (REP 118) from an (H, W) array/tensor; NaN marks invalid."""
    return float_image_msg(depth_m, header)


# --------------------------------------------------------------------------- camera info


def camera_info_to_model(msg: CameraInfo, rectified: bool = False) -> CameraModel:
    """:class:`CameraModel` from a CameraInfo, rejecting intrinsics that cannot be used.

    Uncalibrated drivers publish all-zero K; catching that here gives a clear error instead of
    divisions by zero deep inside a backend. Binning and ROI are not applied. For a rectified
    image (image_proc's ``image_rect``) the camera is P's left 3x3 without distortion, as the
    CameraInfo convention defines it; D and K describe only the raw image.
    """
    width, height = int(msg.width), int(msg.height)
    if width <= 0 or height <= 0:
        raise ConversionError(f"CameraInfo has an empty image size {width}x{height}")
    if rectified:
        P = np.asarray(msg.p, dtype=np.float64).reshape(3, 4)
        K, D, model = P[:, :3].copy(), np.zeros(5), "plumb_bob"
        what = "P"
    else:
        K = np.asarray(msg.k, dtype=np.float64).reshape(3, 3).copy()
        D, model, what = np.asarray(msg.d, dtype=np.float64).copy(), str(msg.distortion_model), "K"
    if not np.all(np.isfinite(K)):
        raise ConversionError(f"CameraInfo {what} is not finite: {K.ravel().tolist()}")
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ConversionError(
            f"CameraInfo {what} has fx={K[0, 0]}, fy={K[1, 1]}; both must be > 0 (camera not calibrated?)"
        )
    if not np.all(np.isfinite(D)):
        raise ConversionError(f"CameraInfo D is not finite: {D.tolist()}")
    return CameraModel(width=width, height=height, K=K, distortion_model=model, D=D)


def model_to_camera_info(model: CameraModel, header: Header | None = None) -> CameraInfo:
    """CameraInfo for a :class:`CameraModel`: K, R = I, P = [K | 0], D and distortion model."""
    msg = CameraInfo()
    msg.header = header if header is not None else Header()
    msg.width, msg.height = int(model.width), int(model.height)
    K = np.asarray(model.K, dtype=np.float64).reshape(3, 3)
    msg.k = K.ravel().copy()
    msg.r = np.eye(3).ravel()
    msg.p = np.hstack([K, np.zeros((3, 1))]).ravel()
    msg.d = np.asarray(model.D, dtype=np.float64).ravel().tolist()
    msg.distortion_model = model.distortion_model
    return msg


# --------------------------------------------------------------------------- point clouds


def _cloud_fields() -> list[PointField]:
    """x, y, z float32 at 0/4/8 and ``rgb`` float32 at 12 holding 0x00RRGGBB, as RViz expects."""
    return [
        PointField(name="x", offset=0, datatype=PointField.FLOAT32, count=1),
        PointField(name="y", offset=4, datatype=PointField.FLOAT32, count=1),
        PointField(name="z", offset=8, datatype=PointField.FLOAT32, count=1),
        PointField(name="rgb", offset=12, datatype=PointField.FLOAT32, count=1),
    ]


# Byte offsets of R, G, B inside the colour word 0x00RRGGBB as stored in memory; byte 15 or
# 12 (the word's top byte) is zero.
_RGB_BYTES = (13, 14, 15) if _HOST_BIG_ENDIAN else (14, 13, 12)
_PAD_BYTE = 12 if _HOST_BIG_ENDIAN else 15


def _message_buffer(nbytes: int) -> tuple[array.array, np.ndarray]:
    """A uint8 ``array.array`` of ``nbytes`` and a writable numpy view onto it.

    rclpy keeps an ``array.array('B')`` assigned to a ``uint8[]`` field as it is; anything else
    is copied into a new one. Packing straight into the array saves two full passes over the
    cloud (``tobytes`` and the setter's copy).
    """
    data = array.array("B", bytes(nbytes))
    return data, np.frombuffer(data, dtype=np.uint8)


def _pack_cloud_numpy(points: np.ndarray, colors: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(N, 16) uint8 buffer in the layout of :func:`_cloud_fields`, single-threaded numpy.

    Works on bit patterns only: xyz are copied as uint32 words and the colour word 0x00RRGGBB
    byte by byte, so no float arithmetic can flush the colour's denormal bit patterns. One
    strided 1-D copy per column: numpy is slow on (N, 3) blocks whose inner loop has 3 items.
    """
    pts = np.ascontiguousarray(points, dtype=np.float32).view(np.uint32)
    buf = np.empty((pts.shape[0], CLOUD_POINT_STEP), dtype=np.uint8) if out is None else out
    words = buf.view(np.uint32)
    for k in range(3):
        words[:, k] = pts[:, k]
    for k, offset in enumerate(_RGB_BYTES):
        buf[:, offset] = colors[:, k]
    buf[:, _PAD_BYTE] = 0
    return buf


def _pack_cloud_torch(points: torch.Tensor, colors: torch.Tensor) -> np.ndarray:
    """Same layout as :func:`_pack_cloud_numpy`, built on the tensors' (GPU) device.

    The packed 16 bytes a point then cross to the host in one transfer instead of two.
    """
    pts = points.detach().to(torch.float32).contiguous()
    col = colors.detach().to(device=pts.device)
    buf = torch.empty((pts.shape[0], CLOUD_POINT_STEP), dtype=torch.uint8, device=pts.device)
    buf[:, :12] = pts.view(torch.uint8)
    for k, offset in enumerate(_RGB_BYTES):
        buf[:, offset] = col[:, k]
    buf[:, _PAD_BYTE] = 0
    return buf.cpu().numpy()


def pointcloud2_from_points(
    points: np.ndarray | torch.Tensor,
    colors: np.ndarray | torch.Tensor,
    header: Header | None = None,
) -> PointCloud2:
    """Unorganised, dense PointCloud2 (x, y, z, rgb; 16 bytes a point) from (N, 3) arrays.

    ``points`` float32 (other floats are cast) and ``colors`` uint8 RGB, numpy or torch; CPU
    tensors are read without a copy, GPU tensors are packed on the GPU and cross once. The
    caller passes finite points only: the cloud is flagged ``is_dense``. ``rgb`` is a FLOAT32
    field whose bits are 0x00RRGGBB, the convention RViz and PCL use.
    """
    if not isinstance(points, torch.Tensor):
        points = np.asarray(points)
    if not isinstance(colors, torch.Tensor):
        colors = np.asarray(colors)
    if points.ndim != 2 or tuple(points.shape[1:]) != (3,):
        raise ConversionError(f"points must be (N, 3), got {tuple(points.shape)}")
    if tuple(colors.shape) != tuple(points.shape):
        raise ConversionError(
            f"colors must be (N, 3) like points {tuple(points.shape)}, got {tuple(colors.shape)}"
        )
    if colors.dtype not in (np.uint8, torch.uint8):
        raise ConversionError(f"colors must be uint8 RGB, got {colors.dtype}")
    n = int(points.shape[0])
    data, view = _message_buffer(n * CLOUD_POINT_STEP)
    out = view.reshape(n, CLOUD_POINT_STEP)
    if isinstance(points, torch.Tensor) and points.device.type != "cpu":
        col_t = colors if isinstance(colors, torch.Tensor) else torch.from_numpy(colors)
        out[...] = _pack_cloud_torch(points, col_t)
    else:
        # CPU tensors are wrapped without a copy: the numpy packing is single-threaded and so
        # immune to torch thread-pool stalls on a busy machine (seen: 1.5 ms -> 30 ms).
        _pack_cloud_numpy(_to_numpy(points), _to_numpy(colors), out)
    return _unorganised_cloud(header, _cloud_fields(), CLOUD_POINT_STEP, n, data)


def _unorganised_cloud(header: Header | None, fields: list, step: int, n: int, data) -> PointCloud2:
    """A 1 x N dense cloud around an already packed buffer."""
    msg = PointCloud2()
    msg.header = header if header is not None else Header()
    msg.height, msg.width = 1, n
    msg.fields = fields
    msg.is_bigendian = _HOST_BIG_ENDIAN
    msg.point_step = step
    msg.row_step = step * n
    msg.is_dense = True
    msg.data = data
    return msg


def map_cloud(points: np.ndarray, colors: np.ndarray, confidence: np.ndarray, header: Header | None = None,
              buffer: Callable[[int], np.ndarray] | None = None) -> PointCloud2:
    """The fused map as a PointCloud2: x, y, z, rgb as :func:`pointcloud2_from_points`, plus a
    float32 ``confidence`` at offset 16 (20 bytes a point), for RViz's intensity colouring.

    With ``buffer`` the points are packed into ``buffer(nbytes)`` (a writable uint8 array, e.g.
    memory shared with another process) and the message's ``data`` stays empty.
    """
    points = np.asarray(points, dtype=np.float32)
    n = int(points.shape[0])
    if np.asarray(confidence).shape != (n,):
        raise ConversionError(f"confidence must be (N,) like points {points.shape}, got {np.shape(confidence)}")
    step = MAP_POINT_STEP
    if buffer is None:
        data, view = _message_buffer(n * step)
    else:
        data, view = array.array("B"), buffer(n * step)
    out = view.reshape(n, step)
    packed = _pack_cloud_numpy(points, np.asarray(colors, dtype=np.uint8))
    out[:, :CLOUD_POINT_STEP] = packed
    out[:, CLOUD_POINT_STEP:] = np.ascontiguousarray(confidence, dtype=np.float32).view(np.uint8).reshape(n, 4)
    fields = [*_cloud_fields(), PointField(name="confidence", offset=16, datatype=PointField.FLOAT32, count=1)]
    return _unorganised_cloud(header, fields, step, n, data)


def pointcloud2_to_arrays(msg: PointCloud2) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, 3) float32 points and (N, 3) uint8 RGB colours (None without an rgb/rgba field).

    Reads any cloud with float32 x/y/z fields at arbitrary offsets, any ``point_step`` and
    ``row_step`` padding; for tests, tools and reading recorded clouds.
    """
    fields = {f.name: f for f in msg.fields}
    for name in ("x", "y", "z"):
        if name not in fields:
            raise ConversionError(f"PointCloud2 has no {name!r} field (fields: {sorted(fields)})")
        if fields[name].datatype != PointField.FLOAT32:
            raise ConversionError(
                f"PointCloud2 field {name!r} has datatype {fields[name].datatype}, want FLOAT32"
            )
    h, w, step, row_step = int(msg.height), int(msg.width), int(msg.point_step), int(msg.row_step)
    order = ">" if msg.is_bigendian else "<"
    if h * w == 0:
        return np.zeros((0, 3), np.float32), (np.zeros((0, 3), np.uint8) if "rgb" in fields else None)
    max_offset = max(f.offset + 4 for f in fields.values() if f.name in ("x", "y", "z", "rgb", "rgba"))
    if step < max_offset or row_step < w * step or len(msg.data) < (h - 1) * row_step + w * step:
        raise ConversionError(
            f"PointCloud2 sizes inconsistent: {h}x{w} points, point_step {step}, row_step {row_step},"
            f" {len(msg.data)} bytes"
        )

    def column(offset: int, dtype: str) -> np.ndarray:
        view = np.ndarray(
            shape=(h, w),
            dtype=np.dtype(order + dtype),
            buffer=msg.data,
            offset=offset,
            strides=(row_step, step),
        )
        return view.reshape(-1)

    points = np.stack([column(fields[c].offset, "f4") for c in ("x", "y", "z")], axis=1).astype(np.float32)
    color_field = fields.get("rgb") or fields.get("rgba")
    if color_field is None:
        return points, None
    word = column(color_field.offset, "u4")
    colors = np.stack([(word >> 16) & 0xFF, (word >> 8) & 0xFF, word & 0xFF], axis=1).astype(np.uint8)
    return points, colors


# --------------------------------------------------------------------------- poses and time


def _quat_xyzw(q: Quaternion) -> np.ndarray:
    """(x, y, z, w) of a message quaternion, normalised; rejects non-finite or non-unit ones.

    Rounding in publishers leaves norms like 0.99999; a norm off by more than
    :data:`QUAT_NORM_TOL` (e.g. the all-zero default quaternion) means the pose is garbage.
    """
    xyzw = np.array([q.x, q.y, q.z, q.w], dtype=np.float64)
    if not np.all(np.isfinite(xyzw)):
        raise ConversionError(f"quaternion is not finite: {xyzw.tolist()}")
    norm = float(np.linalg.norm(xyzw))
    if abs(norm - 1.0) > QUAT_NORM_TOL:
        raise ConversionError(
            f"quaternion {xyzw.tolist()} has norm {norm:.6f}, not 1 (tolerance {QUAT_NORM_TOL})"
        )
    return xyzw / norm


def _vec3(v: Point | Vector3, what: str) -> np.ndarray:
    """Finite 3-vector from a Point or Vector3."""
    t = np.array([v.x, v.y, v.z], dtype=np.float64)
    if not np.all(np.isfinite(t)):
        raise ConversionError(f"{what} is not finite: {t.tolist()}")
    return t


def pose_to_matrix(pose: Pose) -> np.ndarray:
    """4x4 float64 transform of a geometry_msgs/Pose (quaternion validated, see module)."""
    return pose_from_quat(_quat_xyzw(pose.orientation), _vec3(pose.position, "position"))


def transform_to_matrix(transform: Transform) -> np.ndarray:
    """4x4 float64 transform of a geometry_msgs/Transform."""
    return pose_from_quat(_quat_xyzw(transform.rotation), _vec3(transform.translation, "translation"))


def odometry_to_matrix(odom: Odometry) -> np.ndarray:
    """T_{header.frame_id, child_frame_id} of a nav_msgs/Odometry as 4x4 float64."""
    return pose_to_matrix(odom.pose.pose)


def _checked_matrix(T: np.ndarray) -> np.ndarray:
    """T as a finite float64 4x4 (raises otherwise), so that no NaN pose reaches the wire."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise ConversionError(f"transform must be a finite 4x4 matrix, got shape {T.shape}")
    return T


def matrix_to_pose(T: np.ndarray) -> Pose:
    """geometry_msgs/Pose of a rigid 4x4 transform (quaternion with w >= 0)."""
    T = _checked_matrix(T)
    x, y, z, w = (float(v) for v in quat_from_pose(T))
    px, py, pz = (float(v) for v in T[:3, 3])
    return Pose(position=Point(x=px, y=py, z=pz), orientation=Quaternion(x=x, y=y, z=z, w=w))


def stamp_to_ns(stamp: Time) -> int:
    """Integer nanoseconds of a builtin_interfaces/Time (exact; no float rounding)."""
    return int(stamp.sec) * NS_PER_S + int(stamp.nanosec)


def ns_to_stamp(ns: int) -> Time:
    """builtin_interfaces/Time of integer nanoseconds (nanosec always in [0, 1e9))."""
    sec, nanosec = divmod(int(ns), NS_PER_S)
    return Time(sec=sec, nanosec=nanosec)


def _as_stamp(stamp: Time | int) -> Time:
    """Accept either a Time message or integer nanoseconds."""
    return ns_to_stamp(stamp) if isinstance(stamp, (int, np.integer)) else stamp


def matrix_to_transform_stamped(
    T: np.ndarray, parent: str, child: str, stamp: Time | int
) -> TransformStamped:
    """TransformStamped ``parent`` <- ``child`` (T maps child coordinates into parent) for /tf."""
    pose = matrix_to_pose(T)
    msg = TransformStamped()
    msg.header = Header(stamp=_as_stamp(stamp), frame_id=parent)
    msg.child_frame_id = child
    p = pose.position
    msg.transform = Transform(translation=Vector3(x=p.x, y=p.y, z=p.z), rotation=pose.orientation)
    return msg


def pose_stamped(T: np.ndarray, frame_id: str, stamp: Time | int) -> PoseStamped:
    """geometry_msgs/PoseStamped of a 4x4 transform (e.g. one entry of a nav_msgs/Path)."""
    return PoseStamped(header=Header(stamp=_as_stamp(stamp), frame_id=frame_id), pose=matrix_to_pose(T))
