"""A minute of ~/reset calls and looped input while windows are published: nothing may lock up.

A reset (a ~/reset call, or a stamp jumping back as a looped bag's does) and a finished window are
announced from different threads; if either were announced under a lock the other side needs, both
threads would wait forever and the node would publish nothing again, TF included.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from core_fakes import RecordingBackend

pytestmark = pytest.mark.ros

#: 20 s in the suite; MAPANY_STORM_S=60 for the minute-long storm.
STORM_S = float(os.environ.get("MAPANY_STORM_S", "20"))
RESET_PERIOD_S = 0.05
#: Looped input: stamps run over LOOP frames 0.1 s apart, then jump back 2 s (> time.reset_jump_s).
LOOP = 20


def first_answer(h, client) -> None:
    """A service answers a client only once its reply writer has matched the client's reader, which
    may come after wait_for_service: repeat a first call until it is answered."""
    from std_srvs.srv import Trigger

    assert client.wait_for_service(timeout_sec=10)
    for _ in range(12):
        if h._wait(client.call_async(Trigger.Request()).done, 5):
            return
    raise AssertionError(f"{client.srv_name} never answered")


def test_reset_storm_with_looped_input_never_blocks_a_thread_or_tf(harness_factory):
    from std_srvs.srv import Trigger
    from tf2_msgs.msg import TFMessage

    from mapany_ros.scoring.collector import QOS

    # Windows of two keyframes (every frame one) without pose refinement: windows are built, placed
    # and dropped as stale all through the storm, racing the resets and the input's restarts.
    h = harness_factory(RecordingBackend(), **{"window.size": 2, "placement.refine_poses": False,
                                               "keyframe.max_interval_s": 0.09})
    node = h.node
    assert node.get_parameter("time.reset_jump_s").value < (LOOP * 0.1)
    tf_arrivals: list[float] = []

    def on_tf(msg: TFMessage) -> None:
        if any((t.header.frame_id, t.child_frame_id) == ("map", "odom") for t in msg.transforms):
            tf_arrivals.append(time.monotonic())

    h.driver.create_subscription(TFMessage, "/tf", on_tf, QOS)
    reset = h.driver.create_client(Trigger, "/mapany_node/reset")
    first_answer(h, reset)
    h.info()
    h.static_tf()
    assert h._wait(lambda: len(tf_arrivals) > 5, 10), "no map -> odom before the storm"

    # Every lock a thread of the node takes must stay free to take: a watchdog tries each one.
    locks = {"output": node._out_lock, "pipeline": node.pipeline._lock, "warnings": node._warn_lock}
    blocked: list[str] = []
    stop = threading.Event()

    def watchdog() -> None:
        while not stop.is_set():
            for name, lock in locks.items():
                if not lock.acquire(timeout=5.0):
                    blocked.append(name)
                    continue
                lock.release()
            stop.wait(0.2)

    dog = threading.Thread(target=watchdog, daemon=True)
    dog.start()
    calls = []
    depth_before = h.collector.out.depth_count
    start = time.monotonic()
    next_reset = start
    i = 0
    try:
        while time.monotonic() - start < STORM_S and not blocked:
            t = 1.0 + (i % LOOP) * 0.1
            h.odom(t)
            h.odom(t + 0.05)
            h.image(t)
            i += 1
            now = time.monotonic()
            if now >= next_reset:
                calls.append(reset.call_async(Trigger.Request()))
                next_reset += RESET_PERIOD_S
            time.sleep(0.01)
        storm_end = time.monotonic()
        # Every call is answered, and the node still publishes map -> odom after the storm.
        assert h._wait(lambda: all(c.done() for c in calls), 30), \
            f"{sum(not c.done() for c in calls)} of {len(calls)} ~/reset calls unanswered"
        assert h._wait(lambda: tf_arrivals and tf_arrivals[-1] > storm_end, 5), "map -> odom stopped"
        # The calm after the storm: the same input without resets is mapped again.
        during_storm = h.collector.out.depth_count - depth_before
        calm_start = time.monotonic()
        while h.collector.out.depth_count - depth_before == during_storm and time.monotonic() - calm_start < 30:
            t = 1.0 + (i % LOOP) * 0.1
            h.odom(t)
            h.odom(t + 0.05)
            h.image(t)
            i += 1
            time.sleep(0.02)
    finally:
        stop.set()
        dog.join(30)
    assert not blocked, f"locks held for more than 5 s: {blocked}"
    assert node.pipeline._worker.is_alive()
    assert all(c.result().success for c in calls)
    assert len(calls) >= 0.5 * STORM_S / RESET_PERIOD_S, f"only {len(calls)} ~/reset calls were made"
    loops = i // LOOP
    assert node.pipeline.stats.resets >= len(calls)
    windows = h.collector.out.depth_count - depth_before - during_storm
    assert windows > 0, "no window was published after the storm"
    during = [t for t in tf_arrivals if start <= t <= storm_end]
    gaps = [b - a for a, b in zip([start, *during], [*during, storm_end], strict=True)]
    print(f"{len(calls)} resets, {loops} input loops, {during_storm} depth images published during the storm, "
          f"map -> odom: {len(during)} in {storm_end - start:.0f} s, largest gap {max(gaps):.2f} s")
    assert max(gaps) < 1.0, f"map -> odom paused for {max(gaps):.2f} s"


def test_reset_and_save_map_wait_for_the_voxel_map_off_the_executor(harness_factory, tmp_path):
    """The voxel map's lock is held while a large map is packed (a second or more at 2 M voxels):
    ~/reset and ~/save_map wait for it without holding up images, odometry or TF."""
    from std_srvs.srv import Trigger
    from tf2_msgs.msg import TFMessage

    from mapany_ros.scoring.collector import QOS

    h = harness_factory(RecordingBackend(), **{"map.save_path": str(tmp_path / "map.ply")})
    tf_arrivals: list[float] = []
    h.driver.create_subscription(TFMessage, "/tf", lambda m: tf_arrivals.append(time.monotonic()), QOS)
    reset = h.driver.create_client(Trigger, "/mapany_node/reset")
    save = h.driver.create_client(Trigger, "/mapany_node/save_map")
    first_answer(h, reset)
    first_answer(h, save)
    h.info()
    h.static_tf()
    h.good_stream(1.0, 4)
    assert h._wait(lambda: h.collector.out.depth_count >= 3, 15)
    voxel_map = h.node.pipeline.map
    voxel_map._lock.acquire()  # as the map publisher's thread holds it while it packs the map
    try:
        resets = h.node.pipeline.stats.resets
        calls = [reset.call_async(Trigger.Request()), save.call_async(Trigger.Request())]
        held = time.monotonic()
        assert h._wait(lambda: h.node.pipeline.stats.resets == resets + 1, 10)  # the pipeline's part: at once
        stamps = h.good_stream(2.0, 10)  # input goes on meanwhile
        assert h._wait(lambda: len([t for t in tf_arrivals if t > held]) >= 10, 10), "the executor waited"
        assert not any(c.done() for c in calls)
    finally:
        voxel_map._lock.release()
    assert h._wait(lambda: all(c.done() for c in calls), 10)
    assert all(c.result().success for c in calls), [c.result().message for c in calls]
    # Mapping goes on (keyframes that came while the worker waited for the map were thinned, never the newest).
    out = h.collector.out.depth
    assert h._wait(lambda: stamps[-1] in out and sum(s in out for s in stamps) >= 4, 15), h.warnings
