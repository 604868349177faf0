"""The grid as a Nav2 map_server pair (PGM + YAML), read back as nav2_map_server's map_io reads it.

Nav2 is not installable here, so ``load_like_map_server`` follows map_io's loadMapYaml /
loadMapFromFile: the image path is relative to the YAML, pixel value v gives occ = (255 - v) / 255
(negate 0) or v / 255 (negate 1), trinary mode loads occ > occupied_thresh as 100, occ <
free_thresh as 0 and anything else as -1, image row y lands in grid row height - 1 - y, and
``origin`` is the map pose of the lower-left pixel.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from mapany_ros.core.occupancy import FREE, OCCUPIED, UNKNOWN, GridSnapshot, OccupancyGrid, grid_paths, write_nav2_map
from mapany_ros.core.occupancy.nav2_map import PIXEL_UNKNOWN

KEYS = {"image", "mode", "resolution", "origin", "negate", "occupied_thresh", "free_thresh"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def read_pgm(path: Path) -> np.ndarray:
    """A binary (P5) 8-bit PGM as (rows, cols) uint8, comments allowed in the header."""
    raw = path.read_bytes()
    tokens, pos = [], 0
    while len(tokens) < 4:
        m = re.compile(rb"\s*(#[^\n]*\n\s*)*([^\s#]+)").match(raw, pos)
        assert m is not None, f"{path}: bad PGM header"
        tokens.append(m.group(2))
        pos = m.end()
    magic, width, height, maxval = tokens[0], int(tokens[1]), int(tokens[2]), int(tokens[3])
    assert magic == b"P5" and maxval == 255
    pos += 1  # exactly one whitespace byte before the raster
    assert len(raw) - pos == width * height, "PGM raster size does not match its header"
    return np.frombuffer(raw, np.uint8, offset=pos).reshape(height, width)


def load_like_map_server(yaml_path: Path) -> GridSnapshot:
    doc = yaml.safe_load(yaml_path.read_text())
    assert KEYS <= set(doc)
    assert doc["mode"] == "trinary" and len(doc["origin"]) == 3
    image = Path(doc["image"])
    image = image if image.is_absolute() else yaml_path.parent / image
    shade = read_pgm(image).astype(np.float64) / 255.0
    occ = shade if doc["negate"] else 1.0 - shade
    cells = np.full(occ.shape, -1, np.int8)
    cells[occ < doc["free_thresh"]] = 0
    cells[doc["occupied_thresh"] < occ] = 100
    return GridSnapshot(cells[::-1].copy(), (float(doc["origin"][0]), float(doc["origin"][1])),
                        float(doc["resolution"]), 0)


def test_round_trip_through_map_server_semantics(tmp_path: Path) -> None:
    data = np.full((4, 6), UNKNOWN, np.int8)
    data[0, :] = FREE
    data[3, 5] = OCCUPIED  # the top-right cell: largest x and y
    data[1, 2] = OCCUPIED
    grid = GridSnapshot(data, (-1.25, 2.5), 0.05, 3)
    yaml_path, pgm_path = write_nav2_map(tmp_path / "map.yaml", grid)
    assert (yaml_path, pgm_path) == (tmp_path / "map.yaml", tmp_path / "map.pgm")
    doc = yaml.safe_load(yaml_path.read_text())
    assert doc == {"image": "map.pgm", "mode": "trinary", "resolution": 0.05, "origin": [-1.25, 2.5, 0.0],
                   "negate": 0, "occupied_thresh": 0.65, "free_thresh": 0.25}
    pixels = read_pgm(pgm_path)
    assert pixels[0, 5] == 0 and pixels[-1, 0] == 254  # image row 0 is the top of the map
    loaded = load_like_map_server(yaml_path)
    np.testing.assert_array_equal(loaded.data, data)
    assert loaded.origin_xy == grid.origin_xy and loaded.resolution == grid.resolution
    # The unknown pixel is unknown to map_server; map_saver's 205 would have loaded as free here.
    assert 0.25 <= (255 - PIXEL_UNKNOWN) / 255 <= 0.65 and (255 - 205) / 255 < 0.25


def test_a_known_obstacle_lands_in_its_cell(tmp_path: Path) -> None:
    """A wall seen by a camera: after the round trip its cells sit where the wall stands in the map frame."""
    from test_occupancy import ROW, drive, value_at

    grid = OccupancyGrid()
    drive(grid, ROW, boxes=(((1.5, 0.3, 0.0), (1.7, 0.6, 0.3)),))
    snap = grid.snapshot()
    loaded = load_like_map_server(write_nav2_map(tmp_path / "room.yaml", snap)[0])
    np.testing.assert_array_equal(loaded.data, snap.data)
    assert loaded.origin_xy == pytest.approx(snap.origin_xy)
    assert value_at(loaded, 3.025, 0.025) == OCCUPIED  # the wall x = 3.02
    assert value_at(loaded, 1.525, 0.425) == OCCUPIED  # the box's near face x = 1.5
    assert value_at(loaded, 2.025, 0.025) == FREE and value_at(loaded, 3.5, 0.0) == UNKNOWN


def test_paths_beside_the_ply_and_an_empty_grid(tmp_path: Path) -> None:
    assert grid_paths(tmp_path / "mapany_map.ply") == (tmp_path / "mapany_map.yaml", tmp_path / "mapany_map.pgm")
    yaml_path, _ = write_nav2_map(tmp_path / "empty.ply", GridSnapshot(np.zeros((0, 0), np.int8), (0.0, 0.0), 0.05, 0))
    loaded = load_like_map_server(yaml_path)
    assert loaded.data.tolist() == [[UNKNOWN]]
