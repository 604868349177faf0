"""OccupancyConfig: the knobs of the 2-D occupancy grid, each checked against its range."""

from __future__ import annotations

from dataclasses import dataclass

from mapany_ros.core.config_ranges import check_ranges

# name: (lowest, highest) allowed value, both inclusive
_RANGES: dict[str, tuple[float, float]] = {
    "resolution_m": (0.005, 10.0),
    "min_height_m": (-10.0, 100.0),
    "max_height_m": (-10.0, 100.0),
    "base_height_m": (-10.0, 100.0),
    "pixel_stride": (1, 64),
    "max_range_m": (0.1, 1000.0),
    "keep_keyframes": (0, 10_000_000),
    "min_confidence": (0.0, 1e6),
}
_INT_FIELDS = ("pixel_stride", "keep_keyframes")


@dataclass(frozen=True)
class OccupancyConfig:
    """How keyframes become a Nav2 occupancy grid; a value out of range is a ValueError naming the field.

    Heights are measured along the map frame's z axis (REP 103/105: z up) from the floor under each
    keyframe: the keyframe's ``base_frame`` height in the map minus ``base_height_m``.
    """

    #: Cell edge in metres (Nav2's resolution).
    resolution_m: float = 0.05
    #: Surfaces between these heights above the floor are obstacles; lower ones are floor, higher
    #: ones (ceiling, lamps) are passed under.
    min_height_m: float = 0.05
    max_height_m: float = 2.0
    #: Height of base_frame above the floor (0 for a base_footprint-style frame on the ground); the
    #: camera's height when keyframes carry no base -> camera extrinsic.
    base_height_m: float = 0.0
    #: Cast rays to every n-th depth pixel in both directions.
    pixel_stride: int = 8
    #: Depth samples farther than this from the camera are not used (their error grows with range).
    max_range_m: float = 3.5
    #: Keyframes whose samples are kept so update_pose can move them, however old; older ones are
    #: frozen. Memory: 2 bytes per sample (9.6 kB per 640x480 keyframe at stride 8).
    keep_keyframes: int = 10_000
    #: Pixels whose confidence / the keyframe's median valid confidence is below this are ignored.
    min_confidence: float = 0.25

    def __post_init__(self) -> None:
        check_ranges(self, _RANGES, _INT_FIELDS)
        if self.min_height_m >= self.max_height_m:
            raise ValueError(f"OccupancyConfig.min_height_m ({self.min_height_m}) must be below max_height_m "
                             f"({self.max_height_m})")
