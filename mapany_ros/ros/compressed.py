"""sensor_msgs/CompressedImage (image_transport's "compressed" transport) <-> RGB arrays.

Decoders, chosen by measurement (``python -m mapany_ros.bench.decode``): JPEG goes
through simplejpeg when it is importable - libjpeg-turbo decoding straight into a numpy array,
1.3-1.6x faster than Pillow on 640x480 and 1920x1080 frames, a 0.4 MB manylinux wheel with no
system library - else through Pillow (also libjpeg-turbo, but it decodes into its own RGBX
storage and needs a copy out). PNG always goes through Pillow. OpenCV is slower than simplejpeg
on JPEG, only ~15 % faster than Pillow on PNG and a 61 MB wheel (150 MB installed);
PyTurboJPEG needs the system libturbojpeg.

Colour order: compressed_image_transport converts the image to bgr8 and hands it to
``cv::imencode``, which reads its Mat as BGR and writes a standard JPEG or PNG. The file holds
true colours, so a standard decoder returns RGB; the ``bgr8`` after "compressed" names the order
that ``cv::imdecode`` hands back, not the bytes (checked on OpenCV-encoded messages in
test/test_compressed.py). A "compressed rgb8" suffix, written by publishers that encode with
Pillow or libjpeg, is decoded the same way: image_transport's own subscriber would swap red and
blue there, but the file's colour space is the one every conforming encoder gets right.
"""

from __future__ import annotations

import io
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageFile
from sensor_msgs.msg import CompressedImage
from std_msgs.msg import Header

from mapany_ros.ros.conversions import ConversionError

try:
    import simplejpeg as _simplejpeg
except ImportError:  # optional on ROS installs: rosdep has it only as a pip key
    _simplejpeg = None

__all__ = ["CompressedImageLike", "compressed_to_rgb", "jpeg_decoder", "rgb_to_compressed_msg"]

_CODECS = {"jpeg": "jpeg", "jpg": "jpeg", "png": "png"}
_SIGNATURES = {"jpeg": b"\xff\xd8", "png": b"\x89PNG\r\n\x1a\n"}
# Last bytes of a complete file (trailing zero padding aside).
_END_MARKERS = {"jpeg": b"\xff\xd9", "png": b"IEND\xaeB`\x82"}
# Source encodings the raw image_raw path accepts too.
_SOURCE_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8")
_PACKED_ENCODINGS = ("", "bgr8", "rgb8", "mono8")
_DEPTH_ENCODINGS = ("16uc1", "32fc1")
#: compressed_image_transport's default png_level.
PNG_LEVEL = 3


class CompressedImageLike(Protocol):
    """What :func:`compressed_to_rgb` reads: rclpy's CompressedImage and rosbags' both fit."""

    format: str
    data: Any


def jpeg_decoder() -> str:
    """Name and version of the library that decodes JPEG here, for logs and benchmarks."""
    if _simplejpeg is not None:
        return f"simplejpeg {_simplejpeg.__version__}"
    return f"Pillow {Image.__version__}"


def _unsupported(fmt: str, why: str) -> ConversionError:
    return ConversionError(
        f"unsupported CompressedImage format {fmt!r}: {why}; supported: '<rgb8|bgr8|rgba8|bgra8|mono8>;"
        " <jpeg|png> compressed <bgr8|mono8>' as image_transport writes it, or plain 'jpeg' / 'png'"
    )


def _codec(fmt: str) -> str:
    """'jpeg' or 'png' from a format string; raises for depth, 16-bit and unknown formats."""
    text = fmt.strip().lower()
    if "compresseddepth" in text:
        raise ConversionError(
            f"CompressedImage format {fmt!r} is image_transport's compressedDepth: a depth image, not a"
            " colour image topic (subscribe to the colour camera's image_raw/compressed)"
        )
    source, sep, rest = text.partition(";")
    if not sep:
        source, rest = "", text
    source = source.strip()
    words = rest.split()
    codec = _CODECS.get(words[0]) if words else None
    if codec is None or words[1:2] not in ([], ["compressed"]) or len(words) > 3:
        raise _unsupported(fmt, f"compression {rest.strip()!r} is not jpeg or png")
    packed = words[2] if len(words) == 3 else ""
    if source in _DEPTH_ENCODINGS:
        raise ConversionError(
            f"CompressedImage format {fmt!r} holds a {source.upper()} depth image, not a colour image topic"
        )
    if "16" in source or "16" in packed:
        raise ConversionError(f"CompressedImage format {fmt!r} is a 16-bit image; the node takes 8-bit colour")
    if source and source not in _SOURCE_ENCODINGS:
        raise _unsupported(fmt, f"image encoding {source!r}")
    if packed not in _PACKED_ENCODINGS:
        raise _unsupported(fmt, f"packed encoding {packed!r}")
    return codec


