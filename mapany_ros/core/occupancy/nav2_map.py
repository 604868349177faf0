"""The grid as a Nav2 map_server pair: a binary PGM (P5) and its YAML, as nav2_map_server's map_io reads them.

map_io (trinary mode, negate 0) turns a pixel value v into occ = (255 - v) / 255 and loads
occ > occupied_thresh as occupied, occ < free_thresh as free, anything between as unknown; image
row 0 is the top of the map (the largest y) and ``origin`` is the map pose of the lower-left
pixel's corner. Free cells are written 254 and occupied ones 0, as map_saver does; unknown cells
are written 128 (occ 0.50), not map_saver's 205: with free_thresh 0.25, 205 (occ 0.196) would
load as free, and the robot would plan through space nobody saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mapany_ros.core.occupancy.grid import FREE, OCCUPIED, GridSnapshot

PIXEL_OCCUPIED, PIXEL_FREE, PIXEL_UNKNOWN = 0, 254, 128
OCCUPIED_THRESH, FREE_THRESH = 0.65, 0.25


def grid_paths(path: str | Path) -> tuple[Path, Path]:
    """(YAML, PGM) beside ``path``: its stem with .yaml and .pgm (e.g. map.ply -> map.yaml, map.pgm)."""
    p = Path(path)
    return p.with_suffix(".yaml"), p.with_suffix(".pgm")


def write_nav2_map(yaml_path: str | Path, grid: GridSnapshot) -> tuple[Path, Path]:
    """Write ``grid`` as ``yaml_path`` plus the PGM of the same stem beside it; returns both paths.

    An empty grid is written as one unknown cell at the origin (map_server refuses empty images).
    """
    yaml_path = Path(yaml_path)
    pgm_path = yaml_path.with_suffix(".pgm")
    if pgm_path == yaml_path:
        raise ValueError(f"{yaml_path}: give the YAML file's name; its PGM is written beside it")
    data = grid.data if grid.data.size else np.full((1, 1), -1, np.int8)
    pixels = np.full(data.shape, PIXEL_UNKNOWN, np.uint8)
    pixels[data == FREE] = PIXEL_FREE
    pixels[data == OCCUPIED] = PIXEL_OCCUPIED
    height, width = pixels.shape
    header = f"P5\n# mapany_ros occupancy grid, {grid.resolution:g} m/pixel\n{width} {height}\n255\n".encode("ascii")
    pgm_path.write_bytes(header + np.ascontiguousarray(pixels[::-1]).tobytes())  # top row = largest y
    ox, oy = grid.origin_xy
    yaml_path.write_text(
        f"image: {pgm_path.name}\n"
        "mode: trinary\n"
        f"resolution: {grid.resolution!r}\n"
        f"origin: [{ox!r}, {oy!r}, 0.0]\n"
        "negate: 0\n"
        f"occupied_thresh: {OCCUPIED_THRESH}\n"
        f"free_thresh: {FREE_THRESH}\n"
    )
    return yaml_path, pgm_path
