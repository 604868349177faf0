"""Procedural ground-truth scenes: a textured room, a robot driving in it, exact depth.

The point is to test reconstruction backends without a robot or a dataset: every frame
comes with its true pose and z-depth. Textures are 2D maps laid on each surface in metric
surface coordinates, so a colour is a function of the 3D surface point (multi-view
consistent); they are mip-mapped (trilinear) and the image is supersampled, so what a
camera sees does not alias differently from view to view, which photometric matching needs.
Rendering is analytic, vectorised ray casting in torch; no ROS, no per-pixel Python loops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from mapany_ros.core.camera_rays import plane_rays
from mapany_ros.core.frames import CameraModel, Frame
from mapany_ros.core.geometry import make_pose

#: Direction towards the (view-independent, Lambertian) light, world frame.
_LIGHT_DIR = np.array([0.35, 0.25, 0.9]) / np.linalg.norm([0.35, 0.25, 0.9])
_MIP_LEVELS = 9
_NEAR_M = 1e-3


# --------------------------------------------------------------------------- camera, poses


def make_camera_model(width: int, height: int, hfov_deg: float = 70.0) -> CameraModel:
    """Distortion-free pinhole camera with square pixels and the principal point centred."""
    if width < 2 or height < 2:
        raise ValueError(f"camera must be at least 2x2 pixels, got {width}x{height}")
    if not 1.0 < hfov_deg < 179.0:
        raise ValueError(f"hfov_deg must be in (1, 179), got {hfov_deg}")
    f = (width / 2.0) / math.tan(math.radians(hfov_deg) / 2.0)
    K = np.array([[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]])
    return CameraModel(width, height, K, "plumb_bob", np.zeros(5))


def make_T_base_camera(forward_m: float = 0.3, up_m: float = 0.5, pitch_down_deg: float = 5.0, *,
                       left_m: float = 0.0, yaw_deg: float = 0.0) -> np.ndarray:
    """base_link (x forward, z up) -> optical camera (x right, y down, z forward), pitched down.

    ``yaw_deg`` turns the camera about the base's z axis (90: looking left), ``left_m`` moves it
    sideways: the mounts of a multi-camera rig.
    """
    R_base_optical = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    p = math.radians(pitch_down_deg)
    R_pitch = np.array([[math.cos(p), 0.0, math.sin(p)], [0.0, 1.0, 0.0], [-math.sin(p), 0.0, math.cos(p)]])
    R = R_pitch @ R_base_optical
    if yaw_deg:
        y = math.radians(yaw_deg)
        R = np.array([[math.cos(y), -math.sin(y), 0.0], [math.sin(y), math.cos(y), 0.0], [0.0, 0.0, 1.0]]) @ R
    return make_pose(R, [forward_m, left_m, up_m])


@dataclass(frozen=True)
class RigCamera:
    """One camera of the robot's rig: where it sits on the base, and how long after the rig's
    nominal time its image is stamped (cameras of one rig are triggered a few milliseconds apart)."""

    T_base_camera: np.ndarray
    stamp_offset_s: float = 0.0


#: Mounts of the named rig cameras: forward, left, up (m) and yaw (deg) on the base.
RIG_MOUNTS: dict[str, tuple[float, float, float, float]] = {
    "front": (0.3, 0.0, 0.5, 0.0),
    "left": (0.0, 0.2, 0.5, 90.0),
    "right": (0.0, -0.2, 0.5, -90.0),
    "rear": (-0.3, 0.0, 0.5, 180.0),
}


def make_rig(*names: str, pitch_down_deg: float = 5.0, stamp_step_s: float = 0.004) -> dict[str, RigCamera]:
    """Cameras of :data:`RIG_MOUNTS` by name (e.g. ``make_rig("front", "left")``), the i-th stamped
    ``i * stamp_step_s`` after the first. ``front`` is the single camera of a :class:`SyntheticScene`."""
    if not names:
        raise ValueError("a rig needs at least one camera")
    unknown = [n for n in names if n not in RIG_MOUNTS]
    if unknown:
        raise ValueError(f"unknown rig cameras {unknown}; known: {', '.join(RIG_MOUNTS)}")
    rig = {}
    for i, name in enumerate(names):
        forward, left, up, yaw = RIG_MOUNTS[name]
        rig[name] = RigCamera(make_T_base_camera(forward, up, pitch_down_deg, left_m=left, yaw_deg=yaw),
                              i * stamp_step_s)
    return rig


@dataclass(frozen=True)
class SyntheticTrajectory:
    """A robot driving counter-clockwise around an ellipse on the floor at constant speed.

    Arc-length parametrised, so speed is exact; heading follows the tangent (a
    differential-drive robot), so the yaw rate is ``speed * curvature`` and the largest one
    is ``speed * a / b**2``.
    """

    semi_major_m: float = 2.6
    semi_minor_m: float = 1.7
    center_xy: tuple[float, float] = (0.0, 0.0)
    speed_mps: float = 0.5
    start_phase_rad: float = -math.pi / 2.0

    def __post_init__(self) -> None:
        if not self.semi_major_m >= self.semi_minor_m > 0.0:
            raise ValueError("need semi_major_m >= semi_minor_m > 0")
        if self.speed_mps <= 0.0:
            raise ValueError(f"speed_mps must be positive, got {self.speed_mps}")

    @property
    def max_yaw_rate_dps(self) -> float:
        """Largest yaw rate along the loop, degrees per second."""
        return math.degrees(self.speed_mps * self.semi_major_m / self.semi_minor_m**2)

    @cached_property
    def _arc_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(ellipse parameter, arc length) samples, to invert arc length by interpolation."""
        theta = np.linspace(0.0, 2.0 * math.pi, 8193)
        speed = np.hypot(self.semi_major_m * np.sin(theta), self.semi_minor_m * np.cos(theta))
        s = np.concatenate([[0.0], np.cumsum(0.5 * (speed[1:] + speed[:-1]) * np.diff(theta))])
        return theta, s

    @property
    def loop_length_m(self) -> float:
        return float(self._arc_table[1][-1])

    def positions_xy(self, n: int = 512) -> np.ndarray:
        """(n, 2) points along the loop (for clearance checks and plots)."""
        th = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
        return np.stack([self.semi_major_m * np.cos(th), self.semi_minor_m * np.sin(th)], 1) + self.center_xy

    def base_pose(self, t_s: float) -> np.ndarray:
        """T_odom_base at time ``t_s`` (odom = world; z up; the robot stays on the floor)."""
        theta_tab, s_tab = self._arc_table
        th0 = self.start_phase_rad % (2.0 * math.pi)
        s0 = np.interp(th0, theta_tab, s_tab)
        s = (s0 + self.speed_mps * t_s) % s_tab[-1]
        th = float(np.interp(s, s_tab, theta_tab))
        a, b = self.semi_major_m, self.semi_minor_m
        x, y = a * math.cos(th) + self.center_xy[0], b * math.sin(th) + self.center_xy[1]
        yaw = math.atan2(b * math.cos(th), -a * math.sin(th))
        c, sn = math.cos(yaw), math.sin(yaw)
        return make_pose(np.array([[c, -sn, 0.0], [sn, c, 0.0], [0.0, 0.0, 1.0]]), [x, y, 0.0])


