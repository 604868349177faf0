"""`mapany-ros process`: offline reconstruction of recorded bags, read back with Foxglove's MCAP reader.

Small synthetic bags (96x72, 3 s) are processed with the plane sweep in-process, without DDS. The
output bags are read with ``mcap`` / ``mcap_ros2`` (not rosbags, which wrote them) and checked for
topics, stamps, frames and sizes, then scored against the input bag's ground truth. Damaged inputs
(truncated or corrupted MCAP and sqlite3, missing topics, unknown image encodings) must stop the
run with a message naming the damage, or drop the bad frames with a warning, and leave a readable
output bag holding what was produced before the damage.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import shutil
import struct
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mcap.reader import make_reader
from mcap_ros2.decoder import DecoderFactory
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore
from scipy.spatial.transform import Rotation

from mapany_ros.commands import process as process_tool
from mapany_ros.sim.robot_bag import write_synthetic_bag
from mapany_ros.sim.scene import SyntheticScene

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_PARAMS = REPO_ROOT / "config" / "demo.yaml"
W, H, RATE, DURATION = 96, 72, 10.0, 3.0
N_FRAMES = int(DURATION * RATE)
# config/demo.yaml, cut down for a 96x72 camera: full resolution, fewer planes, shorter windows.
OVERRIDES = ["planesweep.downscale:=1", "planesweep.num_planes:=32", "keyframe.min_translation_m:=0.08",
             "window.size:=6", "window.overlap:=2"]
TYPESTORE = get_typestore(Stores.ROS2_KILTED)
OPTICAL = "camera_optical_frame"
OUTPUT_TYPES = {
    "/camera/depth": "sensor_msgs/msg/Image",
    "/camera/depth/camera_info": "sensor_msgs/msg/CameraInfo",
    "/camera/confidence": "sensor_msgs/msg/Image",
    "/points": "sensor_msgs/msg/PointCloud2",
    "/path": "nav_msgs/msg/Path",
    "/tf": "tf2_msgs/msg/TFMessage",
    "/map_points": "sensor_msgs/msg/PointCloud2",
    "/map_grid": "nav_msgs/msg/OccupancyGrid",
}
# The accuracy the live node reaches (test_end_to_end.py, mapany_ros/scoring/scene_scores.py TARGETS).
MEDIAN_ABS_REL, WITHIN_10PCT = 0.03, 0.90


# --------------------------------------------------------------------------- reading bags


def stamp(msg: Any) -> int:
    return msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec


def mcap_file(bag: Path) -> Path:
    [path] = bag.glob("*.mcap")
    return path


def read_output(bag: Path) -> tuple[dict[str, str], dict[str, list[tuple[int, Any]]]]:
    """({topic: schema name}, {topic: [(log time, message)]}) with Foxglove's reader, independent of rosbags."""
    with open(mcap_file(bag), "rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()], validate_crcs=True)
        summary = reader.get_summary()
        assert summary is not None, f"{bag}: no MCAP summary (the writer was not closed)"
        assert {ch.message_encoding for ch in summary.channels.values()} <= {"cdr"}
        types = {ch.topic: summary.schemas[ch.schema_id].name for ch in summary.channels.values()}
        msgs: dict[str, list[tuple[int, Any]]] = {t: [] for t in types}
        for _, channel, message, msg in reader.iter_decoded_messages():
            msgs[channel.topic].append((message.log_time, msg))
    return types, msgs


@dataclasses.dataclass
class Truth:
    """What the input bag says happened: image stamps, true depth and base poses, the camera."""

    image_stamps: list[int]
    depth: dict[int, np.ndarray]
    T_map_base: dict[int, np.ndarray]
    T_base_camera: np.ndarray
    K: np.ndarray


def _matrix(translation: Any, rotation: Any) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = Rotation.from_quat([rotation.x, rotation.y, rotation.z, rotation.w]).as_matrix()
    T[:3, 3] = [translation.x, translation.y, translation.z]
    return T


def read_truth(bag: Path) -> Truth:
    """Ground truth of a synthetic input bag (MCAP or sqlite3, so read with rosbags)."""
    stamps, depth, poses, static, K = [], {}, {}, {}, None
    with AnyReader([bag], default_typestore=TYPESTORE) as reader:
        for conn, _, raw in reader.messages():
            msg = reader.deserialize(raw, conn.msgtype)
            if conn.topic in ("/camera/image_raw", "/camera/image_raw/compressed"):
                stamps.append(stamp(msg))
            elif conn.topic == "/ground_truth/depth":
                depth[stamp(msg)] = np.frombuffer(msg.data.tobytes(), "<f4").reshape(msg.height, msg.width)
            elif conn.topic == "/ground_truth/odom":
                poses[stamp(msg)] = _matrix(msg.pose.pose.position, msg.pose.pose.orientation)
            elif conn.topic == "/tf_static":
                for tf in msg.transforms:
                    static[tf.child_frame_id] = _matrix(tf.transform.translation, tf.transform.rotation)
            elif conn.topic == "/camera/camera_info":
                K = np.reshape(msg.k, (3, 3))
    return Truth(stamps, depth, poses, static["camera_link"] @ static[OPTICAL], K)


def depth_of(msg: Any) -> np.ndarray:
    assert msg.encoding == "32FC1" and msg.step == 4 * msg.width and not msg.is_bigendian
    return np.frombuffer(bytes(msg.data), "<f4").reshape(msg.height, msg.width)


def cloud_arrays(msg: Any) -> np.ndarray:
    """Every float32 field of a PointCloud2, read by its declared offsets (a structured array)."""
    assert msg.height == 1 and msg.row_step == msg.point_step * msg.width and not msg.is_bigendian
    dtype = np.dtype({"names": [f.name for f in msg.fields], "formats": ["<f4"] * len(msg.fields),
                      "offsets": [f.offset for f in msg.fields], "itemsize": msg.point_step})
    assert all(f.datatype == 7 and f.count == 1 for f in msg.fields)  # FLOAT32
    return np.frombuffer(bytes(msg.data), dtype=dtype, count=msg.width)


def depth_errors(depths: dict[int, np.ndarray], truth: Truth) -> tuple[float, float, float]:
    """(median |d - gt| / gt, fraction within 10 %, smallest valid fraction) over every keyframe's valid pixels."""
    rel, valid = [], []
    for s, d in depths.items():
        ok = np.isfinite(d)
        gt = truth.depth[s][ok]
        rel.append(np.abs(d[ok] - gt) / gt)
        valid.append(ok.mean())
    r = np.concatenate(rel)
    return float(np.median(r)), float(np.mean(r < 0.10)), float(min(valid))


# --------------------------------------------------------------------------- bags and runs


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scene() -> SyntheticScene:
    return SyntheticScene(0)


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("process")


@pytest.fixture(scope="module")
def mcap_bag(bags: Path, scene: SyntheticScene) -> Path:
    return write_synthetic_bag(bags / "raw_mcap", width=W, height=H, duration_s=DURATION, rate_hz=RATE, scene=scene)


@pytest.fixture(scope="module")
def sqlite_bag(bags: Path, scene: SyntheticScene) -> Path:
    return write_synthetic_bag(bags / "jpeg_sqlite", width=W, height=H, duration_s=DURATION, rate_hz=RATE,
                               scene=scene, storage="sqlite3", image_format="jpeg")


@pytest.fixture(scope="module")
def truth(mcap_bag: Path) -> Truth:
    return read_truth(mcap_bag)


def parameters(*extra: str) -> dict[str, Any]:
    values, warnings = process_tool.load_parameters(DEMO_PARAMS, [*OVERRIDES, *extra])
    assert warnings == []
    return values


def cli_args(in_bag: Path, out_bag: Path, *extra: str) -> list[str]:
    args = [str(in_bag), str(out_bag), "--params", str(DEMO_PARAMS), "--quiet"]
    for o in OVERRIDES:
        args += ["-p", o]
    return args + list(extra)


@dataclasses.dataclass
class Processed:
    out: Path
    summary: process_tool.Summary
    counts: Counter[str]


def run_process(in_bag: Path, out_bag: Path, *extra: str) -> Processed:
    run, summary = process_tool.process(in_bag, out_bag, parameters(*extra), progress=False)
    return Processed(out_bag, summary, Counter(run.out_counts))


@pytest.fixture(scope="module")
def processed_mcap(mcap_bag: Path, bags: Path) -> Processed:
    return run_process(mcap_bag, bags / "out_raw_mcap")


@pytest.fixture(scope="module")
def processed_sqlite(sqlite_bag: Path, bags: Path) -> Processed:
    return run_process(sqlite_bag, bags / "out_jpeg_sqlite", "image_transport:=compressed")


def errors_logged(caplog: pytest.LogCaptureFixture, level: int = logging.ERROR) -> str:
    return "\n".join(r.getMessage() for r in caplog.records
                     if r.name == "mapany_ros.process" and r.levelno >= level)


# --------------------------------------------------------------------------- 1. end to end


def check_outputs(result: Processed, truth: Truth) -> dict[str, list[tuple[int, Any]]]:
    """Topics, stamps, frames, sizes and fields of an output bag; its depth and path against ground truth."""
    types, msgs = read_output(result.out)
    assert types == OUTPUT_TYPES
    assert Counter({t: len(m) for t, m in msgs.items()}) == result.counts  # what process says it wrote
    for topic, topic_msgs in msgs.items():
        stamped = [(log, stamp(m.transforms[0]) if topic == "/tf" else stamp(m)) for log, m in topic_msgs]
        assert all(log == s for log, s in stamped), f"{topic}: log time is not the header stamp"

    depth = {stamp(m): m for _, m in msgs["/camera/depth"]}
    assert len(depth) == len(msgs["/camera/depth"]), "a keyframe's depth was written twice"
    assert len(depth) >= 6
    assert set(depth) <= set(truth.image_stamps)
    infos = {stamp(m): m for _, m in msgs["/camera/depth/camera_info"]}
    confidence = {stamp(m): m for _, m in msgs["/camera/confidence"]}
    clouds = {stamp(m): m for _, m in msgs["/points"]}
    assert set(infos) == set(confidence) == set(clouds) == set(depth)
    assert len(msgs["/points"]) == len(depth)
    for s, m in depth.items():
        assert m.header.frame_id == infos[s].header.frame_id == confidence[s].header.frame_id == OPTICAL
        assert (m.width, m.height) == (infos[s].width, infos[s].height) == (W, H)  # downscale 1
        np.testing.assert_allclose(np.reshape(infos[s].k, (3, 3)), truth.K, rtol=1e-6)
        assert (confidence[s].encoding, confidence[s].width, confidence[s].height) == ("32FC1", W, H)
        conf = depth_of(confidence[s])
        d = depth_of(m)
        assert np.all(np.isfinite(conf[np.isfinite(d)]))

        cloud = clouds[s]
        assert cloud.header.frame_id == "map"
        assert [f.name for f in cloud.fields] == ["x", "y", "z", "rgb"] and cloud.point_step == 16
        assert cloud.width == np.isfinite(d).sum() > 0  # one point per valid depth pixel
        # The points are the depth back-projected from the camera's true pose in the map.
        xyz = cloud_arrays(cloud)
        p = np.stack([xyz["x"], xyz["y"], xyz["z"]], axis=1).astype(np.float64)
        T = np.linalg.inv(truth.T_map_base[s] @ truth.T_base_camera)
        pc = p @ T[:3, :3].T + T[:3, 3]
        u = np.round(truth.K[0, 0] * pc[:, 0] / pc[:, 2] + truth.K[0, 2]).astype(int)
        v = np.round(truth.K[1, 1] * pc[:, 1] / pc[:, 2] + truth.K[1, 2]).astype(int)
        inside = (u >= 0) & (u < W) & (v >= 0) & (v < H)
        assert inside.mean() > 0.99
        gt = truth.depth[s][v[inside], u[inside]]
        assert np.median(np.abs(pc[inside, 2] - gt) / gt) <= MEDIAN_ABS_REL

    med, within, valid_min = depth_errors({s: depth_of(m) for s, m in depth.items()}, truth)
    assert med <= MEDIAN_ABS_REL, f"median abs rel {med:.2%}"
    assert within >= WITHIN_10PCT, f"within 10 %: {within:.1%}"
    assert valid_min >= 0.25, f"a keyframe has only {valid_min:.0%} valid pixels"

    # The final path: every keyframe once, base poses in map, the truth within millimetres (exact odometry).
    paths = [m for _, m in msgs["/path"]]
    assert all(p.header.frame_id == "map" for p in paths)
    assert [stamp(p) for p in paths] == sorted(stamp(p) for p in paths)
    final = paths[-1]
    assert [stamp(p) for p in final.poses] == sorted(depth)
    assert {p.header.frame_id for p in final.poses} == {"map"}
    for p in final.poses:
        T = _matrix(p.pose.position, p.pose.orientation)
        T_true = truth.T_map_base[stamp(p)]
        assert np.linalg.norm(T[:3, 3] - T_true[:3, 3]) < 0.005
        assert Rotation.from_matrix(T[:3, :3].T @ T_true[:3, :3]).magnitude() < math.radians(0.2)

    # map -> odom, stamped with keyframes, identity up to millimetres (exact odometry).
    transforms = [tf for _, m in msgs["/tf"] for tf in m.transforms]
    assert transforms and {(tf.header.frame_id, tf.child_frame_id) for tf in transforms} == {("map", "odom")}
    for tf in transforms:
        assert stamp(tf) in depth
        T = _matrix(tf.transform.translation, tf.transform.rotation)
        assert np.linalg.norm(T[:3, 3]) < 0.01 and Rotation.from_matrix(T[:3, :3]).magnitude() < math.radians(0.5)

    [(_, fused)] = msgs["/map_points"]
    assert fused.header.frame_id == "map" and stamp(fused) == max(depth)
    assert [f.name for f in fused.fields] == ["x", "y", "z", "rgb", "confidence"]
    fields = cloud_arrays(fused)
    assert fused.width > 100 and np.all(fields["confidence"] > 0)

    [(_, grid)] = msgs["/map_grid"]
    assert grid.header.frame_id == "map" and stamp(grid) == max(depth)
    assert grid.info.resolution == pytest.approx(0.05) and len(grid.data) == grid.info.width * grid.info.height
    cells = np.asarray(grid.data, np.int8)
    assert np.count_nonzero(cells == 100) > 10 and np.count_nonzero(cells == 0) > 100
    return msgs


def test_mcap_raw_bag_end_to_end(processed_mcap: Processed, mcap_bag: Path, truth: Truth) -> None:
    assert processed_mcap.summary.error == ""
    with open(mcap_file(mcap_bag), "rb") as f:
        summary = make_reader(f).get_summary()
    inputs = {"/tf_static", "/odom", "/camera/camera_info", "/camera/image_raw"}
    counts = summary.statistics.channel_message_counts
    assert processed_mcap.summary.messages == sum(counts[i] for i, ch in summary.channels.items() if ch.topic in inputs)
    msgs = check_outputs(processed_mcap, truth)
    assert len(msgs["/camera/depth"]) >= 12  # 5 cm per frame, 8 cm per keyframe: every other frame of 30


def test_sqlite_jpeg_bag_end_to_end(processed_sqlite: Processed, sqlite_bag: Path, processed_mcap: Processed
                                    ) -> None:
    assert list(sqlite_bag.glob("*.db3"))
    assert processed_sqlite.summary.error == ""
    msgs = check_outputs(processed_sqlite, read_truth(sqlite_bag))
    # The same robot as the raw bag: the same keyframes, only the pixels went through JPEG.
    _, raw = read_output(processed_mcap.out)
    assert [stamp(m) for _, m in msgs["/camera/depth"]] == [stamp(m) for _, m in raw["/camera/depth"]]


# --------------------------------------------------------------------------- 2. the command line


def read_ply(path: Path) -> np.ndarray:
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    assert header[:2] == ["ply", "format binary_little_endian 1.0"]
    [n] = [int(line.split()[2]) for line in header if line.startswith("element vertex")]
    kinds = {"float": "<f4", "uchar": "u1"}
    props = [line.split() for line in header if line.startswith("property")]
    dtype = np.dtype([(name, kinds[kind]) for _, kind, name in props])
    assert len(data) - end == n * dtype.itemsize, "PLY body does not hold the vertex count it declares"
    return np.frombuffer(data, dtype=dtype, offset=end, count=n)


def test_cli_writes_ply_tum_and_rerun(mcap_bag: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                      capsys: pytest.CaptureFixture) -> None:
    from rerun.chunk import RrdReader

    out, ply, tum, rrd = tmp_path / "out", tmp_path / "map.ply", tmp_path / "path.txt", tmp_path / "run.rrd"
    grid_yaml = tmp_path / "nav2" / "grid.yaml"
    grid_yaml.parent.mkdir()
    torch.set_num_threads(2)
    rc = process_tool.main(cli_args(mcap_bag, out, "-p", "window.sise:=6", "--ply", str(ply), "--tum", str(tum),
                                    "--rerun", str(rrd), "--threads", "1", "--grid", str(grid_yaml)))
    assert rc == 0 and torch.get_num_threads() == 1
    warnings = errors_logged(caplog, logging.WARNING)
    assert "'window.sise' is not a parameter" in warnings and "did you mean 'window.size'?" in warnings
    printed = capsys.readouterr().out
    assert all(f"wrote {path}" in printed for path in (out, tum, ply, rrd, grid_yaml))

    _, msgs = read_output(out)
    depth_stamps = [stamp(m) for _, m in msgs["/camera/depth"]]
    final_path = msgs["/path"][-1][1]

    # PLY: the fused map, the same points as /map_points.
    vertices = read_ply(ply)
    assert [*vertices.dtype.names] == ["x", "y", "z", "red", "green", "blue", "confidence"]
    fused = cloud_arrays(msgs["/map_points"][0][1])
    assert len(vertices) == len(fused) > 100
    np.testing.assert_allclose(np.stack([vertices[k] for k in "xyz"]), np.stack([fused[k] for k in "xyz"]),
                               atol=1e-6)

    # The grid pair, as Nav2's map_server loads it: the /map_grid of the bag, cell for cell.
    from test_nav2_map import load_like_map_server

    grid_msg = msgs["/map_grid"][0][1]
    loaded = load_like_map_server(grid_yaml)
    assert (tmp_path / "nav2" / "grid.pgm").is_file()
    np.testing.assert_array_equal(loaded.data.ravel(), np.asarray(grid_msg.data, np.int8))
    assert loaded.origin_xy == pytest.approx((grid_msg.info.origin.position.x, grid_msg.info.origin.position.y))

    # TUM: "stamp tx ty tz qx qy qz qw", one line per keyframe, the final /path.
    lines = tum.read_text().splitlines()
    rows = np.array([[float(x) for x in line.split()] for line in lines])
    assert rows.shape == (len(depth_stamps), 8)
    np.testing.assert_allclose(rows[:, 0], np.array(sorted(depth_stamps)) * 1e-9, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(rows[:, 4:], axis=1), 1.0, atol=1e-6)
    positions = [[p.pose.position.x, p.pose.position.y, p.pose.position.z] for p in final_path.poses]
    np.testing.assert_allclose(rows[:, 1:4], positions, atol=2e-6)
    quaternions = [[p.pose.orientation.x, p.pose.orientation.y, p.pose.orientation.z, p.pose.orientation.w]
                   for p in final_path.poses]
    np.testing.assert_allclose(rows[:, 4:], quaternions, atol=2e-9)

    # rerun: a recording of this application with every keyframe's depth and points, the path and the map.
    reader = RrdReader(rrd)
    [recording] = reader.recordings()
    assert recording.application_id == "mapany_ros"
    rows_per_entity: Counter[str] = Counter()
    for chunk in reader.stream():
        rows_per_entity[chunk.entity_path] += chunk.num_rows
    assert rows_per_entity["/camera/depth"] == rows_per_entity["/world/keyframe_points"] == len(depth_stamps)
    assert rows_per_entity["/world/trajectory"] == rows_per_entity["/world/map"] == 1


def test_cli_refuses_existing_output_and_missing_input(mcap_bag: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert process_tool.main(cli_args(mcap_bag, existing)) == 2
    assert f"output bag {existing} exists already" in errors_logged(caplog)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]

    caplog.clear()
    assert process_tool.main(cli_args(tmp_path / "no_such_bag", tmp_path / "out")) == 2
    assert f"input bag {tmp_path / 'no_such_bag'} does not exist" in errors_logged(caplog)
    assert not (tmp_path / "out").exists()

    with pytest.raises(SystemExit) as usage:
        process_tool.main(cli_args(mcap_bag, tmp_path / "out", "--threads", "0"))
    assert usage.value.code == 2 and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 3. damaged input


def copy_bag(src: Path, dst: Path, damage: Callable[[bytearray], None]) -> Path:
    """A copy of a one-file bag whose storage file ``damage`` edits in place; metadata.yaml untouched."""
    shutil.copytree(src, dst)
    [path] = [p for p in dst.iterdir() if p.suffix in (".mcap", ".db3")]
    data = bytearray(path.read_bytes())
    damage(data)
    path.write_bytes(bytes(data))
    return dst


def rewrite_bag(src: Path, dst: Path, edit: Callable[[str, int, Any], Any | None],
                storage: StoragePlugin = StoragePlugin.MCAP) -> Path:
    """A copy of a bag with each message replaced by ``edit(topic, index on topic, message)``; None drops it."""
    seen: Counter[str] = Counter()
    with AnyReader([src], default_typestore=TYPESTORE) as reader, \
            Writer(dst, version=9, storage_plugin=storage) as writer:
        conns = {}
        for conn, t, raw in reader.messages():
            msg = edit(conn.topic, seen[conn.topic], reader.deserialize(raw, conn.msgtype))
            seen[conn.topic] += 1
            if msg is None:
                continue
            if conn.topic not in conns:
                conns[conn.topic] = writer.add_connection(conn.topic, conn.msgtype, typestore=TYPESTORE)
            writer.write(conns[conn.topic], t, TYPESTORE.serialize_cdr(msg, conn.msgtype))
    return dst


def chunks_of(bag: Path) -> list[Any]:
    with open(mcap_file(bag), "rb") as f:
        return sorted(make_reader(f).get_summary().chunk_indexes, key=lambda c: c.chunk_start_offset)


def records_offset(chunk: Any) -> int:
    """File offset of a chunk's records: opcode, length, 3 x u64 times/size, u32 crc, compression, u64 size."""
    return chunk.chunk_start_offset + 1 + 8 + 24 + 4 + 4 + len(chunk.compression) + 8


def add_chunk_crcs(data: bytearray, chunks: list[Any]) -> None:
    """Fill in the chunk CRCs rosbags leaves at 0 (no check), as rosbag2's MCAP recorder writes them."""
    for c in chunks:
        assert c.compression == ""
        start = records_offset(c)
        crc = zlib.crc32(bytes(data[start:start + c.compressed_size]))
        at = c.chunk_start_offset + 1 + 8 + 24
        data[at:at + 4] = struct.pack("<I", crc)


def check_partial(result_dir: Path, full: Processed, truth: Truth, intact_until_ns: int,
                  readable_until_ns: int | None = None) -> None:
    """The partial output: readable, keyframes up to the damage only, the first window as in the full run.

    Every message logged before ``intact_until_ns`` was readable, none after ``readable_until_ns``
    (default: the same).
    """
    types, msgs = read_output(result_dir)
    assert set(types) == set(OUTPUT_TYPES)
    depth = {stamp(m): depth_of(m) for _, m in msgs["/camera/depth"]}
    _, full_msgs = read_output(full.out)
    full_depth = {stamp(m): depth_of(m) for _, m in full_msgs["/camera/depth"]}
    limit = intact_until_ns if readable_until_ns is None else readable_until_ns
    assert set(depth) <= {s for s in full_depth if s < limit}
    # Keyframes of the last moments before the damage may wait for odometry that never comes.
    intact = sorted(s for s in full_depth if s < intact_until_ns)
    assert len(depth) >= len(intact) - 2 >= 6
    # The first window was finished long before the damage: exactly what the undamaged run wrote.
    for s in intact[:6]:
        np.testing.assert_array_equal(depth[s], full_depth[s])
    med, within, _ = depth_errors(depth, truth)
    assert med <= MEDIAN_ABS_REL and within >= WITHIN_10PCT
    final = msgs["/path"][-1][1]
    assert [stamp(p) for p in final.poses] == sorted(depth)
    assert len(msgs["/map_points"]) == 1


def complete_message_times(data: bytes, chunk: Any, end: int) -> list[int]:
    """Log times of an uncompressed chunk's message records that lie wholly before file offset ``end``."""
    times, at = [], records_offset(chunk)
    stop = min(end, at + chunk.compressed_size)
    while at + 9 <= stop:
        op, length = data[at], struct.unpack_from("<Q", data, at + 1)[0]
        if at + 9 + length > stop:
            break
        if op == 0x05:  # Message: channel u16, sequence u32, log time u64, ...
            times.append(struct.unpack_from("<Q", data, at + 9 + 6)[0])
        at += 9 + length
    return times


@pytest.mark.parametrize("kind", ["records", "checksum"])
def test_corrupted_mcap_stops_with_partial_output(kind: str, mcap_bag: Path, processed_mcap: Processed,
                                                  truth: Truth, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """records: garbage over the first records of the second chunk; checksum: zeros in its middle, chunks with CRCs."""
    chunks = chunks_of(mcap_bag)
    assert len(chunks) >= 2
    second = chunks[1]

    def damage(data: bytearray) -> None:
        if kind == "records":
            at = records_offset(second)
            data[at:at + 64] = b"\xff" * 64
        else:
            add_chunk_crcs(data, chunks)
            reader = make_reader(io.BytesIO(bytes(data)), validate_crcs=True)
            assert sum(1 for _ in reader.iter_messages()) > 0  # the CRCs are right before the damage
            middle = records_offset(second) + second.compressed_size // 2
            data[middle:middle + 4096] = bytes(4096)

    bag = copy_bag(mcap_bag, tmp_path / "damaged", damage)
    out = tmp_path / "out"
    assert process_tool.main(cli_args(bag, out)) == 1
    error = errors_logged(caplog)
    assert " is damaged after " in error and "the output holds everything processed before" in error
    if kind == "checksum":
        assert "checksum" in error
    check_partial(out, processed_mcap, truth, second.message_start_time)


def test_undecodable_message_is_named(mcap_bag: Path, processed_mcap: Processed, truth: Truth, tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    """One image whose CDR is broken (a string length overwritten) in an intact container.

    process.py stops there today (exit 1, the output up to it); dropping that one message with a
    warning and going on (exit 0) would match the node's handling of bad input. Either way the
    message names the topic and the stamp.
    """
    bad = N_FRAMES // 2
    with open(mcap_file(mcap_bag), "rb") as f:
        payload = [m.data for _, ch, m in make_reader(f).iter_messages(topics=["/camera/image_raw"])][bad]

    def damage(data: bytearray) -> None:
        at = data.find(payload[:64])  # CDR header, stamp, then the frame_id length at offset 12
        assert at > 0 and data.find(payload[:64], at + 1) < 0
        data[at + 12:at + 16] = struct.pack("<I", 2**31 - 1)

    bag = copy_bag(mcap_bag, tmp_path / "bad_cdr", damage)
    out = tmp_path / "out"
    rc = process_tool.main(cli_args(bag, out))
    bad_stamp = truth.image_stamps[bad]
    logged = errors_logged(caplog, logging.WARNING)
    assert "sensor_msgs/msg/Image message on /camera/image_raw" in logged and f"{bad_stamp * 1e-9:.3f}" in logged
    if rc == 1:
        check_partial(out, processed_mcap, truth, bad_stamp)
    else:
        assert rc == 0
        _, msgs = read_output(out)
        depth_stamps = {stamp(m) for _, m in msgs["/camera/depth"]}
        assert bad_stamp not in depth_stamps and sum(s > bad_stamp for s in depth_stamps) >= 4


def test_truncated_mcap(mcap_bag: Path, processed_mcap: Processed, truth: Truth, tmp_path: Path,
                        caplog: pytest.LogCaptureFixture) -> None:
    """A recording cut off (recorder killed, disk full): no summary, no footer, the last chunk cut in its middle.

    (This small bag has two 1 MiB chunks, so a cut at 60 % would fall inside the first one.)
    """
    second = chunks_of(mcap_bag)[1]
    cut = records_offset(second) + second.compressed_size // 2
    complete = complete_message_times(mcap_file(mcap_bag).read_bytes(), second, cut)
    assert complete and cut < 0.9 * mcap_file(mcap_bag).stat().st_size
    bag = copy_bag(mcap_bag, tmp_path / "truncated", lambda data: data.__delitem__(slice(cut, None)))
    out = tmp_path / "out"
    rc = process_tool.main(cli_args(bag, out))
    error = errors_logged(caplog)
    assert rc == 1, error
    assert "damaged" in error
    # The first chunk is whole; of the second, at most the messages before the cut.
    check_partial(out, processed_mcap, truth, second.message_start_time, max(complete) + 1)


def test_truncated_sqlite_cannot_start(sqlite_bag: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    [db] = sqlite_bag.glob("*.db3")
    size = db.stat().st_size
    bag = copy_bag(sqlite_bag, tmp_path / "truncated", lambda data: data.__delitem__(slice(int(0.6 * size), None)))
    out = tmp_path / "out"
    assert process_tool.main(cli_args(bag, out, "-p", "image_transport:=compressed")) == 2
    error = errors_logged(caplog)
    assert f"cannot open input bag {bag}" in error and "malformed" in error
    assert not out.exists()


def test_corrupted_jpeg_in_sqlite_is_dropped(sqlite_bag: Path, processed_sqlite: Processed, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """sqlite3 checks no blob: overwritten image bytes reach the decoder, which drops that frame."""
    with AnyReader([sqlite_bag], default_typestore=TYPESTORE) as reader:
        conns = [c for c in reader.connections if c.topic == "/camera/image_raw/compressed"]
        images = [reader.deserialize(raw, c.msgtype) for c, _, raw in reader.messages(connections=conns)]
    _, full = read_output(processed_sqlite.out)
    keyframes = [stamp(m) for _, m in full["/camera/depth"]]
    db = next(sqlite_bag.glob("*.db3")).read_bytes()
    # A keyframe whose JPEG ends within one database page (a page header would split the bytes).
    victim = next(m for m in images[N_FRAMES // 3:] if stamp(m) in keyframes and db.count(m.data.tobytes()[-200:]) == 1)
    tail = victim.data.tobytes()[-200:]

    def damage(data: bytearray) -> None:
        at = data.find(tail)
        data[at:at + len(tail)] = bytes(len(tail))  # the end of the image, EOI marker included

    bag = copy_bag(sqlite_bag, tmp_path / "corrupted", damage)
    out = tmp_path / "out"
    assert process_tool.main(cli_args(bag, out, "-p", "image_transport:=compressed")) == 0
    warnings = errors_logged(caplog, logging.WARNING)
    assert "camera/image_raw/compressed dropped: cannot decode CompressedImage data as JPEG" in warnings
    assert "truncated or corrupt" in warnings
    _, msgs = read_output(out)
    depth_stamps = {stamp(m) for _, m in msgs["/camera/depth"]}
    assert stamp(victim) not in depth_stamps and len(depth_stamps) >= len(keyframes) - 2


@pytest.mark.parametrize("case", ["cameras", "image_transport", "odom"])
def test_missing_topic_cannot_start(case: str, mcap_bag: Path, tmp_path: Path,
                                    caplog: pytest.LogCaptureFixture) -> None:
    bag, extra, missing = mcap_bag, [], []
    if case == "cameras":
        extra, missing = ["-p", "cameras:=[front]"], ["/front/camera_info", "/front/image_raw"]
    elif case == "image_transport":
        extra, missing = ["-p", "image_transport:=compressed"], ["/camera/image_raw/compressed"]
    else:
        bag = rewrite_bag(mcap_bag, tmp_path / "no_odom", lambda topic, _, msg: None if topic == "/odom" else msg)
        missing = ["/odom"]
    out = tmp_path / "out"
    assert process_tool.main(cli_args(bag, out, *extra)) == 2
    error = errors_logged(caplog)
    assert f"input bag {bag} lacks topic(s) {', '.join(missing)}" in error
    assert "it has: /camera/camera_info (sensor_msgs/msg/CameraInfo), /camera/image_raw (sensor_msgs/msg/Image)," \
        in error
    assert (", /odom (nav_msgs/msg/Odometry)," in error) == (case != "odom")
    assert not out.exists()


@pytest.mark.parametrize("transport", ["raw", "compressed"])
def test_unknown_image_encoding_drops_frames(transport: str, mcap_bag: Path, sqlite_bag: Path, truth: Truth,
                                             tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The middle second is yuv422 (raw) or TIFF (compressed): those frames go, with a warning; the rest stays."""
    bad = range(N_FRAMES // 3, 2 * N_FRAMES // 3)

    def edit(topic: str, index: int, msg: Any) -> Any:
        if index not in bad:
            return msg
        if topic == "/camera/image_raw":
            return dataclasses.replace(msg, encoding="yuv422", step=2 * msg.width,
                                       data=np.full(2 * msg.width * msg.height, 128, np.uint8))
        if topic == "/camera/image_raw/compressed":
            return dataclasses.replace(msg, format="rgb8; tiff compressed bgr8")
        return msg

    if transport == "raw":
        bag, extra = rewrite_bag(mcap_bag, tmp_path / "yuv", edit), []
        expected = "camera/image_raw dropped: unsupported image encoding 'yuv422'; supported: rgb8, bgr8"
    else:
        bag = rewrite_bag(sqlite_bag, tmp_path / "tiff", edit, StoragePlugin.SQLITE3)
        extra = ["-p", "image_transport:=compressed"]
        expected = ("camera/image_raw/compressed dropped: unsupported CompressedImage format "
                    "'rgb8; tiff compressed bgr8': compression 'tiff compressed bgr8' is not jpeg or png")
    out = tmp_path / "out"
    assert process_tool.main(cli_args(bag, out, *extra)) == 0
    assert expected in errors_logged(caplog, logging.WARNING)
    _, msgs = read_output(out)
    bad_stamps = set(truth.image_stamps[bad.start:bad.stop])
    depth_stamps = {stamp(m) for _, m in msgs["/camera/depth"]}
    assert not depth_stamps & bad_stamps
    assert sum(s < min(bad_stamps) for s in depth_stamps) >= 4 and sum(s > max(bad_stamps) for s in depth_stamps) >= 4
    depths = {stamp(m): depth_of(m) for _, m in msgs["/camera/depth"]}
    med, within, _ = depth_errors(depths, truth)
    assert med <= MEDIAN_ABS_REL and within >= WITHIN_10PCT
