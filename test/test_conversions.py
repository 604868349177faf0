"""ROS message <-> numpy/torch conversions, on plain message objects (no DDS, no rclpy.init)."""

from __future__ import annotations

import array

import numpy as np
import pytest
import torch
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Pose, Quaternion, Transform, Vector3
from nav_msgs.msg import Odometry
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import Header

from mapany_ros.core.frames import CameraModel
from mapany_ros.core.geometry import make_pose
from mapany_ros.ros import conversions as conv
from mapany_ros.ros.conversions import ConversionError

RNG = np.random.default_rng(7)
H, W = 5, 7


def rgb_image() -> np.ndarray:
    return RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)


def image(encoding: str, pixels: np.ndarray, pad: int = 0, big_endian: bool = False) -> Image:
    """Image message with ``pad`` extra bytes per row, data as rclpy delivers it (array.array)."""
    h, w = pixels.shape[:2]
    rows = np.ascontiguousarray(pixels).reshape(h, -1).view(np.uint8)
    padded = np.concatenate([rows, np.full((h, pad), 0xAB, np.uint8)], axis=1)
    return Image(
        height=h,
        width=w,
        encoding=encoding,
        is_bigendian=int(big_endian),
        step=padded.shape[1],
        data=array.array("B", padded.tobytes()),
    )


def some_pose(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return make_pose(Rotation.random(random_state=seed).as_matrix(), rng.normal(size=3))


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("pad", [0, 3])
def test_every_color_encoding_decodes_to_rgb(pad):
    rgb = rgb_image()
    alpha = RNG.integers(0, 256, (H, W, 1), dtype=np.uint8)
    cases = {
        "rgb8": rgb,
        "bgr8": rgb[..., ::-1],
        "rgba8": np.concatenate([rgb, alpha], axis=2),
        "bgra8": np.concatenate([rgb[..., ::-1], alpha], axis=2),
    }
    for encoding, pixels in cases.items():
        out = conv.image_to_rgb(image(encoding, pixels, pad))
        assert out.shape == (H, W, 3) and out.dtype == np.uint8, encoding
        assert out.flags.c_contiguous, encoding
        np.testing.assert_array_equal(out, rgb, err_msg=encoding)
    mono = rgb[..., 0]
    out = conv.image_to_rgb(image("mono8", mono, pad))
    np.testing.assert_array_equal(out, np.repeat(mono[..., None], 3, axis=2))


def test_unpadded_rgb8_is_a_view_and_bytes_data_works():
    rgb = rgb_image()
    msg = image("rgb8", rgb)
    out = conv.image_to_rgb(msg)
    assert np.shares_memory(out, np.frombuffer(msg.data, np.uint8))
    assert torch.equal(torch.from_numpy(out), torch.from_numpy(rgb))
    msg_bytes = Image(height=H, width=W, encoding="rgb8", step=W * 3)
    msg_bytes._data = rgb.tobytes()  # as if data were bytes, not array.array
    np.testing.assert_array_equal(conv.image_to_rgb(msg_bytes), rgb)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"encoding": "yuv422"}, "unsupported image encoding 'yuv422'"),
        ({"height": 0, "data": b""}, "empty image"),
        ({"width": 0}, "empty image"),
        ({"step": W * 3 - 1}, "step"),
        ({"data": bytes(H * W * 3 - 1)}, "expected height\\*step"),
        ({"data": bytes(H * W * 3 + 1)}, "expected height\\*step"),
    ],
)
def test_image_errors_are_clear(kwargs, match):
    fields = {"height": H, "width": W, "encoding": "rgb8", "step": W * 3, "data": bytes(H * W * 3)}
    fields.update(kwargs)
    with pytest.raises(ConversionError, match=match):
        conv.image_to_rgb(Image(**fields))
    assert issubclass(ConversionError, ValueError)


