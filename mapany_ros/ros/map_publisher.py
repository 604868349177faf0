"""Large map layers published off the executor: built by one thread, published by a helper process.

At its 2 M voxel budget the fused map is a 40 MB PointCloud2; an occupancy grid of a large area is
of the same order. Packing one is torch and numpy work that releases the GIL, but rclpy converts and
serialises a message with the GIL held: publishing 40 MB held it for 60-160 ms on a loaded 2-core
machine, and from any thread of the node that stalls every image and odometry callback as long
(``make bench``: *Executor latency*). So the work is split:

* :class:`MapPublisher` owns one thread in the node. At most every ``period_s`` it asks each layer
  for its ``version`` and builds the layers whose version changed since they were last published,
  writing their bulk bytes into memory shared with the helper process.
* The helper process (``python -m mapany_ros.ros.map_publisher``, a plain rclpy node named
  ``<node>_map_publisher`` in the node's namespace) owns the layers' publishers: it puts the shared
  bytes into the message and publishes it, holding a GIL of its own.

The thread runs at a lower priority (``nice``, +10 by default; the helper process and torch's
workers it starts inherit it): the map may come late, an image callback should not.

A layer is registered before :meth:`MapPublisher.start` with
``add_layer(topic, msg_type, qos, version, build)``:

``topic``
    the absolute topic name (``node.resolve_topic_name("map_points")``, so remappings hold);
``msg_type``
    a message type whose bulk payload is its ``data`` array (``sensor_msgs/PointCloud2``,
    ``nav_msgs/OccupancyGrid``);
``qos``
    the publisher's profile (transient local, so a late RViz gets the latest map);
``version() -> Hashable``
    cheap; the layer is published again when it differs from the version last published;
``build(buffer) -> msg``
    called on the publisher's thread: returns the message with every field but ``data`` set, and
    writes the ``data`` bytes into ``buffer(nbytes)``, a writable uint8 numpy array of that size.

:meth:`pause` returns once nothing more will be published until :meth:`resume` (a lifecycle
node's deactivate); :meth:`close` ends the thread and the helper. Locks: the publisher's one
condition guards its flags; ``version`` and ``build`` are called without it held.
"""

from __future__ import annotations

import argparse
import array
import importlib
import mmap
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

#: How long a reply from the helper may take (start-up imports rclpy; a publish copies 40 MB).
REPLY_TIMEOUT_S = 60.0


@dataclass
class MapLayer:
    topic: str
    msg_type: type
    qos: Any
    version: Callable[[], Hashable]
    build: Callable[[Callable[[int], np.ndarray]], Any]
    published: Hashable = None
    #: False until the first publish: a layer whose version is None at first is still published.
    ever_published: bool = False


class SharedBuffer:
    """Memory both processes map: an anonymous memfd where Linux has one, else an unlinked temp file."""

    def __init__(self) -> None:
        if hasattr(os, "memfd_create"):
            self.fd = os.memfd_create("mapany_map_layers", 0)
        else:  # pragma: no cover - other systems
            fd, path = tempfile.mkstemp(prefix="mapany_map_layers_")
            os.unlink(path)
            self.fd = fd
        self.size = 0
        self._map: mmap.mmap | None = None
        self._remap(1 << 20)  # never empty: the helper maps it whatever the first layer's size

    def view(self, nbytes: int) -> np.ndarray:
        """A writable uint8 array of ``nbytes`` at the start of the buffer, grown as needed."""
        if nbytes > self.size:
            self._remap(max(nbytes, int(self.size * 1.5)))
        assert self._map is not None
        return np.frombuffer(self._map, np.uint8, nbytes)

    def _remap(self, size: int) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a view of it still lives (a traceback): the mapping goes when that does
        os.ftruncate(self.fd, size)
        self._map = mmap.mmap(self.fd, size)
        self.size = size

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass
            self._map = None
        os.close(self.fd)