# --------------------------------------------------------------------------- scene content


@dataclass(frozen=True)
class Box:
    """A box standing on the floor, rotated by ``yaw_rad`` about z."""

    center: tuple[float, float, float]
    half_extents: tuple[float, float, float]
    yaw_rad: float = 0.0

    @property
    def R(self) -> np.ndarray:
        c, s = math.cos(self.yaw_rad), math.sin(self.yaw_rad)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])

    def corners(self) -> np.ndarray:
        """(8, 3) world corners, index bit k set = +half extent along local axis k."""
        signs = np.array([[(i >> k) & 1 for k in range(3)] for i in range(8)], dtype=np.float64) * 2 - 1
        return (signs * np.asarray(self.half_extents)) @ self.R.T + np.asarray(self.center)

    def footprint_distance(self, pts_xy: np.ndarray) -> np.ndarray:
        """Distance in the floor plane from each point to the box footprint (0 inside)."""
        local = (pts_xy - np.asarray(self.center[:2])) @ self.R[:2, :2]
        excess = np.maximum(np.abs(local) - np.asarray(self.half_extents[:2]), 0.0)
        return np.linalg.norm(excess, axis=1)


@dataclass(frozen=True)
class Cylinder:
    """A vertical cylinder standing on the floor."""

    center_xy: tuple[float, float]
    radius: float
    height: float

    def corners(self) -> np.ndarray:
        """Corners of the axis-aligned bounding box, for screen-space culling."""
        r, (x, y) = self.radius, self.center_xy
        return Box((x, y, self.height / 2), (r, r, self.height / 2)).corners()


@dataclass(frozen=True)
class Room:
    """The closed, axis-aligned room: every ray from inside ends on one of its six faces."""

    half_x: float
    half_y: float
    height: float


@dataclass
class _Textures:
    """All mip levels of all surface textures, packed into one flat texel buffer."""

    texels: torch.Tensor  # (3, T) float32 RGB albedo in [0, 1]
    offset: torch.Tensor  # (M, L) int64 first texel of each level
    width: torch.Tensor  # (M, L) int64
    height: torch.Tensor  # (M, L) int64
    texel_m: float


