"""`mapany-ros process IN_BAG OUT_BAG`: reconstruct a recorded bag offline, deterministically.

Reads a rosbag2 directory (MCAP or sqlite3) with ``rosbags``, feeds every message in recording
order through exactly what mapany_node does with it (:class:`~mapany_ros.ros.inputs.InputHandler`,
the core pipeline, :class:`~mapany_ros.ros.outputs.OutputBuilder`), on the bag's own time and
without DDS, and writes every output topic with the source stamps to an MCAP rosbag2 (opens in
``ros2 bag play`` and Foxglove). Nothing is dropped for lack of time: every keyframe waits for the
backend. A damaged bag stops the run with a message naming the damage; what was processed before
it is written and readable.

    mapany-ros process robot_bag/ out_bag/ --params config/demo.yaml -p window.size:=6 --ply map.ply --tum path.txt
    mapany-ros process robot_bag/ out_bag/ --params config/demo.yaml --grid map.yaml   # map.pgm beside it
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("mapany_ros.process")


class ProcessError(RuntimeError):
    """The run cannot go on; the message names the problem (and the fix where there is one)."""


# --------------------------------------------------------------------------- parameters


def load_parameters(params_file: Path | None, overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Parameter values as the node would get them: defaults, then a params file, then ``NAME:=VALUE``.

    Returns the values and a warning for each name that is not a parameter (with the nearest one).
    """
    from mapany_ros.ros.params import PARAMETERS, flatten

    values = {p.name: p.default for p in PARAMETERS}
    given: dict[str, Any] = {}
    if params_file is not None:
        try:
            doc = yaml.safe_load(Path(params_file).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ProcessError(f"cannot read parameters file {params_file}: {exc}") from exc
        for node_name in ("/**", "mapany_node", "/mapany_node"):
            section = (doc or {}).get(node_name, {}).get("ros__parameters")
            if section:
                given.update(flatten(section))
    for item in overrides:
        name, sep, text = item.partition(":=")
        if not sep:
            raise ProcessError(f"-p {item!r}: give NAME:=VALUE, e.g. -p window.size:=6")
        given[name] = yaml.safe_load(text) if text else ""
    warnings = []
    for name, value in given.items():
        if name in values:
            values[name] = value
        else:
            near = difflib.get_close_matches(name, list(values), n=1, cutoff=0.5)
            warnings.append(f"parameter {name!r} is not a parameter of mapany_node and is ignored"
                            + (f"; did you mean {near[0]!r}?" if near else ""))
    return values, warnings


# --------------------------------------------------------------------------- bags


class BagInput:
    """The input bag's messages in recording order, deserialised.

    A message that cannot be decoded is reported through ``warn`` and skipped, as the node drops
    bad input; damage to the container stops the iteration with a ProcessError saying where. An
    MCAP bag cut off before its footer (a recorder killed, a full disk) is read in file order up to
    the cut.
    """

    def __init__(self, path: Path, topics: dict[str, str], warn: Callable[[str, str], None],
                 optional: dict[str, str] | None = None, one_of: tuple[str, ...] = ()) -> None:
        """``topics`` must all be in the bag; ``optional`` ones are read where present; of ``one_of`` (names
        among the optional ones) at least one must be present."""
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import Stores, get_typestore

        if not path.exists():
            raise ProcessError(f"input bag {path} does not exist")
        optional = optional or {}
        self.path, self.topics, self.warn = path, {**topics, **optional}, warn
        self.typestore = get_typestore(Stores.ROS2_KILTED)
        self.reader = None
        self.truncated: list[Path] = []
        try:
            self.reader = AnyReader([path], default_typestore=self.typestore)
            self.reader.open()
        except Exception as exc:  # rosbags raises several types for unreadable metadata or storage
            self.truncated = sorted(path.glob("*.mcap")) if path.is_dir() else []
            if not self.truncated or "magic" not in str(exc).lower():
                raise ProcessError(f"cannot open input bag {path}: {type(exc).__name__}: {exc}") from exc
            try:
                import mcap.stream_reader  # noqa: F401
            except ImportError as missing:
                raise ProcessError(f"input bag {path} has no MCAP footer (recording cut off?); reading it needs "
                                   "the mcap package: pip install mcap") from missing
            self.reader = None
            self.count = None  # no index to count the messages by
            warn("truncated", f"input bag {path} has no MCAP footer (recording cut off?): reading it in file "
                              "order up to where it ends; `mcap recover` can rebuild its index")
            return
        available = {c.topic: c.msgtype for c in self.reader.connections}
        missing = [t for t in topics if t not in available]
        if one_of and not any(t in available for t in one_of):
            missing.append(" or ".join(one_of))
        if missing:
            self.reader.close()
            listed = ", ".join(f"{t} ({m})" for t, m in sorted(available.items())) or "none"
            raise ProcessError(f"input bag {path} lacks topic(s) {', '.join(missing)} the parameters ask for; "
                               f"it has: {listed} (check cameras, image_transport, use_odometry)")
        wrong = [f"{t} is {available[t]}, expected {m}" for t, m in self.topics.items()
                 if t in available and available[t] != m]
        if wrong:
            self.reader.close()
            raise ProcessError(f"input bag {path}: {'; '.join(wrong)}")
        self.connections = [c for c in self.reader.connections if c.topic in self.topics]
        self.count = sum(c.msgcount for c in self.connections)

    def _raw(self) -> Iterator[tuple[str, str, int, bytes]]:
        """(topic, message type, log time, CDR bytes) from the index, or in file order when cut off."""
        if self.reader is not None:
            for conn, stamp, raw in self.reader.messages(connections=self.connections):
                yield conn.topic, conn.msgtype, stamp, raw
            return
        from mcap.records import Channel, Message, Schema
        from mcap.stream_reader import StreamReader

        for file in self.truncated:
            schemas: dict[int, str] = {}
            channels: dict[int, tuple[str, str]] = {}
            with open(file, "rb") as fh:
                for record in StreamReader(fh, skip_magic=False).records:
                    if isinstance(record, Schema):
                        schemas[record.id] = record.name
                    elif isinstance(record, Channel):
                        channels[record.id] = (record.topic, schemas.get(record.schema_id, ""))
                    elif isinstance(record, Message) and channels.get(record.channel_id, ("",))[0] in self.topics:
                        topic, kind = channels[record.channel_id]
                        yield topic, kind, record.log_time, record.data

    def __iter__(self) -> Iterator[tuple[str, int, Any]]:
        """(topic, log time ns, message); damage to the container raises ProcessError."""
        it = self._raw()
        read, last = 0, None
        while True:
            try:
                topic, kind, stamp, raw = next(it)
            except StopIteration:
                return
            except Exception as exc:
                where = f"after {read} messages (last good at {last * 1e-9:.3f} s)" if last else "at its start"
                raise ProcessError(f"the input bag {self.path} is damaged {where}: {type(exc).__name__}: "
                                   f"{exc}") from exc
            read, last = read + 1, stamp
            try:
                msg = self.typestore.deserialize_cdr(raw, kind)
            except Exception as exc:
                self.warn("undecodable", f"a {kind} message on {topic} at {stamp * 1e-9:.3f} s cannot be "
                                         f"decoded and is dropped ({type(exc).__name__}: {exc})")
                continue
            yield topic, stamp, msg

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


class BagOutput:
    """An MCAP rosbag2 of rclpy messages, written as CDR with their header stamps as log time."""

    def __init__(self, path: Path) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.typesys import Stores, get_typestore

        if path.exists():
            raise ProcessError(f"output bag {path} exists already; remove it or choose another name")
        self._typestore = get_typestore(Stores.ROS2_KILTED)
        self._writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
        self._writer.open()
        self._connections: dict[str, Any] = {}
        self.counts: Counter[str] = Counter()

    def write(self, topic: str, msg: Any, stamp_ns: int) -> None:
        from rclpy.serialization import serialize_message

        if topic not in self._connections:
            kind = f"{type(msg).__module__.split('.')[0]}/msg/{type(msg).__name__}"
            self._connections[topic] = self._writer.add_connection(topic, kind, typestore=self._typestore)
        self._writer.write(self._connections[topic], stamp_ns, serialize_message(msg))
        self.counts[topic] += 1

    def close(self) -> None:
        self._writer.close()


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Summary:
    messages: int = 0
    windows: int = 0
    seconds: float = 0.0
    error: str = ""


class OfflineRun:
    """The node's work on a bag, message by message, in the bag's time."""

    def __init__(self, values: dict[str, Any], warn_throttle_s: float = 5.0) -> None:
        #: Warnings by kind: how often each was raised (one log line per kind and throttle period).
        self.warnings: Counter[str] = Counter()
        from mapany_ros.core.backends import make_backend
        from mapany_ros.core.pipeline import Pipeline
        from mapany_ros.ros.inputs import InputHandler
        from mapany_ros.ros.outputs import OutputBuilder
        from mapany_ros.ros.params import validate

        self.config = validate(values)
        pipeline_config = dataclasses.replace(self.config.pipeline, thin_keyframes=False)
        self.now_ns = 0
        self._warned: dict[str, int] = {}
        self._throttle_ns = int(warn_throttle_s * 1e9)
        self.backend = make_backend(self.config["backend"], self.config["device"], **self.config.backend_options)
        self.results: list = []
        self.pipeline = Pipeline(pipeline_config, self.backend, self.results.append, self._on_error,
                                 clock=lambda: self.now_ns, on_reset=self._on_reset)
        self.inputs = InputHandler(self.config, self.pipeline, self.warn)
        self.outputs = OutputBuilder(self.config)
        self.backend_errors: list[str] = []
        cams = self.config.pipeline.cameras
        compressed = self.config["image_transport"] == "compressed"
        self.topics = {f"/{c}/camera_info": "sensor_msgs/msg/CameraInfo" for c in cams}
        for c in cams:
            if compressed:
                self.topics[f"/{c}/image_raw/compressed"] = "sensor_msgs/msg/CompressedImage"
            else:
                self.topics[f"/{c}/image_raw"] = "sensor_msgs/msg/Image"
        # Read where the bag has them, as the node subscribes them: the extrinsics (static or moving); with
        # odometry one of the two must be there to carry them.
        self.optional: dict[str, str] = {"/tf_static": "tf2_msgs/msg/TFMessage", "/tf": "tf2_msgs/msg/TFMessage"}
        self.one_of: tuple[str, ...] = ()
        if self.config["use_odometry"]:
            self.one_of = ("/tf_static", "/tf")
            if self.config["odometry.source"] == "tf":
                self.topics["/tf"] = self.optional.pop("/tf")
            else:
                self.topics["/odom"] = "nav_msgs/msg/Odometry"

    def warn(self, key: str, message: str) -> None:
        self.warnings[key] += 1
        if self.now_ns - self._warned.get(key, -self._throttle_ns - 1) > self._throttle_ns:
            self._warned[key] = self.now_ns
            log.warning("%s", message)

    def _on_reset(self, reason: str) -> None:
        """As the node: a restarted input (bag loop) starts a new map and path."""
        log.warning("input restarted (%s): buffers, map and path reset", reason)
        self.outputs.reset()

    def _on_error(self, exc: Exception) -> None:
        self.backend_errors.append(f"{type(exc).__name__}: {exc}")
        log.warning("window not produced: %s: %s", type(exc).__name__, exc)

    def feed(self, topic: str, stamp_ns: int, msg: Any) -> None:
        self.now_ns = max(self.now_ns, stamp_ns)
        name = topic.lstrip("/")
        cam, _, rest = name.partition("/")
        if rest == "image_raw":
            self.inputs.on_image(cam, msg, self.now_ns)
        elif rest == "image_raw/compressed":
            self.inputs.on_compressed_image(cam, msg, self.now_ns)
        elif rest == "camera_info":
            self.inputs.on_camera_info(cam, msg)
        elif name == "odom":
            self.inputs.on_odometry(msg)
        elif name == "tf_static":
            self.inputs.on_tf_static(msg)
        elif name == "tf":
            self.inputs.on_tf(msg)
        self.inputs.report(self.pipeline.poll())
        self.pipeline.process_ready()

    def finish(self) -> None:
        self.now_ns += int(self.config["odometry.max_wait_s"] * 1e9) + 1
        self.inputs.report(self.pipeline.poll())
        self.pipeline.flush()
        self.pipeline.process_ready()

    def drain(self, out: BagOutput) -> int:
        """Write the outputs of the windows finished so far; returns how many windows."""
        done = list(self.results)
        self.results.clear()  # the pipeline appends to this very list
        for result in done:
            newest = max(f.stamp_ns for f, o in zip(result.frames, result.output_mask, strict=True) if o) \
                if any(result.output_mask) else None
            for topic, msg in self.outputs.window(result):
                out.write(topic if topic.startswith("/") else f"/{topic}", msg, _stamp_of(msg, newest))
            if result.T_map_odom is not None and newest is not None:
                out.write("/tf", self.outputs.map_odom(result.T_map_odom, newest), newest)
        return len(done)


    def write_map(self, out: BagOutput) -> None:
        """The fused map and the occupancy grid once, at the end, stamped with the newest keyframe (as the
        node's latched topics)."""
        from std_msgs.msg import Header

        from mapany_ros.ros.conversions import map_cloud, ns_to_stamp, occupancy_grid

        if not self.outputs.has_path:
            return
        stamp = int(max(self.outputs.path_stamps()))
        header = Header(stamp=ns_to_stamp(stamp), frame_id=self.config["map_frame"])
        if self.pipeline.map is not None:
            xyz, rgb, confidence = self.pipeline.map.points()
            out.write("/map_points", map_cloud(xyz, rgb, confidence, header), stamp)
        if self.pipeline.grid is not None:
            out.write("/map_grid", occupancy_grid(self.pipeline.grid.snapshot(), header), stamp)


def _stamp_of(msg: Any, fallback: int | None) -> int:
    from mapany_ros.ros.conversions import stamp_to_ns

    header = getattr(msg, "header", None)
    if header is not None:
        return stamp_to_ns(header.stamp)
    return stamp_to_ns(msg.transforms[0].header.stamp) if getattr(msg, "transforms", None) else int(fallback or 0)


def process(in_bag: Path, out_bag: Path, values: dict[str, Any], *, progress: bool = True) -> tuple[OfflineRun,
                                                                                                    Summary]:
    """Run the node's work over ``in_bag`` into ``out_bag``; partial output is written on a damaged input."""
    from tqdm import tqdm

    if not in_bag.exists():  # checked before the backend loads (a model can take a while)
        raise ProcessError(f"input bag {in_bag} does not exist")
    if out_bag.exists():
        raise ProcessError(f"output bag {out_bag} exists already; remove it or choose another name")
    run = OfflineRun(values)
    bag = BagInput(in_bag, run.topics, run.warn, run.optional, run.one_of)
    try:
        out = BagOutput(out_bag)
    except Exception:
        bag.close()
        raise
    summary = Summary()
    t0 = time.perf_counter()
    bar = tqdm(total=bag.count, unit="msg", disable=not progress, dynamic_ncols=True, desc="mapany-ros process")
    try:
        for topic, stamp, msg in bag:
            run.feed(topic, stamp, msg)
            summary.windows += run.drain(out)
            summary.messages += 1
            bar.update(1)
            if run.pipeline.stats.windows_done and summary.messages % 50 == 0:
                bar.set_postfix(windows=run.pipeline.stats.windows_done, keyframes=run.pipeline.stats.keyframes)
    except ProcessError as exc:
        summary.error = str(exc)
    finally:
        bar.close()
        run.finish()
        summary.windows += run.drain(out)
        run.write_map(out)
        out.close()
        bag.close()
        summary.seconds = time.perf_counter() - t0
    run.out_counts = out.counts  # type: ignore[attr-defined]
    return run, summary


def write_tum(path: Path, path_msg: Any) -> None:
    """The final trajectory as TUM text: ``stamp tx ty tz qx qy qz qw`` per line."""
    from mapany_ros.ros.conversions import stamp_to_ns

    lines = []
    for p in path_msg.poses:
        q, t = p.pose.orientation, p.pose.position
        lines.append(f"{stamp_to_ns(p.header.stamp) * 1e-9:.9f} {t.x:.6f} {t.y:.6f} {t.z:.6f} "
                     f"{q.x:.9f} {q.y:.9f} {q.z:.9f} {q.w:.9f}")
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="mapany-ros process", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("in_bag", type=Path, help="rosbag2 directory (MCAP or sqlite3) with the node's input topics")
    ap.add_argument("out_bag", type=Path, help="MCAP rosbag2 directory to write (must not exist)")
    ap.add_argument("--params", type=Path, default=None, help="node parameters file (ros__parameters)")
    ap.add_argument("-p", dest="overrides", action="append", default=[], metavar="NAME:=VALUE",
                    help="override one parameter (repeatable)")
    ap.add_argument("--ply", type=Path, default=None, help="also write the map points to this PLY file")
    ap.add_argument("--tum", type=Path, default=None, help="also write the trajectory in TUM format")
    ap.add_argument("--grid", type=Path, default=None, metavar="FILE.yaml",
                    help="also write the occupancy grid as a Nav2 map_server pair: FILE.yaml and FILE.pgm beside it")
    ap.add_argument("--rerun", type=Path, default=None, help="also write a rerun recording (.rrd)")
    ap.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                    help="torch CPU threads (default: torch's choice, one per core); on a machine busy with "
                         "other work, fewer threads than cores avoid OpenMP workers waiting on each other")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[process] %(message)s")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        values, warnings = load_parameters(args.params, args.overrides)
        for w in warnings:
            log.warning("%s", w)
        from mapany_ros.core.backends import BackendError
        from mapany_ros.ros.params import ParameterError

        try:
            run, summary = process(args.in_bag, args.out_bag, values, progress=not args.quiet)
        except (ParameterError, BackendError) as exc:
            raise ProcessError(str(exc)) from exc
    except ProcessError as exc:
        log.error("%s", exc)
        return 2
    s = run.pipeline.stats
    if run.warnings:
        print("[process] dropped input: " + ", ".join(f"{k} x{n}" for k, n in sorted(run.warnings.items())))
    print(f"[process] {summary.messages} messages in {summary.seconds:.1f} s "
          f"({summary.messages / max(summary.seconds, 1e-9):.1f} msg/s): {s.frames_in} images, {s.keyframes} "
          f"keyframes, {s.windows_done} windows ({s.windows_failed} failed, {s.windows_rejected} rejected), "
          f"{s.views_rejected} views rejected, {s.chain_breaks} chain breaks, {s.resets} resets")
    print(f"[process] wrote {args.out_bag}: " + ", ".join(f"{t} {n}" for t, n in sorted(run.out_counts.items())))
    path_msg = run.outputs.path() if run.outputs.has_path else None
    if args.tum and path_msg is not None:
        write_tum(args.tum, path_msg)
        print(f"[process] wrote {args.tum} ({len(path_msg.poses)} poses)")
    if args.ply:
        if run.pipeline.map is None:
            log.error("--ply needs the fused map: map.enabled is false")
            return 2
        n = run.pipeline.map.save_ply(args.ply)
        print(f"[process] wrote {args.ply} ({n} points of the fused map)")
    if args.grid:
        if run.pipeline.grid is None:
            log.error("--grid needs the occupancy grid: grid.enabled is false")
            return 2
        from mapany_ros.core.occupancy import write_nav2_map

        grid = run.pipeline.grid.snapshot()
        yaml_path, pgm_path = write_nav2_map(args.grid, grid)
        print(f"[process] wrote {yaml_path} and {pgm_path} (occupancy grid, {grid.width} x {grid.height} cells of "
              f"{grid.resolution:g} m)")
    if args.rerun:
        from mapany_ros.commands.rerun_export import export_rerun

        export_rerun(args.out_bag, args.rerun)
        print(f"[process] wrote {args.rerun}")
    if summary.error:
        log.error("%s; the output holds everything processed before", summary.error)
        return 1
    if summary.windows == 0:
        log.error("no output was produced from %d messages: see the warnings above", summary.messages)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
