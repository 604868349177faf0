"""Launch mapany_node with config/mapany.yaml (or another params file) and optional RViz.

    ros2 launch mapany_ros mapany.launch.py camera:=/my_camera odom:=/odometry/filtered
    ros2 launch mapany_ros mapany.launch.py params_file:=/path/to/params.yaml rviz:=true
    ros2 launch mapany_ros mapany.launch.py cameras:=front,rear front:=/drivers/front rear:=/drivers/rear
    ros2 launch mapany_ros mapany.launch.py use_sim_time:=true   # with `ros2 bag play --clock BAG`
    ros2 launch mapany_ros mapany.launch.py autostart:=false     # unconfigured, for a lifecycle manager

The params file wins: backend, cameras, use_sim_time and autostart override it only when they are
given on the command line. Every camera C named in ``cameras`` can be remapped with ``C:=/driver/ns``
(image_raw, image_raw/compressed, camera_info and depth_prior follow).
"""

import os

import yaml
from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

#: Inputs of each camera namespace that follow a camera's remapping.
CAMERA_INPUTS = ("image_raw", "image_raw/compressed", "camera_info", "depth_prior")


def _cameras_in(params_file: str) -> list[str]:
    """The cameras a params file configures (the node's default when it says nothing)."""
    with open(params_file) as fh:
        doc = yaml.safe_load(fh) or {}
    for key in ("/**", "mapany_node", "/mapany_node"):
        cams = (doc.get(key) or {}).get("ros__parameters", {}).get("cameras")
        if cams:
            return list(cams)
    return ["camera"]


def _node(context, *args, **kwargs):
    conf = context.launch_configurations
    params_file = conf["params_file"]
    overrides = {}
    if conf.get("backend"):
        overrides["backend"] = conf["backend"]
    for flag in ("use_sim_time", "autostart"):
        if conf.get(flag):
            overrides[flag] = conf[flag].lower() in ("true", "1")
    cameras = [c.strip() for c in conf["cameras"].split(",") if c.strip()] if conf.get("cameras") else []
    if cameras:
        overrides["cameras"] = cameras
    remappings = [("odom", conf["odom"])] if conf.get("odom") else []
    for cam in cameras or _cameras_in(params_file):
        target = conf.get(cam)
        if target:
            remappings += [(f"{cam}/{topic}", f"{target.rstrip('/')}/{topic}") for topic in CAMERA_INPUTS]
    return [Node(
        package="mapany_ros",
        executable="mapany_node",
        name="mapany_node",
        namespace=conf.get("namespace", ""),
        output="screen",
        parameters=[params_file, overrides] if overrides else [params_file],
        remappings=remappings,
    )]


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory("mapany_ros")
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "mapany.yaml"),
                              description="Parameters of mapany_node"),
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node"),
        DeclareLaunchArgument("backend", default_value="",
                              description="Overrides the params file: mapanything, planesweep or pkg.module:Class"),
        DeclareLaunchArgument("cameras", default_value="",
                              description="Overrides the params file: comma-separated camera namespaces"),
        DeclareLaunchArgument("camera", default_value="",
                              description="Driver namespace of the camera named 'camera' (e.g. /my_camera)"),
        DeclareLaunchArgument("odom", default_value="", description="nav_msgs/Odometry topic (default: odom)"),
        DeclareLaunchArgument("use_sim_time", default_value="",
                              description="true to run on /clock (bag replay with --clock)"),
        DeclareLaunchArgument("autostart", default_value="",
                              description="Overrides the params file: false starts the node unconfigured (lifecycle)"),
        DeclareLaunchArgument("rviz", default_value="false", description="Start RViz with config/mapany.rviz"),
        OpaqueFunction(function=_node),
        Node(
            package="rviz2",
            executable="rviz2",
            name="rviz2",
            arguments=["-d", os.path.join(share, "config", "mapany.rviz")],
            condition=IfCondition(LaunchConfiguration("rviz")),
        ),
    ])
