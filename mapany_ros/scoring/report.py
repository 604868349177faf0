"""Pictures and files a person wants to look at: colour maps, a cloud rendering, PLY export.

ROS-free and numpy-only, so the demo, the benchmarks and the tests share it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# A few anchor colours of the "turbo" colour map, interpolated linearly: close enough for
# depth pictures and needs no plotting library.
_TURBO = np.array([
    [48, 18, 59], [70, 107, 227], [40, 187, 236], [50, 241, 152], [164, 252, 59],
    [237, 208, 58], [251, 128, 34], [215, 54, 6], [122, 4, 3],
], dtype=np.float32)


def colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """(H, W, 3) uint8 turbo picture of ``values``; NaN shows black."""
    x = np.clip((values - vmin) / max(vmax - vmin, 1e-9), 0.0, 1.0) * (len(_TURBO) - 1)
    x = np.nan_to_num(x, nan=0.0)
    lo = np.floor(x).astype(int).clip(0, len(_TURBO) - 2)
    frac = (x - lo)[..., None]
    rgb = _TURBO[lo] * (1 - frac) + _TURBO[lo + 1] * frac
    rgb[~np.isfinite(values)] = 0
    return rgb.astype(np.uint8)


def render_cloud(
    points: np.ndarray, colors: np.ndarray, trajectory: np.ndarray, size: tuple[int, int] = (640, 480)
) -> np.ndarray:
    """An oblique bird's-eye picture of a z-up cloud with the trajectory drawn over it.

    A virtual pinhole camera looks down at the cloud's centre from above and behind; a
    painter's sort (far first) stands in for a z-buffer.
    """
    w, h = size
    img = np.full((h, w, 3), 24, np.uint8)
    if len(points) == 0:
        return img
    lo, hi = np.percentile(points, 2, axis=0), np.percentile(points, 98, axis=0)
    centre = (lo + hi) / 2
    extent = float(np.linalg.norm(hi[:2] - lo[:2])) / 2 + 1e-3
    eye = centre + np.array([-0.8 * extent, -1.0 * extent, 1.9 * extent])
    fwd = centre - eye
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, [0, 0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    R = np.stack([right, down, fwd])  # world -> camera rows
    f = 0.55 * w

    def project(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = (p - eye) @ R.T
        z = np.maximum(c[:, 2], 1e-3)
        return f * c[:, 0] / z + w / 2, f * c[:, 1] / z + h / 2, c[:, 2]

    u, v, z = project(points)
    ok = (z > 0.05) & (u >= 0) & (u < w - 1) & (v >= 0) & (v < h - 1)
    order = np.argsort(-z[ok])
    ui, vi, col = u[ok][order].astype(int), v[ok][order].astype(int), colors[ok][order]
    for du in (0, 1):  # 2x2 splats close the gaps between points
        for dv in (0, 1):
            img[vi + dv, ui + du] = col
    pil = Image.fromarray(img)
    if len(trajectory) > 1:
        tu, tv, tz = project(trajectory)
        draw = ImageDraw.Draw(pil)
        draw.line(list(zip(tu.tolist(), tv.tolist(), strict=True)), fill=(255, 40, 200), width=3)
        draw.ellipse([tu[-1] - 5, tv[-1] - 5, tu[-1] + 5, tv[-1] + 5], fill=(255, 255, 255))
    return np.asarray(pil)


def compose(panels: list[tuple[str, np.ndarray]], columns: int, panel_size: tuple[int, int]) -> Image.Image:
    """A titled grid of equally sized panels (resized with nearest neighbour)."""
    pw, ph = panel_size
    rows = (len(panels) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * pw, rows * (ph + 18)), (12, 12, 12))
    draw = ImageDraw.Draw(sheet)
    for i, (title, arr) in enumerate(panels):
        x, y = (i % columns) * pw, (i // columns) * (ph + 18)
        sheet.paste(Image.fromarray(arr).resize((pw, ph), Image.NEAREST), (x, y + 18))
        draw.text((x + 4, y + 3), title, fill=(235, 235, 235))
    return sheet


def write_ply(path: Path, points: np.ndarray, colors: np.ndarray) -> None:
    """Binary little-endian PLY with float xyz and uchar rgb (opens in MeshLab, CloudCompare, Open3D)."""
    rec = np.empty(len(points), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                       ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    for i, k in enumerate("xyz"):
        rec[k] = points[:, i]
    for i, k in enumerate(("red", "green", "blue")):
        rec[k] = colors[:, i]
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(points)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    )
    with open(path, "wb") as fh:
        fh.write(header.encode("ascii"))
        fh.write(rec.tobytes())


def read_ply(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Points and colours of a PLY written by :func:`write_ply`."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    n = int(next(line for line in data[:end].decode().splitlines() if line.startswith("element vertex")).split()[2])
    rec = np.frombuffer(data[end:], dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                          ("red", "u1"), ("green", "u1"), ("blue", "u1")], count=n)
    return np.stack([rec["x"], rec["y"], rec["z"]], 1), np.stack([rec["red"], rec["green"], rec["blue"]], 1)