@pytest.mark.parametrize("pad", [0, 2])
@pytest.mark.parametrize("big_endian", [False, True])
def test_depth_16uc1_is_millimetres_with_zero_invalid(pad, big_endian):
    mm = np.array([[0, 1, 1000], [65535, 250, 0]], dtype=np.uint16)
    raw = mm.astype(">u2" if big_endian else "<u2")
    depth = conv.depth_image_to_array(image("16UC1", raw, pad, big_endian))
    assert depth.dtype == np.float32 and depth.shape == (2, 3)
    expected = np.array([[np.nan, 0.001, 1.0], [65.535, 0.25, np.nan]], np.float32)
    np.testing.assert_allclose(depth, expected, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("pad", [0, 4])
@pytest.mark.parametrize("big_endian", [False, True])
def test_depth_32fc1_invalid_values_become_nan(pad, big_endian):
    m = np.array([[1.5, 0.0, np.nan], [np.inf, -np.inf, -2.0], [0.25, 3.0, 1e-3]], np.float32)
    depth = conv.depth_image_to_array(
        image("32FC1", m.astype(">f4" if big_endian else "<f4"), pad, big_endian)
    )
    expected = np.array([[1.5, np.nan, np.nan], [np.nan, np.nan, np.nan], [0.25, 3.0, 1e-3]], np.float32)
    np.testing.assert_array_equal(depth, expected)
    assert depth.dtype == np.float32 and depth.dtype.isnative


def test_depth_errors():
    with pytest.raises(ConversionError, match="unsupported depth encoding 'rgb8'"):
        conv.depth_image_to_array(image("rgb8", rgb_image()))
    msg = image("16UC1", np.zeros((H, W), np.uint16))
    msg.step = W  # one byte a pixel is too few for 16-bit depth
    with pytest.raises(ConversionError, match="step"):
        conv.depth_image_to_array(msg)
    msg = image("32FC1", np.zeros((H, W), np.float32))
    msg.data = msg.data[:-4]
    with pytest.raises(ConversionError, match="bytes"):
        conv.depth_image_to_array(msg)


def test_rgb_depth_and_float_image_round_trips():
    header = Header(stamp=Time(sec=3, nanosec=4), frame_id="cam")
    rgb = rgb_image()
    for source in (rgb, torch.from_numpy(rgb)):
        msg = conv.rgb_to_image_msg(source, header)
        assert (msg.encoding, msg.step, msg.height, msg.width) == ("rgb8", W * 3, H, W)
        assert isinstance(msg.data, array.array) and msg.header.frame_id == "cam"
        np.testing.assert_array_equal(conv.image_to_rgb(msg), rgb)

    depth = RNG.uniform(0.1, 10, (H, W)).astype(np.float32)
    depth[1, 2] = np.nan
    msg = conv.depth_to_image_msg(torch.from_numpy(depth), header)
    assert (msg.encoding, msg.step, msg.is_bigendian) == ("32FC1", W * 4, 0)
    np.testing.assert_array_equal(conv.depth_image_to_array(msg), depth)

    conf = RNG.uniform(0, 5, (H, W))  # float64 in: published as float32
    msg = conv.float_image_msg(conf, header)
    back = np.frombuffer(msg.data, np.float32).reshape(H, W)
    np.testing.assert_allclose(back, conf.astype(np.float32))

    with pytest.raises(ConversionError, match="uint8"):
        conv.rgb_to_image_msg(rgb.astype(np.float32))
    with pytest.raises(ConversionError, match="\\(H, W\\)"):
        conv.depth_to_image_msg(np.zeros((H, W, 1), np.float32))


# --------------------------------------------------------------------------- camera info


def test_camera_info_round_trip():
    K = np.array([[500.0, 0, 319.5], [0, 510.0, 239.5], [0, 0, 1]])
    model = CameraModel(640, 480, K, "plumb_bob", np.array([0.1, -0.05, 0.001, 0.002, 0.0]))
    msg = conv.model_to_camera_info(model, Header(frame_id="cam"))
    np.testing.assert_array_equal(np.asarray(msg.p).reshape(3, 4), np.hstack([K, np.zeros((3, 1))]))
    np.testing.assert_array_equal(np.asarray(msg.r).reshape(3, 3), np.eye(3))
    back = conv.camera_info_to_model(msg)
    assert (back.width, back.height, back.distortion_model) == (640, 480, "plumb_bob")
    np.testing.assert_array_equal(back.K, K)
    np.testing.assert_array_equal(back.D, model.D)
    assert not back.is_pinhole


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"k": np.zeros(9)}, "fx=0.0"),
        ({"k": np.array([500.0, 0, 320, 0, -1, 240, 0, 0, 1])}, "fy=-1.0"),
        ({"k": np.array([500.0, 0, np.nan, 0, 500, 240, 0, 0, 1])}, "not finite"),
        ({"width": 0}, "empty image size"),
        ({"height": 0}, "empty image size"),
        ({"d": [0.1, np.inf, 0.0, 0.0, 0.0]}, "D is not finite"),
    ],
)
def test_camera_info_validation(change, match):
    fields = {"width": 640, "height": 480, "k": np.array([500.0, 0, 320, 0, 500, 240, 0, 0, 1])}
    fields.update(change)
    with pytest.raises(ConversionError, match=match):
        conv.camera_info_to_model(CameraInfo(**fields))


