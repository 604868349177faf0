"""A rerun recording (.rrd) of what the node published, read back from an output bag.

rerun is the viewer MapAnything's own demos use: depth images and each keyframe's points on a
timeline of image stamps, the trajectory and the fused map in 3D.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def export_rerun(bag: Path, rrd: Path, camera: str = "camera") -> int:
    """Write ``rrd`` from the outputs in ``bag``; returns the number of keyframes logged."""
    import rerun as rr
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    from mapany_ros.ros import conversions as conv

    rec = rr.RecordingStream("mapany_ros")
    rec.save(str(rrd))
    rec.log("world", rr.ViewCoordinates.RIGHT_HAND_Z_UP, static=True)
    keyframes = 0
    path_msg = map_msg = None
    with AnyReader([bag], default_typestore=get_typestore(Stores.ROS2_KILTED)) as reader:
        for conn, _, raw in reader.messages():
            msg = reader.deserialize(raw, conn.msgtype)
            if conn.topic == "/path":
                path_msg = msg
            elif conn.topic == "/map_points":
                map_msg = msg
            elif conn.topic == f"/{camera}/depth":
                rec.set_time("stamp", timestamp=conv.stamp_to_ns(msg.header.stamp) * 1e-9)
                rec.log(f"{camera}/depth", rr.DepthImage(conv.depth_image_to_array(msg), meter=1.0))
                keyframes += 1
            elif conn.topic == "/points":
                rec.set_time("stamp", timestamp=conv.stamp_to_ns(msg.header.stamp) * 1e-9)
                xyz, rgb = conv.pointcloud2_to_arrays(msg)
                rec.log("world/keyframe_points", rr.Points3D(xyz, colors=rgb))
    if path_msg is not None:
        poses = [conv.pose_to_matrix(p.pose) for p in path_msg.poses]
        rec.log("world/trajectory", rr.LineStrips3D([np.stack([T[:3, 3] for T in poses])]), static=True)
    if map_msg is not None:
        xyz, rgb = conv.pointcloud2_to_arrays(map_msg)
        rec.log("world/map", rr.Points3D(xyz, colors=rgb), static=True)
    rec.flush()
    return keyframes
