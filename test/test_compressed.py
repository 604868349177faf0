"""CompressedImage (image_transport "compressed") -> RGB, on plain message objects (no rclpy.init)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from PIL import Image, ImageFile
from rosbags.typesys import Stores, get_typestore
from sensor_msgs.msg import CompressedImage
from std_msgs.msg import Header

from mapany_ros.ros import compressed
from mapany_ros.ros.compressed import compressed_to_rgb, rgb_to_compressed_msg
from mapany_ros.ros.conversions import ConversionError

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)

# What compressed_image_transport publishes for a 32x32 rgb8 image with red, green, blue and
# yellow 16x16 quadrants (top left, top right, bottom left, bottom right): cv_bridge turns it
# into bgr8 and cv::imencode writes it, here at the transport's defaults (jpeg_quality 95,
# png_level 3). Made with opencv-python-headless 5.0.0.93 from bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR):
#   cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
#   cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
OPENCV_JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAIBAQEBAQIBAQECAgICAgQDAgICAgUEBAMEBgUGBgYFBgYGBwkIBgcJBwYGCAsICQoKCgoKBggL"
    "DAsKDAkKCgr/2wBDAQICAgICAgUDAwUKBwYHCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgr/wAAR"
    "CAAgACADASIAAhEBAxEB/8QAHwAAAQUBAQEBAQEAAAAAAAAAAAECAwQFBgcICQoL/8QAtRAAAgEDAwIEAwUFBAQAAAF9AQIDAAQRBRIhMUEG"
    "E1FhByJxFDKBkaEII0KxwRVS0fAkM2JyggkKFhcYGRolJicoKSo0NTY3ODk6Q0RFRkdISUpTVFVWV1hZWmNkZWZnaGlqc3R1dnd4eXqDhIWG"
    "h4iJipKTlJWWl5iZmqKjpKWmp6ipqrKztLW2t7i5usLDxMXGx8jJytLT1NXW19jZ2uHi4+Tl5ufo6erx8vP09fb3+Pn6/8QAHwEAAwEBAQEB"
    "AQEBAQAAAAAAAAECAwQFBgcICQoL/8QAtREAAgECBAQDBAcFBAQAAQJ3AAECAxEEBSExBhJBUQdhcRMiMoEIFEKRobHBCSMzUvAVYnLRChYk"
    "NOEl8RcYGRomJygpKjU2Nzg5OkNERUZHSElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6goOEhYaHiImKkpOUlZaXmJmaoqOkpaanqKmqsrO0"
    "tba3uLm6wsPExcbHyMnK0tPU1dbX2Nna4uPk5ebn6Onq8vP09fb3+Pn6/9oADAMBAAIRAxEAPwD4vooor+Uz/fw/Siiiiv5bP+Fc/Buiiiv+"
    "0w/1YP7FKKKK/wCAM/qg/9k="
)
OPENCV_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAASUlEQVRIS+3UsQ0AIAwDwYT9dzZs8HLNp3ZAOlnZTDdbLpzu+T7tB2gmkUQo"
    "gAFb9AHRznQHPnkrxdgixJJIIhTAgC2SCAUwcAFLigU8ctWSVwAAAABJRU5ErkJggg=="
)


@pytest.fixture(params=["simplejpeg", "pillow"])
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with each JPEG decoder: simplejpeg, and the Pillow fallback used without it."""
    if request.param == "simplejpeg":
        pytest.importorskip("simplejpeg")
    else:
        monkeypatch.setattr(compressed, "_simplejpeg", None)
    assert compressed.jpeg_decoder().lower().startswith(request.param)
    return request.param


def quadrants() -> np.ndarray:
    rgb = np.empty((32, 32, 3), np.uint8)
    rgb[:16, :16], rgb[:16, 16:], rgb[16:, :16], rgb[16:, 16:] = RED, GREEN, BLUE, YELLOW
    return rgb


def quadrant_centres(rgb: np.ndarray) -> list[np.ndarray]:
    """Mean colour of each quadrant's central 8x8 pixels, away from chroma bleeding."""
    return [rgb[r : r + 8, c : c + 8].reshape(-1, 3).mean(axis=0) for r, c in ((4, 4), (4, 20), (20, 4), (20, 20))]


