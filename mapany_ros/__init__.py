"""mapany_ros: metric multi-view 3D from a robot's camera stream (MapAnything on ROS 2)."""

__version__ = "0.1.0"