# --------------------------------------------------------------------------- textures


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _octave(h: int, w: int, cell: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth value noise with lattice spacing ``cell`` texels, (h, w), zero mean."""
    gh, gw = -(-h // cell) + 2, -(-w // cell) + 2
    grid = torch.rand((1, 1, gh, gw), generator=gen) * 2.0 - 1.0
    if cell == 1:
        return grid[0, 0, :h, :w]
    up = F.interpolate(
        grid, size=((gh - 1) * cell + 1, (gw - 1) * cell + 1), mode="bicubic", align_corners=True
    )
    return up[0, 0, :h, :w]


def _fractal(h: int, w: int, cells: tuple[int, ...], gen: torch.Generator, gain: float = 0.8) -> torch.Tensor:
    """Multi-octave value noise, standardised to zero mean and unit deviation."""
    out = torch.zeros((h, w))
    amp = 1.0
    for cell in cells:
        out += amp * _octave(h, w, cell, gen)
        amp *= gain
    return (out - out.mean()) / out.std().clamp_min(1e-6)


def _make_texture(h: int, w: int, palette: np.ndarray, style: str, gen: torch.Generator) -> torch.Tensor:
    """(3, h, w) high-contrast procedural albedo: palette mixing, a pattern and fine detail."""
    c = torch.as_tensor(palette, dtype=torch.float32)[:, :, None, None]  # (3 colours, rgb, 1, 1)
    large = torch.sigmoid(1.5 * _fractal(h, w, (64, 32, 16), gen))
    col = c[0] * (1 - large) + c[1] * large
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    r = torch.rand(4, generator=gen)
    if style == "checker":
        cell = 8 + int(r[0] * 20)
        mask = (
            (torch.div(xx, cell, rounding_mode="floor") + torch.div(yy, cell, rounding_mode="floor")) % 2
        ).float()
        col = col * (1 - 0.5 * mask) + c[2] * 0.5 * mask
    elif style == "stripes":
        ang, period = float(r[0]) * math.pi, 6.0 + float(r[1]) * 18.0
        phase = 2 * math.pi * (xx * math.cos(ang) + yy * math.sin(ang)) / period
        stripe = 0.5 + 0.5 * torch.sin(phase + 2.0 * _fractal(h, w, (32, 16), gen))
        col = col * (1 - 0.7 * stripe) + c[2] * 0.7 * stripe
    elif style == "blobs":
        blob = torch.sigmoid(6.0 * (_fractal(h, w, (24, 12, 6), gen) - 0.4))
        col = col * (1 - blob) + c[2] * blob
    else:  # "marble": a warped, banded noise
        band = torch.sin(4.0 * _fractal(h, w, (48, 24, 12, 6), gen))
        col = col * (0.75 + 0.25 * band) + c[2] * 0.25 * (1 - band)
    detail = _fractal(h, w, (8, 4, 2), gen, gain=0.9)
    speckle = _octave(h, w, 1, gen)
    col = col * (1.0 + 0.3 * detail + 0.12 * speckle)
    return col.clamp(0.02, 0.98)


def _random_palette(rng: np.random.Generator) -> np.ndarray:
    """Three colours of distinct hue and brightness, so there is luminance contrast."""
    h0 = rng.uniform()
    hues = (h0 + np.array([0.0, rng.uniform(0.25, 0.45), rng.uniform(0.55, 0.75)])) % 1.0
    vals = rng.permutation([rng.uniform(0.15, 0.35), rng.uniform(0.5, 0.7), rng.uniform(0.8, 1.0)])
    return np.stack([_hsv_to_rgb(h, rng.uniform(0.35, 0.9), v) for h, v in zip(hues, vals)])


def _pack_mips(maps: list[torch.Tensor], texel_m: float) -> _Textures:
    """Mip-map every (3, h, w) texture and pack all levels into one flat buffer."""
    chunks, offsets, widths, heights = [], [], [], []
    total = 0
    for tex in maps:
        level = tex
        offs, ws, hs = [], [], []
        for _ in range(_MIP_LEVELS):
            _, h, w = level.shape
            chunks.append(level.reshape(3, -1).T)
            offs.append(total)
            ws.append(w)
            hs.append(h)
            total += h * w
            if min(h, w) >= 4:
                level = F.avg_pool2d(level[None], 2, ceil_mode=True)[0]
            else:  # too small to halve: repeat it as the remaining levels
                offs += [total - h * w] * (_MIP_LEVELS - len(offs))
                ws += [w] * (_MIP_LEVELS - len(ws))
                hs += [h] * (_MIP_LEVELS - len(hs))
                break
        offsets.append(offs)
        widths.append(ws)
        heights.append(hs)
    return _Textures(
        texels=torch.cat(chunks).T.contiguous(),
        offset=torch.tensor(offsets, dtype=torch.int64),
        width=torch.tensor(widths, dtype=torch.int64),
        height=torch.tensor(heights, dtype=torch.int64),
        texel_m=texel_m,
    )


# --------------------------------------------------------------------------- ray casting


@dataclass
class _Hits:
    """Nearest-hit buffers, one entry per ray (any leading shape)."""

    t: torch.Tensor  # z-depth of the hit (rays have unit camera z)
    tex: torch.Tensor  # int64 texture (surface) index
    u: torch.Tensor  # surface coordinates, metres
    v: torch.Tensor
    cos: torch.Tensor  # |cos| of the incidence angle
    shade: torch.Tensor  # Lambertian shading factor

    def write(
        self, region: tuple[slice, ...], hit: torch.Tensor, t: torch.Tensor, **vals: torch.Tensor
    ) -> None:
        """Depth test inside ``region``: keep the new hit where it is closer."""
        closer = hit & (t < self.t[region])
        self.t[region] = torch.where(closer, t, self.t[region])
        for name, val in vals.items():
            buf = getattr(self, name)
            buf[region] = torch.where(closer, val.to(buf.dtype), buf[region])


def _slab(o: torch.Tensor, inv_d: torch.Tensor, half: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Ray / centred box slab test: (t_near, near_axis, t_far, far_axis)."""
    t1 = (-half - o) * inv_d
    t2 = (half - o) * inv_d
    tnear, axis_near = torch.minimum(t1, t2).max(dim=-1)
    tfar, axis_far = torch.maximum(t1, t2).min(dim=-1)
    return tnear, axis_near, tfar, axis_far


def _face_uv(p: torch.Tensor, half: torch.Tensor, axis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Metric (u, v) on a box face from a local hit point: the two coordinates off ``axis``."""
    q = p + half
    u = torch.where(axis == 0, q[..., 1], q[..., 0])
    v = torch.where(axis == 2, q[..., 1], q[..., 2])
    return u, v


class SyntheticScene:
    """A seedable textured room with boxes and pillars, and a robot trajectory through it.

    ``render`` gives the image and exact z-depth for any camera pose; ``base_pose`` and
    ``T_base_camera`` give the robot's ground-truth odometry and extrinsic.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        speed_mps: float = 0.5,
        n_boxes: int = 9,
        n_cylinders: int = 2,
        texel_m: float = 0.01,
        camera_pitch_deg: float = 5.0,
    ) -> None:
        if texel_m <= 0:
            raise ValueError(f"texel_m must be positive, got {texel_m}")
        self.seed = seed
        self.camera_pitch_deg = camera_pitch_deg
        rng = np.random.default_rng(seed)
        a = rng.uniform(2.4, 3.0)
        b = max(rng.uniform(1.6, 2.0), math.sqrt(a))  # a / b^2 <= 1: <= 28.6 deg/s at 0.5 m/s
        self.trajectory = SyntheticTrajectory(a, b, (0.0, 0.0), speed_mps, rng.uniform(0, 2 * math.pi))
        self.room = Room(a + rng.uniform(1.5, 2.0), b + rng.uniform(1.5, 2.0), rng.uniform(2.5, 3.0))
        self.T_base_camera = make_T_base_camera(0.3, 0.5, camera_pitch_deg)
        self.boxes, self.cylinders = self._place_objects(rng, n_boxes, n_cylinders)
        self._textures = self._build_textures(rng, texel_m)

    # ----------------------------------------------------------------- layout

    def _place_objects(
        self, rng: np.random.Generator, n_boxes: int, n_cyl: int
    ) -> tuple[list[Box], list[Cylinder]]:
        """Random boxes and pillars that keep clear of the path and of each other."""
        path = self.trajectory.positions_xy(720)
        clearance = 0.75  # robot half width + camera overhang + margin
        boxes: list[Box] = []
        cyls: list[Cylinder] = []
        occupied: list[tuple[np.ndarray, float]] = []  # centre, radius of a bounding disc

        def free(c: np.ndarray, radius: float) -> bool:
            return all(np.linalg.norm(c - oc) > radius + orad + 0.1 for oc, orad in occupied)

        hx, hy = self.room.half_x, self.room.half_y
        for _ in range(400):
            if len(boxes) >= n_boxes:
                break
            half = (rng.uniform(0.15, 0.6), rng.uniform(0.15, 0.6), rng.uniform(0.15, 0.9))
            yaw = float(rng.choice([0.0, rng.uniform(-math.pi / 4, math.pi / 4)]))
            c = np.array([rng.uniform(-hx + 0.2, hx - 0.2), rng.uniform(-hy + 0.2, hy - 0.2)])
            box = Box((float(c[0]), float(c[1]), half[2]), half, yaw)
            inside = np.all(np.abs(box.corners()[:, :2]) < [hx - 0.02, hy - 0.02])
            if inside and box.footprint_distance(path).min() > clearance and free(c, math.hypot(*half[:2])):
                boxes.append(box)
                occupied.append((c, math.hypot(*half[:2])))
        for _ in range(400):
            if len(cyls) >= n_cyl:
                break
            r = rng.uniform(0.12, 0.3)
            c = np.array([rng.uniform(-hx + r + 0.1, hx - r - 0.1), rng.uniform(-hy + r + 0.1, hy - r - 0.1)])
            if np.linalg.norm(path - c, axis=1).min() > clearance + r and free(c, r):
                height = self.room.height if rng.uniform() < 0.5 else rng.uniform(0.6, 1.8)
                cyls.append(Cylinder((float(c[0]), float(c[1])), r, height))
                occupied.append((c, r))
        return boxes, cyls

    def _build_textures(self, rng: np.random.Generator, texel_m: float) -> _Textures:
        """One texture per surface (room faces, box faces, cylinder side and top)."""
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        styles = ("checker", "stripes", "blobs", "marble")

        def px(m: float) -> int:
            return max(4, int(math.ceil(m / texel_m)) + 2)

        sizes: list[tuple[float, float, np.ndarray, str]] = []
        rm = self.room
        room_half = (rm.half_x, rm.half_y, rm.height / 2)
        sizes += self._box_face_sizes(room_half, rng, styles, per_face_palette=True)
        for box in self.boxes:
            sizes += self._box_face_sizes(box.half_extents, rng, styles, per_face_palette=False)
        for cyl in self.cylinders:
            pal, style = _random_palette(rng), str(rng.choice(styles))
            sizes += [
                (2 * math.pi * cyl.radius, cyl.height, pal, style),
                (2 * cyl.radius, 2 * cyl.radius, pal, style),
            ]
        maps = []
        for w_m, h_m, pal, style in sizes:
            maps.append(_make_texture(px(h_m), px(w_m), pal, style, gen))
        return _pack_mips(maps, texel_m)

    @staticmethod
    def _box_face_sizes(
        half: tuple[float, float, float],
        rng: np.random.Generator,
        styles: tuple[str, ...],
        per_face_palette: bool,
    ) -> list[tuple[float, float, np.ndarray, str]]:
        """(u extent, v extent, palette, style) of the six faces, in surface-index order 2*axis+side."""
        out = []
        pal, style = _random_palette(rng), str(rng.choice(styles))
        for axis in range(3):
            u_ax = 1 if axis == 0 else 0
            v_ax = 1 if axis == 2 else 2
            for _side in range(2):
                if per_face_palette:
                    pal, style = _random_palette(rng), str(rng.choice(styles))
                out.append((2 * half[u_ax], 2 * half[v_ax], pal, style))
        return out

    # ----------------------------------------------------------------- poses

    def base_pose(self, t_s: float) -> np.ndarray:
        """Ground-truth T_odom_base at ``t_s``."""
        return self.trajectory.base_pose(t_s)

    def camera_pose(self, t_s: float, T_base_camera: np.ndarray | None = None) -> np.ndarray:
        """Ground-truth T_odom_camera (optical) at ``t_s``, of the scene's camera or of ``T_base_camera``."""
        return self.base_pose(t_s) @ (self.T_base_camera if T_base_camera is None else T_base_camera)

    def rig(self, *names: str, stamp_step_s: float = 0.004) -> dict[str, RigCamera]:
        """A multi-camera rig (:func:`make_rig`) at this scene's camera pitch."""
        return make_rig(*names, pitch_down_deg=self.camera_pitch_deg, stamp_step_s=stamp_step_s)

    # ----------------------------------------------------------------- rendering

    def surface_distance(self, points: np.ndarray) -> np.ndarray:
        """Exact distance (m) from each point (n, 3) to the nearest surface of the scene.

        Room walls, floor and ceiling, boxes and capped cylinders, as the renderer models them.
        """
        p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        rm = self.room
        planes = [rm.half_x - np.abs(p[:, 0]), rm.half_y - np.abs(p[:, 1]), p[:, 2], rm.height - p[:, 2]]
        dist = np.min(np.abs(np.stack(planes, axis=1)), axis=1)
        for box in self.boxes:
            q = np.abs((p - np.asarray(box.center)) @ box.R) - np.asarray(box.half_extents)
            sdf = np.linalg.norm(np.maximum(q, 0.0), axis=1) + np.minimum(q.max(axis=1), 0.0)
            dist = np.minimum(dist, np.abs(sdf))
        for cyl in self.cylinders:
            dr = np.hypot(p[:, 0] - cyl.center_xy[0], p[:, 1] - cyl.center_xy[1]) - cyl.radius
            dz = np.abs(p[:, 2] - cyl.height / 2.0) - cyl.height / 2.0
            sdf = np.minimum(np.maximum(dr, dz), 0.0) + np.hypot(np.maximum(dr, 0.0), np.maximum(dz, 0.0))
            dist = np.minimum(dist, np.abs(sdf))
        return dist

    def ray_distance(self, origin: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """Distance (metres, float64) from ``origin`` along unit world ``directions`` (N, 3) to the first hit.

        For ground truth along arbitrary rays (e.g. a distorted camera's), where ``render`` only
        knows pinhole pixel grids. The room is closed, so every ray hits something.
        """
        with torch.inference_mode():
            d = torch.as_tensor(np.asarray(directions, dtype=np.float64), dtype=torch.float32)
            hits = self._cast(d, np.asarray(origin, dtype=np.float64), None)
            return hits.t.double().numpy()

    def render(
        self, T_world_camera: np.ndarray, camera_model: CameraModel, supersample: int = 2
    ) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 (H, W, 3) and z-depth float32 (H, W) metres seen from an optical camera pose.

        Texture is anti-aliased by trilinear mip-mapping at each pixel's footprint; pixels on
        silhouettes and creases (neighbours on different surfaces) average ``supersample``^2
        sub-pixel rays. Depth is exact: the z of the ray through the pixel centre.
        """
        if not camera_model.is_pinhole:
            raise ValueError("the synthetic renderer only models distortion-free pinhole cameras")
        if supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {supersample}")
        T_wc = np.asarray(T_world_camera, dtype=np.float64)
        cam = camera_model
        f = float(np.sqrt(cam.K[0, 0] * cam.K[1, 1]))
        with torch.inference_mode():
            d = self._rays(T_wc, cam)
            regions = [self._screen_region(c, T_wc, cam) for c in self._object_corners()]
            hits = self._cast(d, T_wc[:3, 3], regions)
            color = self._shade(hits, f)
            if supersample > 1:
                self._supersample_edges(color, hits.tex, T_wc, cam, supersample, f)
            rgb = (color.permute(1, 2, 0) * 255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()
            return rgb, hits.t.numpy().astype(np.float32)

    def _object_corners(self) -> list[np.ndarray]:
        return [b.corners() for b in self.boxes] + [c.corners() for c in self.cylinders]

    @staticmethod
    def _rays(T_wc: np.ndarray, cam: CameraModel, uv: torch.Tensor | None = None) -> torch.Tensor:
        """World ray directions with unit camera z: (H, W, 3) for pixel centres, or (N, 3) for ``uv``."""
        M = torch.as_tensor(T_wc[:3, :3] @ np.linalg.inv(cam.K), dtype=torch.float32)
        if uv is not None:
            return uv @ M[:, :2].T + M[:, 2]
        us = torch.arange(cam.width, dtype=torch.float32)
        vs = torch.arange(cam.height, dtype=torch.float32)
        return (M[:, 0] * us[None, :, None] + M[:, 2]) + M[:, 1] * vs[:, None, None]

    def _cast(self, d: torch.Tensor, o: np.ndarray, regions: list[tuple[slice, ...] | None] | None) -> _Hits:
        """Nearest hits of rays ``d`` (any leading shape) from ``o``.

        ``regions`` (one per object, None = not visible) restricts each object's test to the
        rays that can see it; without them every ray is tested against every object.
        """
        rm = self.room
        half = torch.tensor([rm.half_x, rm.half_y, rm.height / 2], dtype=torch.float32)
        o_l = torch.as_tensor(o - np.array([0.0, 0.0, rm.height / 2]), dtype=torch.float32)
        _, _, t, axis = _slab(o_l, 1.0 / d, half)
        p = o_l + t[..., None] * d
        d_ax = torch.gather(d, -1, axis[..., None])[..., 0]
        side = (d_ax > 0).long()
        u, v = _face_uv(p, half, axis)
        hits = _Hits(
            t=t,
            tex=2 * axis + side,
            u=u,
            v=v,
            cos=d_ax.abs() / d.norm(dim=-1),
            shade=self._lambert_axis(np.eye(3), axis, 1.0 - 2.0 * side.float()),  # inward normals
        )
        everything = (slice(None),) * (d.dim() - 1)
        objects = [(self._hit_box, b, 6) for b in self.boxes] + [
            (self._hit_cylinder, c, 2) for c in self.cylinders
        ]
        sid = 6
        for k, (hit_fn, obj, n_faces) in enumerate(objects):
            region = everything if regions is None else regions[k]
            if region is not None:
                hit_fn(hits, region, d[region], o, obj, sid)
            sid += n_faces
        return hits

    def _supersample_edges(
        self, color: torch.Tensor, tex: torch.Tensor, T_wc: np.ndarray, cam: CameraModel, ss: int, f: float
    ) -> None:
        """Replace pixels next to a surface change by the mean of ss x ss sub-pixel rays."""
        edge = torch.zeros_like(tex, dtype=torch.bool)
        dx = tex[:, 1:] != tex[:, :-1]
        dy = tex[1:, :] != tex[:-1, :]
        edge[:, 1:] |= dx
        edge[:, :-1] |= dx
        edge[1:, :] |= dy
        edge[:-1, :] |= dy
        vv, uu = torch.nonzero(edge, as_tuple=True)
        if len(vv) == 0:
            return
        offs = (torch.arange(ss, dtype=torch.float32) + 0.5) / ss - 0.5
        oy, ox = torch.meshgrid(offs, offs, indexing="ij")
        uv = torch.stack([uu[:, None] + ox.reshape(1, -1), vv[:, None] + oy.reshape(1, -1)], dim=-1).view(
            -1, 2
        )
        sub = self._cast(self._rays(T_wc, cam, uv), T_wc[:3, 3], None)
        c = self._shade(sub, f * ss).view(3, len(vv), ss * ss).mean(dim=-1)
        color[:, vv, uu] = c

    @staticmethod
    def _lambert_axis(R: np.ndarray, axis: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
        """Shading of faces whose world normal is ``sign * R[:, axis]``."""
        ndotl = torch.as_tensor(R.T @ _LIGHT_DIR, dtype=torch.float32)[axis] * sign
        return 0.6 + 0.4 * ndotl.clamp_min(0.0)

    def _hit_box(
        self, hits: _Hits, region: tuple[slice, ...], d: torch.Tensor, o: np.ndarray, box: Box, sid: int
    ) -> None:
        """Depth-test the rays ``d`` of ``region`` against a (yawed) box, in the box's frame."""
        R = box.R
        Rt = torch.as_tensor(R, dtype=torch.float32)
        d_l = d @ Rt  # world -> box frame, row vectors
        o_l = torch.as_tensor(R.T @ (o - np.asarray(box.center)), dtype=torch.float32)
        half = torch.tensor(box.half_extents, dtype=torch.float32)
        tnear, axis, tfar, _ = _slab(o_l, 1.0 / d_l, half)
        hit = (tnear <= tfar) & (tnear > _NEAR_M)
        p = o_l + tnear[..., None] * d_l
        side = (torch.gather(p, -1, axis[..., None])[..., 0] > 0).long()
        u, v = _face_uv(p, half, axis)
        cos = torch.gather(d_l, -1, axis[..., None])[..., 0].abs() / d_l.norm(dim=-1)
        shade = self._lambert_axis(R, axis, 2.0 * side.float() - 1.0)
        hits.write(region, hit, tnear, tex=sid + 2 * axis + side, u=u, v=v, cos=cos, shade=shade)

    def _hit_cylinder(
        self,
        hits: _Hits,
        region: tuple[slice, ...],
        d: torch.Tensor,
        o: np.ndarray,
        cyl: Cylinder,
        sid: int,
    ) -> None:
        """Depth-test the rays ``d`` of ``region`` against a vertical cylinder's side and top."""
        px, py = float(o[0] - cyl.center_xy[0]), float(o[1] - cyl.center_xy[1])
        dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
        a = (dx * dx + dy * dy).clamp_min(1e-12)
        b = px * dx + py * dy
        c = px * px + py * py - cyl.radius**2
        disc = b * b - a * c
        t_side = (-b - disc.clamp_min(0).sqrt()) / a
        z = float(o[2]) + t_side * dz
        hit_side = (disc >= 0) & (t_side > _NEAR_M) & (z >= 0) & (z <= cyl.height)
        hx, hy = px + t_side * dx, py + t_side * dy
        u = (torch.atan2(hy, hx) + math.pi) * cyl.radius
        cos = (hx * dx + hy * dy).abs() / (cyl.radius * d.norm(dim=-1))
        ndotl = (hx * _LIGHT_DIR[0] + hy * _LIGHT_DIR[1]) / cyl.radius
        hits.write(
            region,
            hit_side,
            t_side,
            tex=torch.full_like(a, sid),
            u=u,
            v=z,
            cos=cos,
            shade=0.6 + 0.4 * ndotl.clamp_min(0),
        )
        t_top = (cyl.height - float(o[2])) / torch.where(dz.abs() > 1e-9, dz, torch.full_like(dz, 1e-9))
        tx, ty = px + t_top * dx, py + t_top * dy
        hit_top = (t_top > _NEAR_M) & (tx * tx + ty * ty <= cyl.radius**2)
        hits.write(
            region,
            hit_top,
            t_top,
            tex=torch.full_like(a, sid + 1),
            u=tx + cyl.radius,
            v=ty + cyl.radius,
            cos=dz.abs() / d.norm(dim=-1),
            shade=torch.full_like(a, 0.6 + 0.4 * _LIGHT_DIR[2]),
        )

    @staticmethod
    def _screen_region(corners: np.ndarray, T_wc: np.ndarray, cam: CameraModel) -> tuple[slice, slice] | None:
        """Pixel rectangle covering a convex object's projection, clipped at the near plane.

        The clipped hull's vertices are the corners in front plus the edges' near-plane
        crossings, so the box of their projections bounds the object's image.
        """
        X = (corners - T_wc[:3, 3]) @ T_wc[:3, :3]
        near = 0.01
        pts = [X[X[:, 2] > near]]
        i, j = np.array([(i, i | (1 << k)) for i in range(8) for k in range(3) if not i & (1 << k)]).T
        za, zb = X[i, 2], X[j, 2]
        cross = (za - near) * (zb - near) < 0
        if np.any(cross):
            s = ((near - za[cross]) / (zb[cross] - za[cross]))[:, None]
            pts.append(X[i[cross]] + s * (X[j[cross]] - X[i[cross]]))
        P = np.concatenate(pts)
        if len(P) == 0:
            return None
        uv = P[:, :2] / P[:, 2:3] @ cam.K[:2, :2].T + cam.K[:2, 2]
        size = [cam.width, cam.height]
        lo = np.clip(np.floor(uv.min(0)) - 1, 0, size).astype(int)
        hi = np.clip(np.ceil(uv.max(0)) + 2, 0, size).astype(int)
        if hi[0] <= lo[0] or hi[1] <= lo[1]:
            return None
        return slice(lo[1], hi[1]), slice(lo[0], hi[0])

    def _shade(self, hits: _Hits, f_px: float) -> torch.Tensor:
        """(3, ...) colours: albedo mip-mapped at the sample's footprint, times Lambertian shading.

        ``f_px`` is the focal length in samples, so a sample covers ``z / f_px`` metres.
        """
        tx = self._textures
        shape = hits.t.shape
        # Pixel footprint on the surface (geometric mean of the two axes of the ellipse).
        footprint = hits.t.reshape(-1) / f_px / hits.cos.reshape(-1).clamp_min(0.02).sqrt()
        lod = torch.log2((footprint / tx.texel_m).clamp_min(1.0)).clamp_(max=_MIP_LEVELS - 1.001)
        l0 = lod.floor()
        frac = lod - l0
        tex, u, v = hits.tex.reshape(-1) * _MIP_LEVELS, hits.u.reshape(-1), hits.v.reshape(-1)
        c0 = self._bilinear(tex + l0.long(), u, v, l0)
        c1 = self._bilinear(tex + l0.long() + 1, u, v, l0 + 1)
        return (torch.lerp(c0, c1, frac) * hits.shade.reshape(-1)).view(3, *shape)

    def _bilinear(
        self, flat: torch.Tensor, u: torch.Tensor, v: torch.Tensor, level: torch.Tensor
    ) -> torch.Tensor:
        """(3, N) bilinear lookups, clamped to the edge, of texture-level ``flat`` at metric (u, v)."""
        tx = self._textures
        off, W, H = tx.offset.view(-1)[flat], tx.width.view(-1)[flat], tx.height.view(-1)[flat]
        scale = torch.exp2(-level) / tx.texel_m
        x = torch.addcmul(torch.full_like(u, -0.5), u, scale)
        y = torch.addcmul(torch.full_like(v, -0.5), v, scale)
        x0f, y0f = x.floor(), y.floor()
        fx, fy = x - x0f, y - y0f
        x0, y0 = x0f.long(), y0f.long()
        Wm, Hm = W - 1, H - 1
        x0c, x1c = x0.clamp(min=0).minimum(Wm), (x0 + 1).clamp(min=0).minimum(Wm)
        r0 = off + y0.clamp(min=0).minimum(Hm) * W
        r1 = off + (y0 + 1).clamp(min=0).minimum(Hm) * W
        t = tx.texels

        def g(idx: torch.Tensor) -> torch.Tensor:
            return torch.index_select(t, 1, idx)

        top = torch.lerp(g(r0 + x0c), g(r0 + x1c), fx)
        bot = torch.lerp(g(r1 + x0c), g(r1 + x1c), fx)
        return torch.lerp(top, bot, fy)


def render_depth(scene: SyntheticScene, T_world_camera: np.ndarray, camera_model: CameraModel) -> np.ndarray:
    """Exact z-depth (H, W) float32 of any ROS camera model, distortion included (NaN where the
    model has no ray): a pinhole camera through :meth:`SyntheticScene.render`, a distorted one by
    casting each pixel's true ray."""
    if camera_model.is_pinhole:
        return scene.render(T_world_camera, camera_model, supersample=1)[1]
    rays, valid = plane_rays(camera_model)  # cached per camera: the model is inverted once
    unit = (rays / rays.norm(dim=-1, keepdim=True)).double().numpy()
    T = np.asarray(T_world_camera, dtype=np.float64)
    dist = scene.ray_distance(T[:3, 3], unit.reshape(-1, 3) @ T[:3, :3].T).reshape(unit.shape[:2])
    depth = dist * unit[..., 2]
    return np.where(valid.numpy(), depth, np.nan).astype(np.float32)


# --------------------------------------------------------------------------- sequences


@dataclass
class SyntheticFrame:
    """One rendered frame with its ground truth."""

    stamp_ns: int
    rgb: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float32 z-depth, metres
    T_odom_base: np.ndarray
    T_odom_camera: np.ndarray


@dataclass
class SyntheticSequence:
    """Frames along the scene's trajectory, their camera model and the static extrinsic."""

    scene: SyntheticScene
    camera_model: CameraModel
    T_base_camera: np.ndarray
    frames: list[SyntheticFrame] = field(default_factory=list)

    def to_frames(
        self, camera: str = "cam", frame_id: str = "camera_optical", with_poses: bool = True
    ) -> list[Frame]:
        """The sequence as core :class:`Frame` objects (world = odom), as the ROS layer builds them."""
        return [
            Frame(
                image=f.rgb,
                stamp_ns=f.stamp_ns,
                camera=camera,
                frame_id=frame_id,
                camera_model=self.camera_model,
                T_world_camera=f.T_odom_camera.copy() if with_poses else None,
                T_world_base=f.T_odom_base.copy() if with_poses else None,
            )
            for f in self.frames
        ]


def make_sequence(
    seed: int = 0,
    width: int = 640,
    height: int = 480,
    n_frames: int = 8,
    rate_hz: float = 10.0,
    *,
    start_s: float = 0.0,
    hfov_deg: float = 70.0,
    speed_mps: float = 0.5,
    supersample: int = 2,
    scene: SyntheticScene | None = None,
    camera: RigCamera | None = None,
) -> SyntheticSequence:
    """Render ``n_frames`` at ``rate_hz`` from ``start_s`` along the default trajectory of ``seed``.

    Pass ``scene`` to reuse an already built scene (``seed`` and ``speed_mps`` are then unused).
    ``camera``: one camera of a rig (its extrinsic, and its images stamped ``stamp_offset_s`` later);
    default the scene's single camera.
    """
    if n_frames < 1 or rate_hz <= 0:
        raise ValueError("need n_frames >= 1 and rate_hz > 0")
    scene = scene if scene is not None else SyntheticScene(seed, speed_mps=speed_mps)
    cam = make_camera_model(width, height, hfov_deg)
    T_base_camera = scene.T_base_camera if camera is None else camera.T_base_camera
    offset_s = 0.0 if camera is None else camera.stamp_offset_s
    seq = SyntheticSequence(scene, cam, T_base_camera.copy())
    for i in range(n_frames):
        t = start_s + i / rate_hz + offset_s
        T_ob = scene.base_pose(t)
        T_oc = T_ob @ T_base_camera
        rgb, depth = scene.render(T_oc, cam, supersample)
        seq.frames.append(SyntheticFrame(int(round(t * 1e9)), rgb, depth, T_ob, T_oc))
    return seq


def make_rig_sequences(rig: dict[str, RigCamera], seed: int = 0, width: int = 640, height: int = 480,
                       n_frames: int = 8, rate_hz: float = 10.0, **options) -> dict[str, SyntheticSequence]:
    """One :func:`make_sequence` per camera of ``rig`` (name -> sequence), on one scene and timeline.

    ``options`` are :func:`make_sequence`'s; the scene is built once when not given.
    """
    if options.get("scene") is None:
        options["scene"] = SyntheticScene(seed, speed_mps=options.pop("speed_mps", 0.5))
    return {name: make_sequence(seed, width, height, n_frames, rate_hz, camera=camera, **options)
            for name, camera in rig.items()}


__all__ = [
    "Box",
    "Cylinder",
    "RIG_MOUNTS",
    "RigCamera",
    "Room",
    "SyntheticFrame",
    "SyntheticScene",
    "SyntheticSequence",
    "SyntheticTrajectory",
    "make_T_base_camera",
    "make_camera_model",
    "make_rig",
    "make_rig_sequences",
    "render_depth",
    "make_sequence",
]
