"""Where placement's time goes: wall and CPU seconds per stage of the newest window (`make bench`).

A context manager per stage costs a few microseconds, so it stays on in the node. CPU time is the
process's (every torch thread counted): on a loaded machine it is what the work itself costs,
while wall time also holds the waits for a core.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StageClock:
    """Seconds per named stage since the last :meth:`reset` (stages may repeat; they add up)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def reset(self) -> None:
        self.wall = {}
        self.cpu = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - t0
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0