class MapPublisher:
    """One thread that builds changed map layers, one helper process that publishes them (see the module)."""

    def __init__(self, node_name: str, namespace: str, period_s: float,
                 warn: Callable[[str], None] = lambda message: None, nice: int = 10) -> None:
        self.node_name, self.namespace, self.period_s = node_name, namespace, period_s
        #: How much lower than the node's callbacks the thread (and so the helper it starts, and the
        #: torch workers it starts) is scheduled: the map may come late, an image callback may not.
        self.nice = nice
        self._warn = warn
        self.layers: list[MapLayer] = []
        self._cv = threading.Condition()
        self._stop = False
        self._paused = False
        self._busy = False  # a layer is being built or published
        self._thread: threading.Thread | None = None
        self._buffer: SharedBuffer | None = None
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        #: Seconds of each layer's last build and publish, for diagnostics and the benchmark.
        self.last_build_s: dict[str, float] = {}
        self.last_publish_s: dict[str, float] = {}
        self.published: dict[str, int] = {}

    def add_layer(self, topic: str, msg_type: type, qos: Any, version: Callable[[], Hashable],
                  build: Callable[[Callable[[int], np.ndarray]], Any]) -> None:
        if self._thread is not None:
            raise RuntimeError("add every layer before start()")
        if not topic.startswith("/"):
            raise ValueError(f"layer topic {topic!r} must be absolute (node.resolve_topic_name)")
        self.layers.append(MapLayer(topic, msg_type, qos, version, build))

    # ----------------------------------------------------------------- control (any thread)

    def start(self) -> None:
        """Start the thread; the helper process is started by it, so this never waits."""
        with self._cv:
            if self._thread is not None:
                return
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="mapany-map-publisher", daemon=True)
        self._thread.start()

    def pause(self, timeout: float = REPLY_TIMEOUT_S) -> bool:
        """Publish nothing more until :meth:`resume`; returns once a publish under way has finished."""
        with self._cv:
            self._paused = True
            return self._cv.wait_for(lambda: not self._busy, timeout)

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """End the thread and the helper process; the shared memory is freed."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        self._end_helper()
        if self._buffer is not None and (thread is None or not thread.is_alive()):
            self._buffer.close()
            self._buffer = None

    # ----------------------------------------------------------------- the thread

    def _run(self) -> None:
        _lower_priority(self.nice)
        next_round = time.monotonic()
        while True:
            with self._cv:
                while not self._stop and (self._paused or time.monotonic() < next_round):
                    self._cv.wait(None if self._paused else next_round - time.monotonic())
                if self._stop:
                    return
            next_round = time.monotonic() + self.period_s
            for layer in self.layers:
                try:
                    self._publish_if_changed(layer)
                except _HelperError as exc:  # the helper is restarted for the next round
                    self._warn(f"{layer.topic} not published: {exc}")
                    self._end_helper()
                except Exception as exc:  # a layer that failed to build waits for the next round
                    self._warn(f"{layer.topic} not published: {type(exc).__name__}: {exc}")

    def _publish_if_changed(self, layer: MapLayer) -> None:
        version = layer.version()
        if layer.ever_published and version == layer.published:
            return
        with self._cv:
            if self._paused or self._stop:
                return
            self._busy = True
        try:
            self._ensure_helper()
            assert self._buffer is not None
            buffer, sizes = self._buffer, []

            def view(n: int) -> np.ndarray:
                sizes.append(n)
                return buffer.view(n)

            t0 = time.perf_counter()
            msg = layer.build(view)
            if len(msg.data) or len(sizes) != 1:
                raise ValueError("build() must leave msg.data empty and call buffer(nbytes) once")
            from rclpy.serialization import serialize_message

            meta = serialize_message(msg)  # every field but the bulk data: small
            t1 = time.perf_counter()
            with self._cv:
                if self._paused or self._stop:
                    return  # deactivated while it was built: nothing goes out
            self._request(("publish", self.layers.index(layer), meta, sizes[0], buffer.size), "published")
            layer.published, layer.ever_published = version, True
            self.last_build_s[layer.topic] = t1 - t0
            self.last_publish_s[layer.topic] = time.perf_counter() - t1
            self.published[layer.topic] = self.published.get(layer.topic, 0) + 1
        finally:
            with self._cv:
                self._busy = False
                self._cv.notify_all()

    def _request(self, job: tuple, expect: str) -> None:
        """Send a job to the helper and wait for its answer; _HelperError when it fails or is gone."""
        try:
            assert self._conn is not None
            self._conn.send(job)
            if not self._conn.poll(REPLY_TIMEOUT_S):
                raise _HelperError(f"the map publisher process did not answer in {REPLY_TIMEOUT_S:.0f} s")
            reply = self._conn.recv()
        except (OSError, EOFError) as exc:
            raise _HelperError(f"the map publisher process is gone ({type(exc).__name__}: {exc})") from exc
        if reply[0] != expect:
            raise _HelperError(f"the map publisher process: {reply[1]}")

    def _ensure_helper(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._end_helper()
        if self._buffer is None:
            self._buffer = SharedBuffer()
        ours, theirs = socket.socketpair()
        cmd = [sys.executable, "-m", "mapany_ros.ros.map_publisher", "--conn-fd", str(theirs.fileno()),
               "--buffer-fd", str(self._buffer.fd), "--node-name", f"{self.node_name}_map_publisher",
               "--namespace", self.namespace or "/"]
        self._proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(), self._buffer.fd), stdin=subprocess.DEVNULL,
                                      env=_helper_env())
        theirs.close()
        self._conn = Connection(ours.detach())
        for layer in self.layers:  # a new helper has no history: a late subscriber needs each layer again
            layer.ever_published = False
        self._request(("layers", [(layer.topic, layer.msg_type.__module__, layer.msg_type.__name__,
                                   _qos_tuple(layer.qos)) for layer in self.layers]), "ready")

    def _end_helper(self) -> None:
        conn, proc = self._conn, self._proc
        self._conn = self._proc = None
        if conn is not None:
            try:
                conn.send(("stop",))
            except OSError:
                pass
            conn.close()
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _lower_priority(nice: int) -> None:
    """Raise this thread's nice value by ``nice`` (Linux schedules threads one by one; threads and
    processes it starts inherit it). Elsewhere, or without permission, nothing changes."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError):
        pass