# --------------------------------------------------------------------------- point clouds


def test_pointcloud2_layout_is_what_rviz_expects():
    points = np.array([[1.0, 2.0, 3.0], [-1.5, 0.0, 1e-3]], np.float32)
    colors = np.array([[255, 0, 0], [1, 2, 3]], np.uint8)
    msg = conv.pointcloud2_from_points(points, colors, Header(frame_id="map"))
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == [
        ("x", 0, PointField.FLOAT32, 1),
        ("y", 4, PointField.FLOAT32, 1),
        ("z", 8, PointField.FLOAT32, 1),
        ("rgb", 12, PointField.FLOAT32, 1),
    ]
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (1, 2, 16, 32)
    assert msg.is_dense and not msg.is_bigendian and msg.header.frame_id == "map"
    assert len(msg.data) == 32 and isinstance(msg.data, array.array)
    raw = np.frombuffer(msg.data, np.uint8).reshape(2, 16)
    np.testing.assert_array_equal(raw[:, :12].copy().view("<f4"), points)
    rgb_word = raw[:, 12:16].copy().view("<u4").ravel()
    assert rgb_word[0] == 0x00FF0000  # red
    assert rgb_word[1] == 0x00010203


@pytest.mark.parametrize("kind", ["numpy", "torch", "torch_float64"])
def test_pointcloud2_round_trip(kind):
    n = 1000
    points = RNG.normal(size=(n, 3)).astype(np.float32)
    colors = RNG.integers(0, 256, (n, 3), dtype=np.uint8)
    if kind == "numpy":
        msg = conv.pointcloud2_from_points(points, colors)
    elif kind == "torch":
        msg = conv.pointcloud2_from_points(torch.from_numpy(points), torch.from_numpy(colors))
    else:
        msg = conv.pointcloud2_from_points(torch.from_numpy(points).double(), colors)
    back_points, back_colors = conv.pointcloud2_to_arrays(msg)
    np.testing.assert_array_equal(back_points, points)
    np.testing.assert_array_equal(back_colors, colors)


def test_pointcloud2_torch_packing_matches_numpy_packing():
    """The on-device (GPU) packing must give the same bytes as the host path."""
    points = torch.randn(257, 3)
    colors = torch.randint(0, 256, (257, 3), dtype=torch.uint8)
    a = conv._pack_cloud_torch(points, colors)
    b = conv._pack_cloud_numpy(points.numpy(), colors.numpy())
    np.testing.assert_array_equal(a, b)


