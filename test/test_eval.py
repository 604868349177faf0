"""Synthetic bags with ground truth, and `mapany-ros eval` scoring results against them.

The bags are read back with rosbags and, independently, with Foxglove's ``mcap`` reader; eval is
fed a result built from the ground truth itself (everything must score perfectly) and one with
known errors injected (the report must give exactly those errors back).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from rclpy.serialization import serialize_message
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore
from scipy.spatial.transform import Rotation
from std_msgs.msg import Header

from mapany_ros.commands import eval as eval_tool
from mapany_ros.core.alignment import weighted_similarity
from mapany_ros.core.geometry import invert, make_pose, rotation_angle
from mapany_ros.ros import conversions as conv
from mapany_ros.scoring.trajectory import revisit_errors, revisit_pairs
from mapany_ros.sim.odometry import OdometryErrors
from mapany_ros.sim.robot_bag import _compressed, write_synthetic_bag
from mapany_ros.sim.robot_bag import main as synthetic_bag_main
from mapany_ros.sim.scene import SyntheticScene, make_sequence

W, H, RATE, DURATION, START = 64, 48, 10.0, 2.0, 4.0
N_FRAMES = int(DURATION * RATE)
OFFSET_NS = 1_700_000_000 * 10**9
SCALE_ERROR, YAW_DRIFT, ODOM_DELAY = 0.05, 3.0, 0.1
TYPESTORE = get_typestore(Stores.ROS2_KILTED)

RAW_TOPICS = {
    "/camera/image_raw": "sensor_msgs/msg/Image",
    "/camera/camera_info": "sensor_msgs/msg/CameraInfo",
    "/odom": "nav_msgs/msg/Odometry",
    "/tf_static": "tf2_msgs/msg/TFMessage",
    "/ground_truth/odom": "nav_msgs/msg/Odometry",
    "/ground_truth/depth": "sensor_msgs/msg/Image",
    "/ground_truth/camera_info": "sensor_msgs/msg/CameraInfo",
}


@pytest.fixture(scope="module")
def scene() -> SyntheticScene:
    return SyntheticScene(0)


@pytest.fixture(scope="module")
def reference(scene: SyntheticScene):
    """What the bags must contain: the same frames rendered directly."""
    return make_sequence(0, W, H, N_FRAMES, RATE, start_s=START, scene=scene)


@pytest.fixture(scope="module")
def mcap_bag(tmp_path_factory: pytest.TempPathFactory, scene: SyntheticScene) -> Path:
    return write_synthetic_bag(tmp_path_factory.mktemp("bags") / "mcap", width=W, height=H, duration_s=DURATION,
                               rate_hz=RATE, start_s=START, odometry_errors=OdometryErrors(scale_error=SCALE_ERROR),
                               odom_delay_s=ODOM_DELAY, scene=scene)


@pytest.fixture(scope="module")
def sqlite_bag(tmp_path_factory: pytest.TempPathFactory, scene: SyntheticScene) -> Path:
    return write_synthetic_bag(tmp_path_factory.mktemp("bags") / "sqlite", width=W, height=H, duration_s=DURATION,
                               rate_hz=RATE, start_s=START, storage="sqlite3", image_format="jpeg",
                               odometry_errors=OdometryErrors(yaw_drift_deg_per_m=YAW_DRIFT), scene=scene)


def read_bag(path: Path) -> tuple[dict[str, str], dict[str, list]]:
    """({topic: type}, {topic: [(log time, message), ...]}) read with rosbags."""
    with AnyReader([path], default_typestore=TYPESTORE) as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
        msgs: dict[str, list] = {t: [] for t in types}
        for conn, t, raw in reader.messages():
            msgs[conn.topic].append((t, reader.deserialize(raw, conn.msgtype)))
    return types, msgs


def stamp(msg) -> int:
    return conv.stamp_to_ns(msg.header.stamp)


def odom_by_stamp(msgs: list) -> dict[int, np.ndarray]:
    return {stamp(m): conv.odometry_to_matrix(m) for _, m in msgs}


def check_common(path: Path, reference, image_topic: str, odom_delay_s: float) -> dict[str, list]:
    """Topics, counts, one timeline, frames, sizes and the static TF chain, shared by both bags."""
    types, msgs = read_bag(path)
    expected = {**RAW_TOPICS}
    if image_topic != "/camera/image_raw":
        del expected["/camera/image_raw"]
        expected[image_topic] = "sensor_msgs/msg/CompressedImage"
    assert types == expected
    image_stamps = [OFFSET_NS + f.stamp_ns for f in reference.frames]
    for topic in ("/camera/camera_info", image_topic, "/ground_truth/odom", "/ground_truth/depth",
                  "/ground_truth/camera_info"):
        assert [stamp(m) for _, m in msgs[topic]] == image_stamps, topic
        assert all(t == stamp(m) for t, m in msgs[topic]), f"{topic}: log time is not the header stamp"
    for topic in ("/camera/camera_info", image_topic, "/ground_truth/depth", "/ground_truth/camera_info"):
        assert {m.header.frame_id for _, m in msgs[topic]} == {"camera_optical_frame"}, topic

    odom = msgs["/odom"]
    dt = int(1e9 / 50.0)
    assert [stamp(m) for _, m in odom] == list(range(image_stamps[0] - 2 * dt, image_stamps[-1] + 2 * dt + 1, dt))
    assert all(t == stamp(m) + int(round(odom_delay_s * 1e9)) for t, m in odom)
    assert {(m.header.frame_id, m.child_frame_id) for _, m in odom} == {("odom", "base_link")}
    assert {(m.header.frame_id, m.child_frame_id) for _, m in msgs["/ground_truth/odom"]} == {("map", "base_link")}
    for (_, m), f in zip(msgs["/ground_truth/odom"], reference.frames, strict=True):
        np.testing.assert_allclose(conv.odometry_to_matrix(m), f.T_odom_base, atol=1e-9)

    # Static TF: once, first in the bag, base_link -> camera_link -> optical frame composing to the
    # camera extrinsic (so the REP 103 link -> optical rotation is right).
    [(t_static, tf_static)] = msgs["/tf_static"]
    assert t_static == min(t for topic_msgs in msgs.values() for t, _ in topic_msgs)
    chain = {(tf.header.frame_id, tf.child_frame_id): conv.transform_to_matrix(tf.transform)
             for tf in tf_static.transforms}
    assert set(chain) == {("base_link", "camera_link"), ("camera_link", "camera_optical_frame")}
    np.testing.assert_allclose(chain["base_link", "camera_link"] @ chain["camera_link", "camera_optical_frame"],
                               reference.T_base_camera, atol=1e-9)
    np.testing.assert_allclose(chain["camera_link", "camera_optical_frame"][:3, :3],
                               [[0, 0, 1], [-1, 0, 0], [0, -1, 0]], atol=1e-9)

    for topic in ("/camera/camera_info", "/ground_truth/camera_info"):
        for _, info in msgs[topic]:
            assert (info.width, info.height) == (W, H)
            np.testing.assert_allclose(np.reshape(info.k, (3, 3)), reference.camera_model.K)
    for (_, m), f in zip(msgs["/ground_truth/depth"], reference.frames, strict=True):
        assert (m.encoding, m.width, m.height) == ("32FC1", W, H)
        np.testing.assert_array_equal(conv.depth_image_to_array(m), f.depth)
    return msgs


def test_mcap_raw_bag(mcap_bag: Path, reference) -> None:
    msgs = check_common(mcap_bag, reference, "/camera/image_raw", ODOM_DELAY)
    for (_, m), f in zip(msgs["/camera/image_raw"], reference.frames, strict=True):
        assert (m.encoding, m.width, m.height) == ("rgb8", W, H)
        np.testing.assert_array_equal(conv.image_to_rgb(m), f.rgb)
    # 5 % scale error, heading exact: every displacement is 1.05 times the true one.
    odom, truth = odom_by_stamp(msgs["/odom"]), odom_by_stamp(msgs["/ground_truth/odom"])
    first, last = min(truth), max(truth)
    d_odom = odom[last][:3, 3] - odom[first][:3, 3]
    d_true = truth[last][:3, 3] - truth[first][:3, 3]
    assert np.linalg.norm(d_true) > 0.5
    np.testing.assert_allclose(d_odom, (1 + SCALE_ERROR) * d_true, atol=1e-6)
    np.testing.assert_allclose(odom[last][:3, :3], truth[last][:3, :3], atol=1e-9)


def test_sqlite_jpeg_bag(sqlite_bag: Path, reference) -> None:
    assert list(sqlite_bag.glob("*.db3"))
    assert "storage_identifier: sqlite3" in (sqlite_bag / "metadata.yaml").read_text()
    msgs = check_common(sqlite_bag, reference, "/camera/image_raw/compressed", 0.0)
    for (_, m), f in zip(msgs["/camera/image_raw/compressed"], reference.frames, strict=True):
        assert m.format == "rgb8; jpeg compressed bgr8"
        decoded = PILImage.open(io.BytesIO(m.data.tobytes()))
        assert decoded.format == "JPEG"
        rgb = np.asarray(decoded.convert("RGB"))
        assert rgb.shape == (H, W, 3)
        err = rgb.astype(float) - f.rgb
        psnr = 10 * math.log10(255**2 / np.mean(err**2))
        # Quality 95 with 4:2:0 chroma, as image_transport: ~30 dB on this tiny, busy image (19 dB
        # against the next frame).
        assert psnr > 27, f"jpeg differs from the rendering: PSNR {psnr:.1f} dB"
    png = _compressed(reference.frames[0].rgb, "png", Header())
    assert png.format == "rgb8; png compressed bgr8"
    np.testing.assert_array_equal(np.asarray(PILImage.open(io.BytesIO(bytes(png.data)))), reference.frames[0].rgb)
    # 3 deg/m yaw drift, no scale error: the heading turns by 3 deg for every metre driven.
    odom, truth = odom_by_stamp(msgs["/odom"]), odom_by_stamp(msgs["/ground_truth/odom"])
    first, last = min(truth), max(truth)
    driven = 0.5 * (last - first) * 1e-9  # the scene's robot drives at 0.5 m/s
    drift = invert(invert(truth[first]) @ truth[last]) @ (invert(odom[first]) @ odom[last])
    assert math.degrees(rotation_angle(drift)) == pytest.approx(YAW_DRIFT * driven, rel=1e-3)


def test_mcap_reads_with_foxglove_mcap(mcap_bag: Path, reference) -> None:
    """An independent reader finds the same topics, ROS 2 schema names and message contents."""
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    [path] = mcap_bag.glob("*.mcap")
    with open(path, "rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        summary = reader.get_summary()
        schema_of = {ch.topic: summary.schemas[ch.schema_id].name for ch in summary.channels.values()}
        assert schema_of == RAW_TOPICS
        assert {ch.message_encoding for ch in summary.channels.values()} == {"cdr"}
        decoded = {}
        topics = ["/ground_truth/odom", "/ground_truth/depth"]
        for _, channel, message, msg in reader.iter_decoded_messages(topics=topics):
            decoded.setdefault(channel.topic, []).append((message.log_time, msg))
    assert len(decoded["/ground_truth/odom"]) == N_FRAMES
    for (log_time, m), f in zip(decoded["/ground_truth/odom"], reference.frames, strict=True):
        assert log_time == OFFSET_NS + f.stamp_ns
        p = m.pose.pose.position
        np.testing.assert_allclose([p.x, p.y, p.z], f.T_odom_base[:3, 3], atol=1e-9)
    m = decoded["/ground_truth/depth"][0][1]
    depth = np.frombuffer(bytes(m.data), dtype="<f4").reshape(m.height, m.width)
    np.testing.assert_array_equal(depth, reference.frames[0].depth)


def test_synthetic_bag_cli_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "bag").mkdir()
    assert synthetic_bag_main([str(tmp_path / "bag")]) == 2
    assert "exists" in capsys.readouterr().err


# --------------------------------------------------------------------------- eval


def write_result(path: Path, truth: list, depths: list, *, depth_scale: np.ndarray | float = 1.0,
                 pose_offsets: dict[int, np.ndarray] | None = None, stamp_shifts: dict[int, int] | None = None,
                 with_depth: bool = True) -> None:
    """A bag as the node records it, from ground-truth (log time, Odometry) and depth messages.

    /path grows by one pose per message (early messages have a wrong pose the last one fixes, as
    the pose graph does); /camera/depth carries the true depth times ``depth_scale``.
    """
    from nav_msgs.msg import Path as PathMsg
    from tf2_msgs.msg import TFMessage

    pose_offsets, stamp_shifts = pose_offsets or {}, stamp_shifts or {}
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        c_path = w.add_connection("/path", "nav_msgs/msg/Path", typestore=TYPESTORE)
        c_depth = w.add_connection("/camera/depth", "sensor_msgs/msg/Image", typestore=TYPESTORE)
        c_tf = w.add_connection("/tf", "tf2_msgs/msg/TFMessage", typestore=TYPESTORE)
        poses = []
        for k, ((t, odom), depth) in enumerate(zip(truth, depths, strict=True)):
            T = conv.odometry_to_matrix(odom)
            T[:3, 3] += pose_offsets.get(k, 0.0)
            s = stamp(odom) + stamp_shifts.get(k, 0)
            poses.append(conv.pose_stamped(T, "map", s))
            early = [conv.pose_stamped(make_pose(np.eye(3), [9.0, 9.0, 9.0]), "map", stamp(poses[-1]))]
            msg = PathMsg(header=Header(stamp=conv.ns_to_stamp(s), frame_id="map"), poses=poses[:-1] + early)
            w.write(c_path, t, serialize_message(msg))
            if with_depth:
                d = conv.depth_image_to_array(depth) * depth_scale
                image = conv.depth_to_image_msg(d, Header(stamp=depth.header.stamp, frame_id="camera_optical_frame"))
                w.write(c_depth, t, serialize_message(image))
        final = PathMsg(header=Header(stamp=conv.ns_to_stamp(s), frame_id="map"), poses=poses)
        w.write(c_path, t + 1, serialize_message(final))
        w.write(c_tf, t + 1, serialize_message(TFMessage(transforms=[
            conv.matrix_to_transform_stamped(np.eye(4), "map", "odom", t + 1)])))


@pytest.fixture(scope="module")
def keyframes(mcap_bag: Path) -> tuple[list, list]:
    """Every other frame of the ground truth, as keyframes: (odometry messages, depth messages)."""
    _, msgs = read_bag(mcap_bag)
    return msgs["/ground_truth/odom"][::2], [m for _, m in msgs["/ground_truth/depth"]][::2]


def run_eval(result: Path, gt: Path, out: Path) -> dict:
    assert eval_tool.main([str(result), str(gt), "--out", str(out)]) == 0
    assert (out / "eval.png").stat().st_size > 10_000
    return json.loads((out / "eval.json").read_text())


def test_eval_perfect_result(tmp_path: Path, mcap_bag: Path, keyframes, capsys: pytest.CaptureFixture) -> None:
    truth, depths = keyframes
    write_result(tmp_path / "result", truth, depths)
    report = run_eval(tmp_path / "result", mcap_bag, tmp_path / "eval")
    tr = report["trajectory"]
    assert (tr["path_poses"], tr["matched"], tr["matched_exact"]) == (len(truth),) * 3
    est = tr["estimate"]
    for key in ("ate_se3_rmse_m", "ate_sim3_rmse_m", "rpe_trans_rmse_m", "rpe_rot_rmse_deg"):
        assert est[key] < 1e-6, key
    assert est["sim3_scale"] == pytest.approx(1.0, abs=1e-6)
    # The input odometry is 5 % too long and otherwise exact: only a Sim(3) fit absorbs it.
    odo = tr["odometry"]
    assert odo["poses"] == len(truth)
    assert odo["ate_se3_rmse_m"] > 0.01
    assert odo["ate_sim3_rmse_m"] < 1e-3
    assert odo["sim3_scale"] == pytest.approx(1 / (1 + SCALE_ERROR), rel=1e-3)
    # The node claims no drift (identity map -> odom); the truth is the odometry's scale drift.
    mo = report["map_odom"]
    assert mo["estimate_translation_m"] == 0.0
    assert mo["error_translation_m"] == pytest.approx(mo["truth_translation_m"]) and mo["truth_translation_m"] > 0.01
    d = report["depth"]
    assert (d["frames"], d["skipped_no_ground_truth"], d["skipped_size_mismatch"]) == (len(depths), 0, 0)
    assert d["abs_rel"] < 1e-7 and d["median_rel"] < 1e-7
    assert d["delta_1_25"] == 1.0 and d["valid_fraction"] == 1.0
    # Two seconds of driving visit no place twice: no revisit pairs, and no made-up figure.
    for name in ("estimate", "odometry"):
        assert tr[name]["revisit"] == {"pairs": 0, "median_m": None, "p90_m": None}
    printed = capsys.readouterr().out
    assert "path poses matched" in printed and "no place visited twice" in printed


def test_eval_reports_injected_errors(tmp_path: Path, mcap_bag: Path, keyframes) -> None:
    truth, depths = keyframes
    n = len(truth)
    # Depth: rows 0-7 invalid, rows 8-15 30 % too far, the rest 2 % too far.
    scale = np.full((H, 1), 1.02)
    scale[:8] = np.nan
    scale[8:16] = 1.3
    offset = np.array([0.1, 0.0, 0.0])
    k_off = n // 2
    write_result(tmp_path / "result", truth, depths, depth_scale=scale, pose_offsets={k_off: offset},
                 stamp_shifts={1: 400_000, n - 2: -400_000})
    report = run_eval(tmp_path / "result", mcap_bag, tmp_path / "eval")
    tr = report["trajectory"]
    assert (tr["matched"], tr["matched_exact"]) == (n, n - 2)  # shifted by 0.4 ms: matched as the nearest
    est = tr["estimate"]
    # A 10 cm offset of one pose is a 10 cm error in the two consecutive pairs it belongs to.
    assert est["rpe_trans_max_m"] == pytest.approx(0.1, rel=1e-6)
    assert est["rpe_trans_rmse_m"] == pytest.approx(0.1 * math.sqrt(2 / (n - 1)), rel=1e-6)
    assert est["rpe_rot_max_deg"] < 1e-6
    # ATE after the SE(3) fit, computed here with the package's own rigid fit instead of evo.
    P_true = np.array([conv.odometry_to_matrix(m)[:3, 3] for _, m in truth])
    P_est = P_true.copy()
    P_est[k_off] += offset
    fit = weighted_similarity(P_est, P_true, scale=1.0)
    expected = float(np.sqrt(np.mean(np.sum((fit.apply_points(P_est) - P_true) ** 2, axis=1))))
    assert 0.01 < expected < 0.1 / math.sqrt(n)
    assert est["ate_se3_rmse_m"] == pytest.approx(expected, rel=1e-4)
    d = report["depth"]
    valid = (H - 8) / H
    assert d["valid_fraction"] == pytest.approx(valid)
    assert d["abs_rel"] == pytest.approx((32 * 0.02 + 8 * 0.3) / 40, rel=1e-5)
    assert d["median_rel"] == pytest.approx(0.02, rel=1e-5)
    assert d["delta_1_25"] == pytest.approx(32 / 40)
    assert d["per_frame"][0]["pixels_compared"] == (H - 8) * W


def test_eval_missing_topics_and_bags(tmp_path: Path, mcap_bag: Path, keyframes,
                                      capsys: pytest.CaptureFixture) -> None:
    truth, depths = keyframes
    write_result(tmp_path / "result", truth, depths, with_depth=False)
    cases = [
        ([tmp_path / "result", mcap_bag], "/camera/depth"),
        ([mcap_bag, mcap_bag], "/path"),
        ([tmp_path / "result", tmp_path / "result"], "/ground_truth/odom"),
        ([tmp_path / "result", tmp_path / "nothing"], "no such bag"),
    ]
    for args, text in cases:
        with pytest.raises(SystemExit) as e:
            eval_tool.main([str(a) for a in args] + ["--out", str(tmp_path / "eval")])
        assert e.value.code == 2
        assert text in capsys.readouterr().err


# --------------------------------------------------------------------------- revisits


def loop_poses(scene: SyntheticScene, loops: float, rate_hz: float = 1.0) -> tuple[list[int], list[np.ndarray]]:
    """Stamps and true base poses of ``loops`` rounds of the scene's trajectory."""
    period = scene.trajectory.loop_length_m / scene.trajectory.speed_mps
    stamps = [int(round(i / rate_hz * 1e9)) for i in range(int(loops * period * rate_hz))]
    return stamps, [scene.base_pose(s * 1e-9) for s in stamps]


