"""Launch mapany_node with config/mapany.yaml (or another params file) and optional RViz.

    ros2 launch mapany_ros mapany.launch.py camera:=/my_camera odom:=/odometry/filtered
    ros2 launch mapany_ros mapany.launch.py params_file:=/path/to/params.yaml rviz:=true
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory("mapany_ros")
    params_file = LaunchConfiguration("params_file")
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "mapany.yaml"),
                              description="Parameters of mapany_node"),
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node"),
        DeclareLaunchArgument("backend", default_value="mapanything", description="mapanything or planesweep"),
        DeclareLaunchArgument("camera", default_value="/camera",
                              description="Namespace of the camera driver (image_raw, camera_info)"),
        DeclareLaunchArgument("odom", default_value="/odom", description="nav_msgs/Odometry topic"),
        DeclareLaunchArgument("rviz", default_value="false", description="Start RViz with config/mapany.rviz"),
        Node(
            package="mapany_ros",
            executable="mapany_node",
            name="mapany_node",
            namespace=LaunchConfiguration("namespace"),
            output="screen",
            parameters=[params_file, {"backend": LaunchConfiguration("backend")}],
            remappings=[
                ("camera/image_raw", [LaunchConfiguration("camera"), "/image_raw"]),
                ("camera/camera_info", [LaunchConfiguration("camera"), "/camera_info"]),
                ("odom", LaunchConfiguration("odom")),
            ],
        ),
        Node(
            package="rviz2",
            executable="rviz2",
            name="rviz2",
            arguments=["-d", os.path.join(share, "config", "mapany.rviz")],
            condition=IfCondition(LaunchConfiguration("rviz")),
        ),
    ])