def test_pointcloud2_empty_and_errors():
    msg = conv.pointcloud2_from_points(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8))
    assert (msg.width, len(msg.data)) == (0, 0)
    points, colors = conv.pointcloud2_to_arrays(msg)
    assert points.shape == (0, 3) and colors.shape == (0, 3)
    with pytest.raises(ConversionError, match="points must be"):
        conv.pointcloud2_from_points(np.zeros((4, 2)), np.zeros((4, 2), np.uint8))
    with pytest.raises(ConversionError, match="colors must be \\(N, 3\\)"):
        conv.pointcloud2_from_points(np.zeros((4, 3)), np.zeros((3, 3), np.uint8))
    with pytest.raises(ConversionError, match="uint8"):
        conv.pointcloud2_from_points(np.zeros((4, 3)), np.zeros((4, 3), np.float32))
    with pytest.raises(ConversionError, match="no 'z' field"):
        conv.pointcloud2_to_arrays(PointCloud2(fields=msg.fields[:2]))


def test_pointcloud2_to_arrays_reads_foreign_layouts():
    """An organised cloud with padding, xyz at other offsets and no colour."""
    h, w, step = 2, 3, 20
    row_step = w * step + 4
    xyz = RNG.normal(size=(h, w, 3)).astype(np.float32)
    data = np.zeros((h, row_step), np.uint8)
    for r in range(h):
        block = np.zeros((w, step), np.uint8)
        block[:, 4:16] = xyz[r].view(np.uint8).reshape(w, 12)
        data[r, : w * step] = block.ravel()
    fields = [
        PointField(name=name, offset=4 + 4 * i, datatype=PointField.FLOAT32, count=1)
        for i, name in enumerate("xyz")
    ]
    msg = PointCloud2(
        height=h, width=w, fields=fields, point_step=step, row_step=row_step, data=data.tobytes()
    )
    points, colors = conv.pointcloud2_to_arrays(msg)
    assert colors is None
    np.testing.assert_array_equal(points, xyz.reshape(-1, 3))


# --------------------------------------------------------------------------- poses and time


def test_pose_and_transform_round_trips():
    for seed in range(5):
        T = some_pose(seed)
        np.testing.assert_allclose(conv.pose_to_matrix(conv.matrix_to_pose(T)), T, atol=1e-12)
        ts = conv.matrix_to_transform_stamped(T, "map", "base_link", 1_500_000_001)
        assert (ts.header.frame_id, ts.child_frame_id) == ("map", "base_link")
        assert (ts.header.stamp.sec, ts.header.stamp.nanosec) == (1, 500_000_001)
        np.testing.assert_allclose(conv.transform_to_matrix(ts.transform), T, atol=1e-12)
        ts2 = conv.matrix_to_transform_stamped(T, "a", "b", Time(sec=7, nanosec=8))
        assert conv.stamp_to_ns(ts2.header.stamp) == 7_000_000_008
    assert conv.matrix_to_pose(some_pose(1)).orientation.w >= 0
    with pytest.raises(ConversionError, match="finite 4x4"):
        conv.matrix_to_pose(np.full((4, 4), np.nan))
    with pytest.raises(ConversionError, match="finite 4x4"):
        conv.matrix_to_pose(np.eye(3))


def test_quaternion_validation_in_odometry():
    odom = Odometry()
    odom.pose.pose.position.x = 1.0
    q = Rotation.from_euler("z", 90, degrees=True).as_quat()
    qs = q * (1 + 5e-4)  # norm off by 5e-4: rounding in the publisher, normalised
    odom.pose.pose.orientation = Quaternion(x=qs[0], y=qs[1], z=qs[2], w=qs[3])
    T = conv.odometry_to_matrix(odom)
    np.testing.assert_allclose(T[:3, :3], Rotation.from_quat(q).as_matrix(), atol=1e-12)
    np.testing.assert_array_equal(T[:3, 3], [1.0, 0.0, 0.0])

    bad = {
        "zero quaternion": Quaternion(x=0.0, y=0.0, z=0.0, w=0.0),
        "scaled": Quaternion(x=0.0, y=0.0, z=0.0, w=1.01),
        "nan": Quaternion(x=np.nan, y=0.0, z=0.0, w=1.0),
    }
    for quat in bad.values():
        odom.pose.pose.orientation = quat
        with pytest.raises(ConversionError, match="quaternion"):
            conv.odometry_to_matrix(odom)
        with pytest.raises(ConversionError, match="quaternion"):
            conv.transform_to_matrix(Transform(rotation=quat))
    odom.pose.pose.orientation = Quaternion()
    odom.pose.pose.position.y = np.inf
    with pytest.raises(ConversionError, match="position is not finite"):
        conv.odometry_to_matrix(odom)
    with pytest.raises(ConversionError, match="translation is not finite"):
        conv.transform_to_matrix(Transform(translation=Vector3(x=np.nan)))
    assert np.array_equal(conv.pose_to_matrix(Pose()), np.eye(4))


