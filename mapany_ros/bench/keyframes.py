"""Keyframe selection cost per frame group in the callbacks, for docs/benchmarks.md.

Without odometry every group's images go through :mod:`mapany_ros.core.visual_motion` inside the
pipeline's input lock, so it must stay a small part of a frame period. Frames are rendered along
the synthetic drive at 640x480 (10 Hz, 0.5 m/s), handed over read-only and contiguous as the ROS
conversions give them, and timed in :meth:`KeyframeSelector.consider` alone; groups that become
keyframes (which also take their image as the new reference) are timed apart. With odometry the
decision is a pose comparison, timed for reference.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from mapany_ros.core.frames import Frame
from mapany_ros.core.keyframes import KeyframeSelector
from mapany_ros.sim.scene import SyntheticScene, make_camera_model

WIDTH, HEIGHT = 640, 480
RATE_HZ = 10.0
#: Per camera and group, for the groups that stay frames (most of them).
TARGET_MS = 2.0


def _frames(n: int, cameras: int) -> list[list[Frame]]:
    """``n`` groups along the drive; a second camera looks 90 degrees to the left."""
    scene = SyntheticScene(0)
    cam = make_camera_model(WIDTH, HEIGHT)
    turn = np.eye(4)
    turn[:3, :3] = [[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]  # optical frame turned left about y
    groups = []
    for i in range(n):
        t = i / RATE_HZ
        group = []
        for c in range(cameras):
            T = scene.camera_pose(t) @ (turn if c == 1 else np.eye(4))
            rgb = np.ascontiguousarray(scene.render(T, cam, supersample=1)[0])
            rgb.flags.writeable = False  # as a view on a message buffer
            group.append(Frame(rgb, int(round(t * 1e9)), f"cam{c}", f"cam{c}_optical", cam))
        groups.append(group)
    return groups


def _time(groups: list[list[Frame]], with_pose: bool) -> tuple[list[float], list[float], list[float]]:
    """Milliseconds per consider() call: wall time of groups that were not keyframes, of keyframes,
    and this thread's CPU time of the former (what the call itself cost on a machine shared with others)."""
    selector = KeyframeSelector()
    scene = SyntheticScene(0) if with_pose else None
    plain, keys, cpu = [], [], []
    for group in groups:
        pose = scene.base_pose(group[0].stamp_ns * 1e-9) if scene is not None else None
        c0, t0 = time.thread_time(), time.perf_counter()
        key = selector.consider(group[0].stamp_ns, pose, group)
        wall, c = (time.perf_counter() - t0) * 1e3, (time.thread_time() - c0) * 1e3
        if key:
            keys.append(wall)
        else:
            plain.append(wall)
            cpu.append(c)
    return plain, keys, cpu


def bench_keyframes(n: int = 80) -> list[str]:
    """Markdown lines: consider() per group, one and two cameras, default and one torch thread."""
    rows = []
    threads_before = torch.get_num_threads()
    try:
        for cameras in (1, 2):
            groups = _frames(n, cameras)
            for threads in (threads_before, 1):
                torch.set_num_threads(threads)
                _time(groups[:10], with_pose=False)  # warm-up
                rows.append((f"{cameras} camera{'s' if cameras > 1 else ''}, no odometry (images)", threads,
                             *_time(groups, with_pose=False)))
        torch.set_num_threads(threads_before)
        rows.append(("1 camera, odometry (poses)", threads_before, *_time(_frames(n, 1), with_pose=True)))
    finally:
        torch.set_num_threads(threads_before)
    lines = [
        "## Keyframe selection per frame group (640x480)",
        "",
        f"`KeyframeSelector.consider` in the input callback, {n} groups of the synthetic drive at {RATE_HZ:g} Hz",
        "(0.5 m/s), read-only contiguous rgb8 as the conversions deliver them. Without odometry every group's",
        "images are reduced to ~80 px wide and the keyframe's patches tracked into them (`core/visual_motion.py`);",
        "a keyframe also takes its image as the new reference. Wall time median and 95th percentile of the",
        "groups that stay frames, of the keyframes, and the calling thread's CPU time (on a machine busy with",
        "other work the wall time also holds the time the thread waited for a core), in ms.",
        "",
        "| input | torch threads | groups / keyframes | median | p95 | keyframe median | CPU median | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, threads, plain, keys, cpu in rows:
        p95 = float(np.percentile(plain, 95)) if plain else float("nan")
        key_median = statistics.median(keys) if keys else float("nan")
        lines.append(f"| {name} | {threads} | {len(plain) + len(keys)} / {len(keys)} | {statistics.median(plain):.2f} "
                     f"| {p95:.2f} | {key_median:.2f} | {statistics.median(cpu):.2f} | <= {TARGET_MS:g} per camera |")
    lines.append("")
    return lines


if __name__ == "__main__":
    print("\n".join(bench_keyframes()))
