"""Decode time of CompressedImage messages against raw Image conversion, for docs/benchmarks.md.

Frames are rendered by the synthetic scene (textured, shaded, with edges: JPEG and PNG see
something like a camera image), encoded as compressed_image_transport publishes them and
decoded with :func:`mapany_ros.ros.compressed.compressed_to_rgb`; the Pillow row shows the
fallback used where simplejpeg is not installed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from mapany_ros.ros import compressed, conversions
from mapany_ros.sim.scene import SyntheticScene, make_camera_model

RESOLUTIONS = ((640, 480), (1920, 1080))
JPEG_QUALITY = 90
WARMUP = 3


def _median_ms(fn: Callable[[], object], runs: int) -> float:
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _frame(width: int, height: int) -> np.ndarray:
    scene = SyntheticScene(0)
    rgb, _ = scene.render(scene.camera_pose(3.0), make_camera_model(width, height), supersample=1)
    return rgb


def bench_decode(runs: int = 30) -> list[str]:
    """Markdown lines: median decode time per format, resolution and decoder, beside raw Images."""
    pillow = f"Pillow {Image.__version__}"
    lines = [
        "## Compressed image decode",
        "",
        f"sensor_msgs/CompressedImage as compressed_image_transport publishes it (JPEG quality {JPEG_QUALITY},",
        f"4:2:0; PNG level {compressed.PNG_LEVEL}) of a synthetic frame, to (H, W, 3) RGB; median of {runs} runs after",
        f"{WARMUP} warm-up runs. JPEG decoder here: {compressed.jpeg_decoder()}. Raw rgb8 / bgr8 Images through",
        "`conversions.image_to_rgb` for comparison.",
        "",
        "| format | resolution | message kB | decoder | median ms | mean abs error |",
        "|---|---|---|---|---|---|",
    ]
    for width, height in RESOLUTIONS:
        rgb = _frame(width, height)
        res = f"{width}x{height}"
        jpeg = compressed.rgb_to_compressed_msg(rgb, fmt="jpeg", quality=JPEG_QUALITY)
        png = compressed.rgb_to_compressed_msg(rgb, fmt="png")
        jpg = f"jpeg q{JPEG_QUALITY}"
        rows = [(jpg, jpeg, compressed.jpeg_decoder(), lambda m=jpeg: compressed.compressed_to_rgb(m))]
        if compressed.jpeg_decoder() != pillow:
            rows.append((jpg, jpeg, pillow, lambda m=jpeg: compressed._decode_pillow(m.data, "jpeg", m.format)))
        rows.append(("png", png, pillow, lambda m=png: compressed.compressed_to_rgb(m)))
        raw = conversions.rgb_to_image_msg(rgb)
        bgr = conversions.rgb_to_image_msg(np.ascontiguousarray(rgb[..., ::-1]))
        bgr.encoding = "bgr8"
        rows += [
            ("raw rgb8", raw, "image_to_rgb (view)", lambda m=raw: conversions.image_to_rgb(m)),
            ("raw bgr8", bgr, "image_to_rgb (one copy)", lambda m=bgr: conversions.image_to_rgb(m)),
        ]
        for name, msg, decoder, fn in rows:
            err = np.abs(fn().astype(np.int16) - rgb).mean()
            lines.append(
                f"| {name} | {res} | {len(msg.data) / 1e3:.0f} | {decoder} | {_median_ms(fn, runs):.3f} | {err:.2f} |"
            )
    return lines + [""]


if __name__ == "__main__":
    print("\n".join(bench_decode()))