def test_revisit_pairs_and_errors_on_two_passes(scene: SyntheticScene) -> None:
    period = scene.trajectory.loop_length_m / scene.trajectory.speed_mps
    stamps, truth = loop_poses(scene, 1.9)
    a, b = revisit_pairs(truth, stamps)
    # Every pose of the second pass lies within 0.25 m (half the 0.5 m spacing) of one of the first.
    second = [i for i, s in enumerate(stamps) if s * 1e-9 >= period]
    assert list(b) == second and all(stamps[i] * 1e-9 < period for i in a)
    # A rigid change of frame changes nothing: the error is the pair's own.
    G = make_pose(Rotation.from_euler("zyx", [70, 5, -3], degrees=True).as_matrix(), [4.0, -2.0, 1.0])
    assert np.max(revisit_errors([G @ T for T in truth], truth, stamps)) < 1e-9
    # The second pass shifted by 10 cm: every pair is off by exactly that, seen from either frame.
    offset = np.array([0.06, -0.08, 0.0])
    shifted = [T.copy() for T in truth]
    for i in second:
        shifted[i][:3, 3] += offset
    np.testing.assert_allclose(revisit_errors(shifted, truth, stamps), 0.1, atol=1e-9)


def test_revisit_pairs_need_time_and_distance_driven(scene: SyntheticScene) -> None:
    stamps, truth = loop_poses(scene, 1.9)
    # Standing still for 60 s: close in space and apart in time, but never driven away.
    still = [truth[0]] * 60
    assert revisit_pairs(still, [i * 10**9 for i in range(60)])[0].size == 0
    # Driven far enough but too soon, or too close, or within a larger radius.
    assert revisit_pairs(truth, stamps, min_gap_s=60.0)[0].size == 0
    assert revisit_pairs(truth, stamps, min_travel_m=20.0)[0].size == 0
    assert revisit_pairs(truth, stamps, radius_m=0.01)[0].size < revisit_pairs(truth, stamps)[0].size
    assert revisit_errors([], [], []).size == 0


