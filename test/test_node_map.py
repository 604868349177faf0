"""The fused map and the occupancy grid over DDS: map_points and map_grid for a late RViz or Nav2, ~/save_map
round trip (the map folder: PLY, and the grid as a Nav2 map_server pair), ~/reset and mapping on. Both
layers reach the subscriber through the node's map publisher process."""

from __future__ import annotations

import time

import numpy as np
import pytest
from core_fakes import RecordingBackend

from mapany_ros.core.fusion import read_ply
from mapany_ros.ros import conversions as conv

pytestmark = pytest.mark.ros


def call(node, client, timeout: float = 10.0):
    from std_srvs.srv import Trigger

    assert client.wait_for_service(timeout_sec=timeout)
    future = client.call_async(Trigger.Request())
    end = time.monotonic() + timeout
    while not future.done() and time.monotonic() < end:
        time.sleep(0.02)
    assert future.done(), "service did not answer"
    return future.result()


def test_map_is_latched_saved_reloaded_and_reset_while_mapping_goes_on(harness_factory, tmp_path):
    from nav_msgs.msg import OccupancyGrid, Path
    from sensor_msgs.msg import PointCloud2
    from std_srvs.srv import Trigger
    from test_nav2_map import load_like_map_server

    from mapany_ros.core.occupancy import FREE, OCCUPIED
    from mapany_ros.ros.node import LATCHED_QOS

    # The fake backend's wall stands 10 m ahead of 64x48 cameras: the grid casts denser rays, farther.
    h = harness_factory(RecordingBackend(), **{"map.save_path": str(tmp_path / "saved"),
                                               "map.publish_period_s": 0.2, "grid.max_range_m": 12.0,
                                               "grid.pixel_stride": 2})
    h.info()
    h.static_tf()
    time.sleep(0.3)
    h.good_stream(1.0, 7)
    assert h._wait(lambda: h.collector.out.depth_count >= 7, 15), h.warnings

    # A late subscriber (RViz started after the robot) still gets the latest map and path.
    clouds: list[PointCloud2] = []
    paths: list[Path] = []
    grids: list[OccupancyGrid] = []
    h.driver.create_subscription(PointCloud2, "map_points", clouds.append, LATCHED_QOS)
    h.driver.create_subscription(Path, "path", paths.append, LATCHED_QOS)
    h.driver.create_subscription(OccupancyGrid, "map_grid", grids.append, LATCHED_QOS)
    assert h._wait(lambda: clouds and clouds[-1].width > 100 and paths and len(paths[-1].poses) == 7, 10)
    # map_grid: the wall x = 10 is an obstacle, the floor before it seen through, in the map frame.
    grid = h.node.pipeline.grid
    assert h._wait(lambda: grid.keyframes_integrated == 7 and grids
                   and conv.occupancy_grid_to_snapshot(grids[-1]).data.tobytes() == grid.snapshot().data.tobytes(), 10)
    latched = conv.occupancy_grid_to_snapshot(grids[-1])
    # Published by the map publisher's helper process, not by the node on its executor.
    # (A node's name reaches the graph after its endpoints: until then it reads unknown.)
    for topic in ("/map_grid", "/map_points"):
        assert h._wait(lambda t=topic: [i.node_name for i in h.driver.get_publishers_info_by_topic(t)]
                       == ["mapany_node_map_publisher"], 10), h.driver.get_publishers_info_by_topic(topic)
    assert grids[-1].header.frame_id == "map"
    occupied_x = latched.origin_xy[0] + (np.nonzero(latched.data == OCCUPIED)[1] + 0.5) * latched.resolution
    assert occupied_x.size > 5 and np.all(np.abs(occupied_x - 10.0) < 0.2)
    assert latched.data[latched.cell_of(5.0, 0.0)] == FREE
    # Every keyframe fused and the map published since: the saved map must then be the latched one.
    fused = h.node.pipeline.map
    assert h._wait(lambda: fused.keyframes_integrated == 7 and clouds[-1].width == len(fused.points()[0]), 10)
    cloud = clouds[-1]
    assert cloud.header.frame_id == "map" and [f.name for f in cloud.fields] == ["x", "y", "z", "rgb", "confidence"]
    xyz, rgb = conv.pointcloud2_to_arrays(cloud)
    # The fake backend's wall is the plane x = 10 m (the cameras look along +x).
    assert np.all(np.isfinite(xyz)) and np.abs(np.median(xyz[:, 0]) - 10.0) < 0.5

    save = h.driver.create_client(Trigger, "/mapany_node/save_map")
    answer = call(h.driver, save)
    folder = tmp_path / "saved"
    assert answer.success and str(len(xyz)) in answer.message and str(folder) in answer.message, answer.message
    assert "map_grid.yaml" in answer.message
    # The grid in the map folder, as Nav2's map_server loads it: the latched map_grid, cell for cell.
    saved_grid = load_like_map_server(folder / "map_grid.yaml")
    assert (folder / "map_grid.pgm").is_file()
    np.testing.assert_array_equal(saved_grid.data, latched.data)
    assert saved_grid.origin_xy == pytest.approx(latched.origin_xy) and saved_grid.resolution == 0.05
    saved_xyz, saved_rgb, saved_conf = read_ply(folder / "map.ply")
    assert (folder / "keyframes.npz").is_file() and (folder / "map.yaml").is_file()
    order = np.lexsort(xyz.T)
    saved = np.lexsort(saved_xyz.T)
    np.testing.assert_allclose(saved_xyz[saved], xyz[order], atol=1e-6)
    np.testing.assert_array_equal(saved_rgb[saved], rgb[order])

    reset = h.driver.create_client(Trigger, "/mapany_node/reset")
    assert call(h.driver, reset).success
    assert h._wait(lambda: clouds[-1].width == 0, 5), "the map was not emptied"
    assert h._wait(lambda: list(grids[-1].data) == [-1], 5), "the grid was not cleared"
    # Mapping goes on: new keyframes, a new map and a path that starts again.
    stamps = h.good_stream(3.0, 6)
    assert h._wait(lambda: all(s in h.collector.out.depth for s in stamps), 15), h.warnings
    assert h._wait(lambda: clouds[-1].width > 100 and len(paths[-1].poses) == 6, 10)
    assert h._wait(lambda: np.any(conv.occupancy_grid_to_snapshot(grids[-1]).data == OCCUPIED), 10)
    assert {conv.stamp_to_ns(p.header.stamp) for p in paths[-1].poses} == set(stamps)