def test_stamps():
    for ns in (0, 1, 999_999_999, 1_000_000_000, 1_700_000_000_123_456_789):
        stamp = conv.ns_to_stamp(ns)
        assert 0 <= stamp.nanosec < 1_000_000_000
        assert conv.stamp_to_ns(stamp) == ns
    assert conv.stamp_to_ns(Time(sec=1_700_000_000, nanosec=123_456_789)) == 1_700_000_000_123_456_789


def test_pose_stamped():
    for i, ns in enumerate((0, 1_000_000_000, 1_700_000_000_123_456_789)):
        ps = conv.pose_stamped(some_pose(i), "map", ns)
        assert ps.header.frame_id == "map" and conv.stamp_to_ns(ps.header.stamp) == ns
        np.testing.assert_allclose(conv.pose_to_matrix(ps.pose), some_pose(i), atol=1e-12)


def test_occupancy_grid_message_is_row_major_from_the_lower_left_cell():
    from rclpy.serialization import deserialize_message, serialize_message

    from mapany_ros.core.occupancy import GridSnapshot

    data = np.full((3, 4), -1, np.int8)  # 3 rows (y) x 4 columns (x)
    data[0, 3] = 100  # lowest row, last column: x in [1.15, 1.2), y in [-0.5, -0.45)
    data[2, 0] = 0  # top row, first column
    grid = GridSnapshot(data, (1.0, -0.5), 0.05, 7)
    header = Header(stamp=Time(sec=3, nanosec=4), frame_id="map")
    msg = deserialize_message(serialize_message(conv.occupancy_grid(grid, header)), type(conv.occupancy_grid(grid)))
    assert msg.header.frame_id == "map" and msg.info.map_load_time == header.stamp
    assert (msg.info.width, msg.info.height) == (4, 3) and msg.info.resolution == pytest.approx(0.05)
    p, q = msg.info.origin.position, msg.info.origin.orientation
    assert (p.x, p.y, p.z, q.x, q.y, q.z, q.w) == (1.0, -0.5, 0.0, 0.0, 0.0, 0.0, 1.0)
    assert list(msg.data) == [-1, -1, -1, 100, -1, -1, -1, -1, 0, -1, -1, -1]  # data[y * width + x]
    back = conv.occupancy_grid_to_snapshot(msg)
    np.testing.assert_array_equal(back.data, data)
    assert back.cell_of(1.17, -0.48) == (0, 3) and back.data[back.cell_of(1.17, -0.48)] == 100

    empty = conv.occupancy_grid(GridSnapshot(np.zeros((0, 0), np.int8), (0.0, 0.0), 0.05, 0))
    assert (empty.info.width, empty.info.height, list(empty.data)) == (1, 1, [-1])
    # Packed for the map publisher: the same cells as int8 bytes in the buffer, data left empty.
    shared = np.full(64, 7, np.uint8)
    sizes: list[int] = []
    packed = conv.occupancy_grid(grid, header, buffer=lambda n: (sizes.append(n), shared[:n])[1])
    assert len(packed.data) == 0 and sizes == [12] and (packed.info.width, packed.info.height) == (4, 3)
    assert list(shared[:12].view(np.int8)) == list(msg.data) and shared[12] == 7
    msg.info.width = 5
    with pytest.raises(ConversionError, match="12 cells"):
        conv.occupancy_grid_to_snapshot(msg)
