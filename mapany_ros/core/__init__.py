"""ROS-free core: frames, time sync, windows, geometry, backends, alignment, map.

Nothing under this package may import rclpy or ROS message types, so the whole algorithm is
testable without a ROS install or a GPU.
"""