def _helper_env() -> dict[str, str]:
    """The node's environment (DDS settings, domain), with this very mapany_ros first on the path."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


class _HelperError(Exception):
    """The helper process failed, hung or is gone: it is started again."""


def _qos_tuple(qos: Any) -> tuple[int, int, int, int]:
    return (int(qos.history), int(qos.depth), int(qos.reliability), int(qos.durability))


# --------------------------------------------------------------------- the helper process


def serve(conn: Connection, buffer_fd: int, node_name: str, namespace: str) -> None:
    """The helper: one publisher per layer; each job's bytes come from the shared buffer."""
    import rclpy
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from rclpy.serialization import deserialize_message
    from rclpy.signals import SignalHandlerOptions

    rclpy.init(args=[], signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node(node_name, namespace=namespace, start_parameter_services=False)
    publishers, types = [], []
    shared: mmap.mmap | None = None
    try:
        while True:
            job = conn.recv()
            if job[0] == "layers":
                for topic, module, name, (history, depth, reliability, durability) in job[1]:
                    msg_type = getattr(importlib.import_module(module), name)
                    qos = QoSProfile(history=HistoryPolicy(history), depth=depth,
                                     reliability=ReliabilityPolicy(reliability),
                                     durability=DurabilityPolicy(durability))
                    types.append(msg_type)
                    publishers.append(node.create_publisher(msg_type, topic, qos))
                conn.send(("ready",))
            elif job[0] == "publish":
                _, index, meta, nbytes, size = job
                try:
                    if shared is None or len(shared) < size:
                        if shared is not None:
                            shared.close()
                        shared = mmap.mmap(buffer_fd, size, prot=mmap.PROT_READ)
                    msg = deserialize_message(meta, types[index])
                    data = array.array(msg.data.typecode)
                    with memoryview(shared) as whole:
                        data.frombytes(whole[:nbytes])
                    msg.data = data
                    publishers[index].publish(msg)
                    conn.send(("published", index))
                except Exception as exc:  # the node logs it and tries again next round
                    conn.send(("failed", f"{type(exc).__name__}: {exc}"))
            else:
                return
    except (EOFError, OSError):
        return  # the node is gone
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description="mapany_node's map layer publisher (started by the node)")
    ap.add_argument("--conn-fd", type=int, required=True)
    ap.add_argument("--buffer-fd", type=int, required=True)
    ap.add_argument("--node-name", required=True)
    ap.add_argument("--namespace", default="/")
    args = ap.parse_args()
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the node, which ends this process
    serve(Connection(args.conn_fd), args.buffer_fd, args.node_name, args.namespace)


if __name__ == "__main__":
    main()
