"""2-D occupancy grid for Nav2 from the placed keyframes: obstacles in a height band, free space seen through.

Each keyframe votes per cell (hit: its samples stand in the band; miss: its rays crossed the
cell); the votes are integer counts, so a keyframe corrected by the pose graph, however old, is
taken out and cast again at its new pose. ``write_nav2_map`` writes what Nav2's map_server loads.
"""

from __future__ import annotations

from mapany_ros.core.occupancy.config import OccupancyConfig
from mapany_ros.core.occupancy.grid import FREE, OCCUPIED, UNKNOWN, GridSnapshot, OccupancyGrid
from mapany_ros.core.occupancy.nav2_map import grid_paths, write_nav2_map

__all__ = ["FREE", "OCCUPIED", "UNKNOWN", "GridSnapshot", "OccupancyConfig", "OccupancyGrid", "grid_paths",
           "write_nav2_map"]