@pytest.fixture(scope="module")
def loops_bag(tmp_path_factory: pytest.TempPathFactory, scene: SyntheticScene) -> Path:
    """2.5 loops of the robot (a frame a second, tiny images) with a heading-drifting odometry."""
    period = scene.trajectory.loop_length_m / scene.trajectory.speed_mps
    return write_synthetic_bag(tmp_path_factory.mktemp("bags") / "loops", width=32, height=24,
                               duration_s=2.5 * period, rate_hz=1.0, start_s=START, odom_rate_hz=10.0,
                               odometry_errors=OdometryErrors(yaw_drift_deg_per_m=YAW_DRIFT), scene=scene)


def test_eval_revisit_error_over_several_loops(tmp_path: Path, loops_bag: Path, scene: SyntheticScene,
                                               capsys: pytest.CaptureFixture) -> None:
    """Each pass of the result put a known offset away: the revisit error is the offset between the
    two passes of each pair, and the drifting odometry's is far larger."""
    _, msgs = read_bag(loops_bag)
    truth, depths = msgs["/ground_truth/odom"], [m for _, m in msgs["/ground_truth/depth"]]
    period = scene.trajectory.loop_length_m / scene.trajectory.speed_mps
    t0 = stamp(truth[0][1])
    passes = [int((stamp(m) - t0) * 1e-9 // period) for _, m in truth]
    assert max(passes) == 2
    pass_offset = {0: np.zeros(3), 1: np.array([0.1, 0.0, 0.0]), 2: np.array([0.1, 0.05, 0.0])}
    write_result(tmp_path / "result", truth, depths, pose_offsets={k: pass_offset[p] for k, p in enumerate(passes)})
    report = run_eval(tmp_path / "result", loops_bag, tmp_path / "eval")
    tr = report["trajectory"]
    assert "0.3 m" in tr["revisit_pairs"]
    true_poses = [conv.odometry_to_matrix(m) for _, m in truth]
    a, b = revisit_pairs(true_poses, [stamp(m) for _, m in truth])
    assert len(b) > 0.5 * len(truth)  # the later passes pair with earlier ones nearly everywhere
    expected = [np.linalg.norm(pass_offset[passes[j]] - pass_offset[passes[i]]) for i, j in zip(a, b, strict=True)]
    assert all(passes[i] < passes[j] for i, j in zip(a, b, strict=True)) and {passes[j] for j in b} == {1, 2}
    rv = tr["estimate"]["revisit"]
    assert rv["pairs"] == len(b)
    assert rv["median_m"] == pytest.approx(np.median(expected), abs=1e-6)
    assert rv["p90_m"] == pytest.approx(np.percentile(expected, 90), abs=1e-6)
    # The odometry turns 3 deg per metre driven: after a 14 m loop it is off by metres where it returns.
    odo = tr["odometry"]["revisit"]
    assert odo["pairs"] == len(b) and odo["median_m"] > 1.0
    printed = capsys.readouterr().out
    assert f"over {len(b)} pairs" in printed and "revisit error, estimate" in printed
