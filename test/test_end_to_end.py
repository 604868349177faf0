"""End to end over DDS: the demo's synthetic robot, mapany_node (planesweep) as its own process, a recorder.

The demo is run as a subprocess; this test then reads the MCAP bag it recorded and checks the
node's outputs itself (stamps, frames, sizes, one depth per keyframe), and the accuracy the demo
measured against ground truth.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore

pytestmark = pytest.mark.ros


def read_bag(path):
    msgs: dict[str, list] = {}
    with AnyReader([path], default_typestore=get_typestore(Stores.ROS2_KILTED)) as reader:
        for conn, _, raw in reader.messages():
            msgs.setdefault(conn.topic, []).append(reader.deserialize(raw, conn.msgtype))
    return msgs


def stamp(msg) -> int:
    return msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec


@pytest.mark.parametrize(("seed", "width", "height", "odom_source"),
                         [(0, 320, 240, "topic"), (3, 256, 192, "topic"), (3, 256, 192, "tf")])
def test_demo_pipeline_over_dds_matches_ground_truth(tmp_path, ros_subprocess_env, seed, width, height, odom_source):
    """The demo; with ``tf`` the robot publishes its odometry only as the odom -> base_link transform."""
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "mapany_ros.commands.demo", "--seed", str(seed), "--width", str(width),
         "--height", str(height), "--duration", "6", "--out", str(out), "--timeout", "240",
         "--odom-source", odom_source],
        env=ros_subprocess_env, capture_output=True, text=True, timeout=300,
    )
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    log = out / "node.log"
    assert (out / "metrics.json").is_file(), log.read_text()[-3000:] if log.exists() else "no node.log"
    report = json.loads((out / "metrics.json").read_text())
    acc = report["accuracy"]
    assert acc["median_abs_rel"] <= 0.03
    assert acc["within_10pct"] >= 0.90
    assert acc["valid_fraction_min"] >= 0.60
    assert acc["point_error_median_m"] <= 0.05
    assert acc["map_odom_translation_m"] <= 0.01 and acc["map_odom_rotation_deg"] <= 0.5
    # The fused map, against the true surfaces the keyframes saw.
    assert acc["map_accuracy_median_m"] <= 0.02 and acc["map_completeness"] >= 0.80
    # Exact odometry, late and irregular, from the topic or from TF: the path is the truth to a millimetre.
    assert acc["path_ate_m"] <= 0.001 and report["path_poses"] == report["keyframes_output"]
    assert proc.returncode == 0

    bag = read_bag(out / "demo_bag")
    images = {stamp(m) for m in bag["/camera/image_raw"]}
    depth = bag["/camera/depth"]
    infos = {stamp(m): m for m in bag["/camera/depth/camera_info"]}
    conf = {stamp(m): m for m in bag["/camera/confidence"]}
    assert len(depth) >= 8
    assert max(Counter(stamp(m) for m in depth).values()) == 1  # each keyframe output once
    for m in depth:
        s = stamp(m)
        assert s in images and m.header.frame_id == "camera_optical_frame" and m.encoding == "32FC1"
        info = infos[s]
        assert (info.width, info.height) == (m.width, m.height) == (width, height)
        assert info.header.frame_id == m.header.frame_id
        K = np.asarray(info.k).reshape(3, 3)
        assert 0 < K[0, 2] < width and 0 < K[1, 2] < height and K[0, 0] > 0
        assert (conf[s].width, conf[s].height) == (m.width, m.height)
        values = np.frombuffer(m.data.tobytes(), np.float32)
        assert values.size == width * height and np.isfinite(values).mean() >= 0.6
    clouds = bag["/points"]
    assert {stamp(c) for c in clouds} == {stamp(m) for m in depth}
    assert all(c.header.frame_id == "map" and c.point_step == 16 and c.width > 0 for c in clouds)
    assert [f.name for f in clouds[0].fields] == ["x", "y", "z", "rgb"]
    tf = [t for m in bag["/tf"] for t in m.transforms]
    assert any(t.header.frame_id == "map" and t.child_frame_id == "odom" for t in tf)
    odom_tf = [t for t in tf if (t.header.frame_id, t.child_frame_id) == ("odom", "base_link")]
    assert (len(bag.get("/odom", [])) > 0, len(odom_tf) > 0) == (odom_source == "topic", odom_source == "tf")
    fused = bag["/map_points"][-1]
    assert fused.header.frame_id == "map" and fused.width > 1000
    assert [f.name for f in fused.fields] == ["x", "y", "z", "rgb", "confidence"]
    path = bag["/path"][-1]
    assert path.header.frame_id == "map" and len(path.poses) == len(depth)
    assert (out / "demo.png").stat().st_size > 10_000 and (out / "points.ply").stat().st_size > 10_000
