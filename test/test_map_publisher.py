"""MapPublisher: layers built in the node's thread, published by the helper process, exactly as built."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from polling import wait_for

from mapany_ros.ros import conversions as conv

pytestmark = pytest.mark.ros


def test_two_layers_are_published_by_the_helper_when_they_change_and_never_while_paused(rclpy_context):
    import rclpy
    from nav_msgs.msg import OccupancyGrid
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import PointCloud2
    from std_msgs.msg import Header

    from mapany_ros.core.occupancy import GridSnapshot
    from mapany_ros.ros.map_publisher import MapPublisher
    from mapany_ros.ros.node import LATCHED_QOS

    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(5000, 3)).astype(np.float32)
    rgb = rng.integers(0, 255, (5000, 3), dtype=np.uint8)
    confidence = rng.random(5000).astype(np.float32)
    grid = rng.integers(-1, 101, (30, 40)).astype(np.int8)
    versions = {"cloud": 0, "grid": 0}

    def build_cloud(buffer):
        return conv.map_cloud(xyz, rgb, confidence, Header(frame_id="map"), buffer=buffer)

    def build_grid(buffer):  # as the node's occupancy grid layer packs it
        return conv.occupancy_grid(GridSnapshot(grid, (-1.0, 2.0), 0.05, 0), Header(frame_id="map"), buffer=buffer)

    warnings: list[str] = []
    publisher = MapPublisher("layer_test", "/", 0.05, warn=warnings.append)
    publisher.add_layer("/layer_test/map_points", PointCloud2, LATCHED_QOS, lambda: versions["cloud"], build_cloud)
    publisher.add_layer("/layer_test/map_grid", OccupancyGrid, LATCHED_QOS, lambda: versions["grid"], build_grid)
    node = rclpy.create_node("layer_listener", context=rclpy_context)
    clouds: list[PointCloud2] = []
    grids: list[OccupancyGrid] = []
    node.create_subscription(PointCloud2, "/layer_test/map_points", clouds.append, LATCHED_QOS)
    node.create_subscription(OccupancyGrid, "/layer_test/map_grid", grids.append, LATCHED_QOS)
    executor = SingleThreadedExecutor(context=rclpy_context)
    executor.add_node(node)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()

    def wait(cond, timeout: float = 30.0) -> bool:
        return wait_for(cond, timeout)

    def rounds(n: int) -> None:
        """Let the publisher's thread look at its layers n more times."""
        calls = [0]
        original = publisher.layers[1].version
        publisher.layers[1].version = lambda: (calls.__setitem__(0, calls[0] + 1), original())[1]
        assert wait(lambda: calls[0] >= n, 10)
        publisher.layers[1].version = original

    try:
        publisher.start()
        assert wait(lambda: clouds and grids), warnings
        assert bytes(clouds[0].data) == bytes(conv.map_cloud(xyz, rgb, confidence).data)
        assert clouds[0].width == len(xyz) and clouds[0].header.frame_id == "map"
        np.testing.assert_array_equal(np.asarray(grids[0].data, np.int8).reshape(30, 40), grid)
        assert grids[0].info.width == 40 and grids[0].info.resolution == pytest.approx(0.05)
        assert conv.occupancy_grid_to_snapshot(grids[0]).origin_xy == (-1.0, 2.0)
        # Published by the helper process, under its own node name (a name reaches the graph after
        # its endpoint: until then it reads unknown).
        def publishers() -> list[str]:
            return [i.node_name for i in node.get_publishers_info_by_topic("/layer_test/map_points")]

        assert wait(lambda: publishers() == ["layer_test_map_publisher"], 10), publishers()
        helper = publisher._proc
        assert helper is not None and helper.poll() is None

        rounds(5)
        assert len(clouds) == 1 and len(grids) == 1  # unchanged layers are not published again
        versions["cloud"] += 1
        xyz[:] += 1.0
        assert wait(lambda: len(clouds) == 2)
        assert bytes(clouds[1].data) == bytes(conv.map_cloud(xyz, rgb, confidence).data)
        rounds(3)
        assert len(grids) == 1

        assert publisher.pause()
        versions["cloud"] += 1
        versions["grid"] += 1
        time.sleep(0.5)  # ten periods: nothing may come while paused
        assert len(clouds) == 2 and len(grids) == 1
        publisher.resume()
        assert wait(lambda: len(clouds) == 3 and len(grids) == 2)
        assert not warnings, warnings
    finally:
        publisher.close()
        executor.shutdown()
        spin.join(10)
        node.destroy_node()
    assert helper.poll() is not None, "the helper process outlived close()"
