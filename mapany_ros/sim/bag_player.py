"""Play a rosbag2 into ROS 2 topics with a simulated clock, as ``ros2 bag play --clock`` does.

``ros2 bag`` (rosbag2_py) is not installable from PyPI, yet replaying a recording into a node that
runs on ``use_sim_time`` is how a robot's bag is normally reprocessed. :class:`BagPlayer` reads
the bag with ``rosbags`` and publishes every message's CDR bytes unchanged (no deserialisation,
so any message type whose Python package is installed can be played), paced by log time at a
``rate`` factor, with ``/clock`` ticking in bag time and published just before each message.
Pausing stops the clock; after the last message the clock keeps running for ``tail_s`` of bag
time, as a live system's clock would, so time-driven work in the receiver (a partial window
flushed after its latency limit, say) still happens.

    python -m mapany_ros.sim.bag_player robot_bag/ --rate 2.0     # DDS kept on this machine
"""

from __future__ import annotations

import argparse
import importlib
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

CLOCK_TOPIC = "/clock"
#: Topics that are latched by convention even when the bag does not record the publisher's QoS.
LATCHED_TOPICS = ("/tf_static",)


def message_class(type_name: str) -> type:
    """The rclpy message class of ``pkg/msg/Name`` (rosbags' type names); ValueError names the fix."""
    pkg, kind, name = (type_name.split("/") + ["", ""])[:3]
    if kind != "msg" or not pkg or not name:
        raise ValueError(f"{type_name!r} is not a message type name of the form package/msg/Name")
    try:
        return getattr(importlib.import_module(f"{pkg}.msg"), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import the message type {type_name}: install its package ({pkg}) "
                         "or leave the topic out with topics=") from exc


def _latched(topic: str, offered_qos: Iterable[Any]) -> bool:
    """Transient local when the recorder saw it offered so, and always for /tf_static."""
    return topic in LATCHED_TOPICS or any(
        getattr(getattr(q, "durability", None), "name", "") == "TRANSIENT_LOCAL" for q in offered_qos)


@dataclass
class PlayStats:
    """What one :meth:`BagPlayer.play` did, for logs and for checking the pacing."""

    messages: int = 0
    clock_ticks: int = 0
    #: Bag time of the first and last published clock value.
    start_ns: int = 0
    end_ns: int = 0
    wall_s: float = 0.0
    paused_s: float = 0.0