def _decode_error(codec: str, data: Any, fmt: str, why: object) -> ConversionError:
    return ConversionError(
        f"cannot decode CompressedImage data as {codec.upper()} ({len(data)} bytes, format {fmt!r}):"
        f" truncated or corrupt: {why}"
    )


def _decode_simplejpeg(data: Any, fmt: str) -> np.ndarray:
    """libjpeg-turbo into a fresh array, mono expanded by libjpeg-turbo itself.

    ``strict`` turns libjpeg's warnings (premature end of file, corrupt data) into errors, so a
    damaged message raises instead of giving a half-grey image.
    """
    try:
        return _simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError as exc:
        raise _decode_error("jpeg", data, fmt, exc) from None


def _decode_pillow(data: Any, codec: str, fmt: str) -> np.ndarray:
    """JPEG or PNG through Pillow; mono is replicated, alpha and palettes resolved to RGB.

    Pillow raises on a truncated file unless some module set the process-wide
    ``ImageFile.LOAD_TRUNCATED_IMAGES``; then the file's end marker is checked here instead.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES and not bytes(data[-32:]).rstrip(b"\x00").endswith(_END_MARKERS[codec]):
        raise _decode_error(codec, data, fmt, "no end marker")
    try:
        with Image.open(io.BytesIO(data), formats=[codec.upper()]) as img:
            img.load()
            return np.array(img if img.mode == "RGB" else img.convert("RGB"))
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise _decode_error(codec, data, fmt, exc) from None


def compressed_to_rgb(msg: CompressedImageLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB array, C-contiguous and writable, from a CompressedImage.

    Accepts image_transport's "<encoding>; <jpeg|png> compressed <bgr8|mono8>" for the 8-bit
    encodings of the raw path and plain "jpeg" / "png"; mono becomes three equal channels, alpha
    is dropped. Raises :class:`ConversionError` on empty data, an unknown format, 16-bit or depth
    images (compressedDepth) and truncated or corrupt data.
    """
    fmt = str(msg.format)
    data = msg.data
    if len(data) == 0:
        raise ConversionError(f"CompressedImage has no data (format {fmt!r})")
    codec = _codec(fmt)
    head = bytes(data[:32])
    if not head.startswith(_SIGNATURES[codec]):
        raise ConversionError(
            f"CompressedImage data is not {codec.upper()} as its format {fmt!r} says: it starts with {head[:8].hex()}"
        )
    if codec == "png":
        # IHDR bit depth; Pillow would quietly read 16-bit colour as 8-bit.
        if head[12:16] == b"IHDR" and len(head) > 24 and head[24] == 16:
            raise ConversionError(f"CompressedImage PNG is 16-bit (format {fmt!r}); the node takes 8-bit colour")
        return _decode_pillow(data, codec, fmt)
    if _simplejpeg is not None:
        return _decode_simplejpeg(data, fmt)
    return _decode_pillow(data, codec, fmt)


def rgb_to_compressed_msg(
    rgb: np.ndarray, header: Header | None = None, fmt: str = "jpeg", quality: int = 90
) -> CompressedImage:
    """CompressedImage of an (H, W, 3) uint8 RGB array, as compressed_image_transport publishes an rgb8 Image.

    Format "rgb8; jpeg compressed bgr8" or "rgb8; png compressed bgr8"; JPEG at ``quality`` with
    4:2:0 chroma (OpenCV's default), PNG at image_transport's level 3, both through Pillow. For
    tests, benchmarks and synthetic bags.
    """
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ConversionError(f"rgb image must be (H, W, 3) uint8, got {arr.shape} {arr.dtype}")
    if fmt not in ("jpeg", "png"):
        raise ConversionError(f"fmt must be 'jpeg' or 'png', got {fmt!r}")
    if not 1 <= quality <= 100:
        raise ConversionError(f"jpeg quality must be in [1, 100], got {quality}")
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(arr))
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=quality, subsampling="4:2:0")
    else:
        img.save(buf, format="PNG", compress_level=PNG_LEVEL)
    msg = CompressedImage()
    msg.header = header if header is not None else Header()
    msg.format = f"rgb8; {fmt} compressed bgr8"
    msg.data = buf.getvalue()
    return msg
