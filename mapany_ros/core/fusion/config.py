"""FusionConfig: the few knobs of the fused voxel map, each checked against its range."""

from __future__ import annotations

from dataclasses import dataclass

from mapany_ros.core.config_ranges import check_ranges
from mapany_ros.core.depth_edges import EDGE_THRESHOLD

#: A pixel weighs at most this many median-confidence pixels, so one overconfident view cannot own a voxel.
MAX_PIXEL_WEIGHT = 4.0

# name: (lowest, highest) allowed value, both inclusive
_RANGES: dict[str, tuple[float, float]] = {
    "voxel_size_m": (0.001, 10.0),
    "max_voxels": (1, 2**31 - 1),
    "max_depth_m": (0.01, 1000.0),
    "min_confidence": (0.0, MAX_PIXEL_WEIGHT),
    "min_weight": (0.0, 1e9),
    "pixel_stride": (1, 64),
    "submap_keyframes": (1, 10_000),
    "repose_translation_m": (0.0, 100.0),
    "repose_rotation_deg": (0.0, 180.0),
    "evict_radius_m": (0.0, 1e6),
    "edge_threshold": (0.0, 1.0),
}
_INT_FIELDS = ("max_voxels", "pixel_stride", "submap_keyframes")


@dataclass(frozen=True)
class FusionConfig:
    """How the map fuses keyframes; a value out of range is a ValueError naming the field."""

    voxel_size_m: float = 0.05
    #: Memory budget: the submaps hold at most this many voxels together after each integrate.
    max_voxels: int = 2_000_000
    #: Farther pixels are ignored: depth error grows with distance, and so would the map's.
    max_depth_m: float = 10.0
    #: Pixels whose confidence / the keyframe's median valid confidence is below this are ignored.
    min_confidence: float = 0.25
    #: points() returns voxels whose summed normalised confidence reaches this: 2 = two median pixels, so
    #: a lone stray sample does not make a voxel.
    min_weight: float = 2.0
    #: Integrate every n-th pixel in both directions; 4 keeps 5 cm voxels filled out to ~5 m at 640x480.
    pixel_stride: int = 4
    #: Keyframes per submap: a submap moves as one rigid piece when the pose graph corrects its keyframes.
    #: Fewer follow a bending correction more closely; more store a surface seen by consecutive
    #: keyframes fewer times.
    submap_keyframes: int = 8
    #: update_pose counts a keyframe as moved, and the union moves a submap, from these changes on.
    repose_translation_m: float = 0.01
    repose_rotation_deg: float = 0.5
    #: Over budget, drop the voxels farther than this from the newest camera, then the farthest;
    #: 0 drops the least recently updated voxels instead.
    evict_radius_m: float = 0.0
    #: Pixels at a depth jump of more than this fraction (the second difference of inverse depth over
    #: the pixel's own; more where the depth is noisy) are not fused, nor their neighbours: flying
    #: pixels between foreground and background never reach the map. 0 keeps every pixel.
    edge_threshold: float = EDGE_THRESHOLD

    def __post_init__(self) -> None:
        check_ranges(self, _RANGES, _INT_FIELDS)