class BagPlayer(Node):
    """Publishes a rosbag2's messages on their topics in log-time order, with ``/clock``.

    The publishing runs in the thread that calls :meth:`play` (the node needs no executor);
    :meth:`pause` / :meth:`resume` may be called from any thread. Topics are reliable with a deep
    queue, so a slow subscriber loses nothing at high rates; latched ones (``/tf_static``, or any
    recorded as transient local) keep their messages for late subscribers.
    """

    def __init__(self, bag: Path | str, *, topics: Iterable[str] | None = None, clock_hz: float = 100.0,
                 queue_depth: int = 1000, node_name: str = "mapany_bag_player", **node_kwargs: Any) -> None:
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import Stores, get_typestore
        from rosgraph_msgs.msg import Clock

        if clock_hz <= 0:
            raise ValueError(f"clock_hz must be > 0, got {clock_hz}")
        super().__init__(node_name, **node_kwargs)
        self.bag = Path(bag)
        self._reader = AnyReader([self.bag], default_typestore=get_typestore(Stores.ROS2_KILTED))
        self._reader.open()
        wanted = set(topics) if topics is not None else None
        self._connections = [c for c in self._reader.connections if wanted is None or c.topic in wanted]
        if wanted is not None and (missing := wanted - {c.topic for c in self._connections}):
            self._reader.close()
            raise ValueError(f"bag {self.bag} has no topic(s) {', '.join(sorted(missing))}")
        self.start_ns: int = self._reader.start_time
        self.end_ns: int = self._reader.end_time
        self._clock_cls = Clock
        self._period_ns = max(1, int(round(1e9 / clock_hz)))
        self.publishers_by_topic: dict[str, Any] = {}
        try:
            classes = {c.topic: message_class(c.msgtype) for c in self._connections}
        except ValueError:
            self._reader.close()
            raise
        for conn in self._connections:
            if conn.topic in self.publishers_by_topic:
                continue
            latched = _latched(conn.topic, getattr(conn.ext, "offered_qos_profiles", ()) or ())
            qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=queue_depth,
                             reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)
            self.publishers_by_topic[conn.topic] = self.create_publisher(classes[conn.topic], conn.topic, qos)
        # Receivers subscribe /clock best effort with depth 1: only the newest time matters.
        self.clock_pub = self.create_publisher(
            Clock, CLOCK_TOPIC, QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                                           reliability=ReliabilityPolicy.RELIABLE))
        self._cv = threading.Condition()
        self._paused = False
        self._rate = 1.0
        # Pacing: bag time b is due at wall time wall_anchor + (b - bag_anchor) / rate.
        self._wall_anchor = 0.0
        self._bag_anchor = self.start_ns
        self._frozen_ns = self.start_ns
        self._paused_s = 0.0
        self._pause_started = 0.0
        self._next_tick = self.start_ns
        self.clock_ns: int | None = None  # the last /clock value published

    # ------------------------------------------------------------------ control
    def pause(self) -> None:
        """Stop the clock and the messages where they are (no-op when paused; before :meth:`play`: start paused)."""
        with self._cv:
            if not self._paused:
                self._frozen_ns = self._position_locked()
                self._paused = True
                self._pause_started = time.monotonic()

    def resume(self) -> None:
        """Go on from the bag time where :meth:`pause` stopped (no-op when playing)."""
        with self._cv:
            if self._paused:
                self._paused_s += time.monotonic() - self._pause_started
                self._bag_anchor, self._wall_anchor = self._frozen_ns, time.monotonic()
                self._paused = False
                self._cv.notify_all()

    def wait_for_subscribers(self, topics: Iterable[str] | None = None, timeout_s: float = 30.0) -> bool:
        """True once every topic in ``topics`` (default: the bag's and /clock) has a subscriber."""
        names = list(topics) if topics is not None else [*self.publishers_by_topic, CLOCK_TOPIC]
        pubs = {**self.publishers_by_topic, CLOCK_TOPIC: self.clock_pub}
        unknown = [t for t in names if t not in pubs]
        if unknown:
            raise ValueError(f"not played: {', '.join(unknown)}")
        deadline = time.monotonic() + timeout_s
        while any(pubs[t].get_subscription_count() == 0 for t in names):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    # ------------------------------------------------------------------ playing
    def play(self, rate: float = 1.0, pause_at_s: float | None = None, pause_for_s: float = 0.0,
             tail_s: float = 0.0) -> PlayStats:
        """Publish the whole bag paced by log time at ``rate`` x real time; blocks until done.

        ``pause_at_s`` (bag seconds from the bag's start): pause there for ``pause_for_s`` wall
        seconds. After the last message the clock runs on for ``tail_s`` bag seconds.
        """
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        stats = PlayStats(start_ns=self.start_ns)
        with self._cv:
            self._rate = rate
            self._paused_s = 0.0
            self._bag_anchor, self._wall_anchor = self.start_ns, time.monotonic()
            if self._paused:  # paused before playing: start paused at the bag's start
                self._frozen_ns, self._pause_started = self.start_ns, time.monotonic()
        self._next_tick = self.start_ns
        self.clock_ns = None  # each play starts the clock afresh at the bag's start
        pause_ns = None if pause_at_s is None else self.start_ns + int(round(pause_at_s * 1e9))
        t0 = time.perf_counter()
        last_ns = self.start_ns
        for topic, log_ns, raw in self._messages():
            if pause_ns is not None and pause_ns <= log_ns:
                stats.clock_ticks += self._advance_to(pause_ns)
                self._pause_for(pause_for_s)
                pause_ns = None
            stats.clock_ticks += self._advance_to(log_ns)
            self.publishers_by_topic[topic].publish(raw)
            stats.messages += 1
            last_ns = log_ns
        if pause_ns is not None:  # a pause point after the last message still pauses
            stats.clock_ticks += self._advance_to(pause_ns)
            self._pause_for(pause_for_s)
        stats.clock_ticks += self._advance_to(max(last_ns, self.clock_ns or last_ns) + int(round(tail_s * 1e9)))
        stats.end_ns = self.clock_ns or self.start_ns
        stats.wall_s = time.perf_counter() - t0
        stats.paused_s = self._paused_s
        return stats

    def run_clock(self, until: Callable[[], bool], timeout_s: float = 60.0, rate: float | None = None) -> bool:
        """Keep the clock running past the bag (at ``rate``, default the last play's) until ``until()``.

        For a receiver whose remaining work or reports are driven by its (simulated) clock; returns
        False when ``timeout_s`` wall seconds pass first.
        """
        with self._cv:
            if rate is not None:
                if rate <= 0:
                    raise ValueError(f"rate must be > 0, got {rate}")
                self._rate = rate
            start = self.clock_ns if self.clock_ns is not None else self.start_ns
            self._bag_anchor, self._wall_anchor = start, time.monotonic()
        self._next_tick = max(self._next_tick, start + 1)
        deadline = time.monotonic() + timeout_s
        while not until():
            if time.monotonic() > deadline:
                return False
            self._advance_to(self._next_tick)
        return True

    def close(self) -> None:
        """Close the bag (the node itself is destroyed with ``destroy_node``)."""
        self._reader.close()

    # ------------------------------------------------------------------ internals
    def _messages(self) -> Iterator[tuple[str, int, bytes]]:
        for conn, log_ns, raw in self._reader.messages(connections=self._connections):
            yield conn.topic, log_ns, bytes(raw)

    def _position_locked(self) -> int:
        """Where playback is in bag time now (frozen while paused)."""
        if self._paused:
            return self._frozen_ns
        return self._bag_anchor + int((time.monotonic() - self._wall_anchor) * self._rate * 1e9)

    def _sleep_until(self, bag_ns: int) -> None:
        """Wait until bag time ``bag_ns`` is due, staying put for as long as playback is paused."""
        with self._cv:
            while True:
                if self._paused:
                    self._cv.wait(0.1)
                    continue
                left = (bag_ns - self._bag_anchor) / (self._rate * 1e9) - (time.monotonic() - self._wall_anchor)
                if left <= 0:
                    return
                self._cv.wait(min(left, 0.05))  # short steps: a pause() must stop the clock promptly

    def _publish_clock(self, bag_ns: int) -> None:
        from builtin_interfaces.msg import Time

        if self.clock_ns is not None and bag_ns < self.clock_ns:
            return  # time never runs backwards
        self.clock_ns = bag_ns
        self.clock_pub.publish(self._clock_cls(clock=Time(sec=bag_ns // 10**9, nanosec=bag_ns % 10**9)))

    def _advance_to(self, bag_ns: int) -> int:
        """Tick /clock up to ``bag_ns``, paced, then publish ``bag_ns`` itself; returns the clock messages sent."""
        sent = 0
        while self._next_tick < bag_ns:
            self._sleep_until(self._next_tick)
            self._publish_clock(self._next_tick)
            self._next_tick += self._period_ns
            sent += 1
        self._sleep_until(bag_ns)
        self._publish_clock(bag_ns)
        while self._next_tick <= bag_ns:  # the next tick lies ahead of the time just published
            self._next_tick += self._period_ns
        return sent + 1

    def _pause_for(self, seconds: float) -> None:
        self.pause()
        time.sleep(max(0.0, seconds))
        self.resume()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m mapany_ros.sim.bag_player", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bag", type=Path, help="rosbag2 directory (MCAP or sqlite3)")
    ap.add_argument("--rate", type=float, default=1.0, help="playback speed (1 = real time)")
    ap.add_argument("--topics", nargs="*", default=None, help="play only these topics (default: all)")
    ap.add_argument("--clock-hz", type=float, default=100.0, help="/clock ticks per second of bag time")
    ap.add_argument("--tail", type=float, default=0.0, help="bag seconds the clock runs on after the last message")
    ap.add_argument("--wait", type=float, default=2.0, help="seconds to wait for subscribers before playing")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mapany_ros.ros.dds import apply_localhost_dds

    apply_localhost_dds()  # before rclpy.init(): DDS stays on this machine
    import rclpy

    rclpy.init()
    player = BagPlayer(args.bag, topics=args.topics, clock_hz=args.clock_hz)
    try:
        player.wait_for_subscribers(timeout_s=args.wait)
        stats = player.play(args.rate, tail_s=args.tail)
        print(f"[bag_player] {stats.messages} messages, {(stats.end_ns - stats.start_ns) * 1e-9:.2f} s of bag time "
              f"in {stats.wall_s:.2f} s")
    except KeyboardInterrupt:
        pass
    finally:
        player.close()
        player.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