def scene(h: int = 48, w: int = 64) -> np.ndarray:
    """Smooth colour gradients with pure red, green and blue 16x16 patches on the JPEG block grid."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    rgb = np.stack([40 + 150 * x / w, 60 + 120 * y / h, 200 - 100 * (x + y) / (w + h)], axis=2)
    rgb = np.round(rgb).astype(np.uint8)
    rgb[16:32, 0:16], rgb[16:32, 16:32], rgb[16:32, 32:48] = RED, GREEN, BLUE
    return rgb


def encoded(pixels: np.ndarray, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **save)
    return buf.getvalue()


def message(fmt: str, data: bytes) -> CompressedImage:
    return CompressedImage(format=fmt, data=data)


# --------------------------------------------------------------------------- round trips


def test_jpeg_round_trip_keeps_colours(decoder: str) -> None:
    rgb = scene()
    out = compressed_to_rgb(rgb_to_compressed_msg(rgb, fmt="jpeg", quality=90))
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert out.flags.c_contiguous and out.flags.writeable
    err = np.abs(out.astype(int) - rgb)
    smooth = np.ones(rgb.shape[:2], bool)
    smooth[14:34, :50] = False  # 4:2:0 chroma bleeds across the patches' sharp edges
    assert err[smooth].max() <= 6 and err.mean() < 5.0
    for col, colour in ((0, RED), (16, GREEN), (32, BLUE)):
        patch = out[20:28, col + 4 : col + 12].astype(int)
        assert np.abs(patch - colour).max() <= 6, (colour, patch.mean(axis=(0, 1)))


def test_png_round_trip_is_exact(decoder: str) -> None:
    rgb = scene()
    msg = rgb_to_compressed_msg(rgb, Header(frame_id="cam"), fmt="png")
    out = compressed_to_rgb(msg)
    np.testing.assert_array_equal(out, rgb)
    assert out.flags.writeable


def test_opencv_encoded_messages_decode_to_true_colours(decoder: str) -> None:
    """image_transport's "compressed bgr8" means OpenCV's order after decoding; the file is RGB."""
    out = compressed_to_rgb(message("rgb8; jpeg compressed bgr8", OPENCV_JPEG))
    for got, want in zip(quadrant_centres(out), (RED, GREEN, BLUE, YELLOW)):
        np.testing.assert_allclose(got, want, atol=6)
    np.testing.assert_array_equal(compressed_to_rgb(message("bgr8; png compressed bgr8", OPENCV_PNG)), quadrants())


@pytest.mark.parametrize(
    "fmt",
    ["bgr8; jpeg compressed bgr8", "rgba8; jpeg compressed bgr8", "rgb8; jpeg compressed rgb8", "jpeg", " JPG "],
)
def test_format_spellings_decode_the_same_pixels(decoder: str, fmt: str) -> None:
    reference = compressed_to_rgb(message("rgb8; jpeg compressed bgr8", OPENCV_JPEG))
    np.testing.assert_array_equal(compressed_to_rgb(message(fmt, OPENCV_JPEG)), reference)


def test_mono8_becomes_three_equal_channels(decoder: str) -> None:
    grey = scene()[..., 1]
    out = compressed_to_rgb(message("mono8; jpeg compressed mono8", encoded(grey, "JPEG", quality=90)))
    assert out.shape == (*grey.shape, 3)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    assert np.abs(out[..., 0].astype(int) - grey).mean() < 2.0
    # image_transport leaves the packed encoding empty for mono PNG.
    out = compressed_to_rgb(message("mono8; png compressed ", encoded(grey, "PNG")))
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))


def test_alpha_is_dropped(decoder: str) -> None:
    rgb = scene()
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 77, np.uint8)], axis=2)
    np.testing.assert_array_equal(compressed_to_rgb(message("png", encoded(rgba, "PNG"))), rgb)


def test_rosbags_message_decodes_like_rclpy(decoder: str) -> None:
    """A message as rosbags reads it from a bag: a dataclass with numpy uint8 data."""
    ts = get_typestore(Stores.ROS2_KILTED)
    name = "sensor_msgs/msg/CompressedImage"
    stamp = ts.types["builtin_interfaces/msg/Time"](sec=3, nanosec=4)
    header = ts.types["std_msgs/msg/Header"](stamp=stamp, frame_id="cam")
    rclpy_msg = rgb_to_compressed_msg(scene(), fmt="jpeg")
    data = np.frombuffer(bytes(rclpy_msg.data), np.uint8)
    written = ts.types[name](header=header, format=rclpy_msg.format, data=data)
    read = ts.deserialize_cdr(ts.serialize_cdr(written, name), name)
    assert isinstance(read.data, np.ndarray)
    np.testing.assert_array_equal(compressed_to_rgb(read), compressed_to_rgb(rclpy_msg))
    read.data = read.data[:0]
    with pytest.raises(ConversionError, match="no data"):
        compressed_to_rgb(read)


def test_simplejpeg_is_used_where_installed() -> None:
    pytest.importorskip("simplejpeg")
    assert compressed.jpeg_decoder().startswith("simplejpeg ")


# --------------------------------------------------------------------------- bad input

JPEG = encoded(scene(), "JPEG", quality=90)
PNG16 = encoded(np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 20, "PNG")


@pytest.mark.parametrize(
    ("fmt", "data", "match"),
    [
        ("rgb8; jpeg compressed bgr8", b"", "no data"),
        ("rgb8; tiff compressed bgr8", JPEG, "unsupported CompressedImage format.*'tiff compressed bgr8'"),
        ("webp", JPEG, "unsupported CompressedImage format 'webp'"),
        ("", JPEG, "unsupported CompressedImage format ''"),
        ("rgb8; jpeg compressed bgr8 extra", JPEG, "unsupported CompressedImage format"),
        ("bayer_rggb8; jpeg compressed mono8", JPEG, "unsupported.*image encoding 'bayer_rggb8'"),
        ("rgb8; jpeg compressed yuv422", JPEG, "unsupported.*packed encoding 'yuv422'"),
        ("rgb16; png compressed bgr16", PNG16, "16-bit"),
        ("mono16; png compressed ", PNG16, "16-bit"),
        ("rgb16; jpeg compressed bgr8", JPEG, "16-bit"),
        ("png", PNG16, "PNG is 16-bit"),
        ("16UC1; compressedDepth png", PNG16, "compressedDepth: a depth image, not a colour image topic"),
        ("32FC1; compressedDepth rvl", bytes(20), "compressedDepth: a depth image, not a colour image topic"),
        ("16UC1; png compressed ", PNG16, "16UC1 depth image, not a colour image topic"),
        ("rgb8; jpeg compressed bgr8", b"garbage!", "not JPEG.*starts with 67617262"),
        ("rgb8; jpeg compressed bgr8", OPENCV_PNG, "not JPEG.*starts with 89504e47"),
        ("png", JPEG, "not PNG.*starts with ffd8"),
        ("jpeg", b"\xff\xd8\xff" + bytes(range(256)) * 4, "truncated or corrupt"),
        ("png", OPENCV_PNG[:40] + bytes(64), "truncated or corrupt"),
    ],
)
def test_bad_messages_raise_naming_the_problem(decoder: str, fmt: str, data: bytes, match: str) -> None:
    with pytest.raises(ConversionError, match=match):
        compressed_to_rgb(message(fmt, data))


@pytest.mark.parametrize("keep", [0.98, 0.75, 0.5, 0.1])
def test_truncated_jpeg_raises_rather_than_a_partial_image(decoder: str, keep: float) -> None:
    data = rgb_to_compressed_msg(scene(), fmt="jpeg").data
    cut = data[: int(len(data) * keep)]
    with pytest.raises(ConversionError, match=f"as JPEG \\({len(cut)} bytes.*truncated or corrupt"):
        compressed_to_rgb(message("rgb8; jpeg compressed bgr8", cut))


def test_truncated_png_raises() -> None:
    data = rgb_to_compressed_msg(scene(), fmt="png").data
    with pytest.raises(ConversionError, match="as PNG.*truncated or corrupt"):
        compressed_to_rgb(message("rgb8; png compressed bgr8", data[: len(data) // 2]))


def test_pillow_fallback_still_raises_when_truncated_images_are_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Some libraries set Pillow's process-wide LOAD_TRUNCATED_IMAGES; truncation must still raise."""
    monkeypatch.setattr(compressed, "_simplejpeg", None)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    for fmt in ("jpeg", "png"):
        data = bytes(rgb_to_compressed_msg(scene(), fmt=fmt).data)
        with pytest.raises(ConversionError, match="truncated or corrupt: no end marker"):
            compressed_to_rgb(message(fmt, data[: len(data) * 3 // 4]))
        # Zero padding after the end marker (some camera drivers add it) is still a whole image.
        assert compressed_to_rgb(message(fmt, data + bytes(7))).shape == (48, 64, 3)


def test_corrupt_jpeg_data_raises_with_simplejpeg() -> None:
    """libjpeg-turbo's warnings are errors (strict): no half-grey frames from a damaged message."""
    pytest.importorskip("simplejpeg")
    data = bytearray(rgb_to_compressed_msg(scene(), fmt="jpeg").data)
    data[len(data) // 2 : len(data) // 2 + 40] = bytes(40)
    with pytest.raises(ConversionError, match="truncated or corrupt: Corrupt JPEG data"):
        compressed_to_rgb(message("jpeg", bytes(data)))


# --------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_rgb_to_compressed_msg_writes_image_transport_format(fmt: str) -> None:
    header = Header(stamp=Time(sec=5, nanosec=6), frame_id="camera_optical_frame")
    msg = rgb_to_compressed_msg(scene(), header, fmt=fmt)
    assert msg.format == f"rgb8; {fmt} compressed bgr8"
    assert msg.header == header
    assert bytes(msg.data[:2]) == (b"\xff\xd8" if fmt == "jpeg" else b"\x89P")


def test_jpeg_quality_is_applied() -> None:
    low, high = (len(rgb_to_compressed_msg(scene(), fmt="jpeg", quality=q).data) for q in (20, 95))
    assert low < high


@pytest.mark.parametrize(
    ("rgb", "kwargs", "match"),
    [
        (np.zeros((4, 4), np.uint8), {}, "must be \\(H, W, 3\\) uint8"),
        (np.zeros((4, 4, 4), np.uint8), {}, "must be \\(H, W, 3\\) uint8"),
        (np.zeros((4, 4, 3), np.float32), {}, "must be \\(H, W, 3\\) uint8"),
        (np.zeros((4, 4, 3), np.uint8), {"fmt": "webp"}, "fmt must be 'jpeg' or 'png'"),
        (np.zeros((4, 4, 3), np.uint8), {"quality": 0}, "quality must be in \\[1, 100\\]"),
    ],
)
def test_rgb_to_compressed_msg_rejects_bad_input(rgb: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(ConversionError, match=match):
        rgb_to_compressed_msg(rgb, **kwargs)
