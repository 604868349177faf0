"""Keyframe groups waiting for the backend, and the windows they are sent in.

Every window after the first starts with ``overlap`` context groups that an earlier window has
already *placed* in the map; they tie the new window to the map and are not output again, so each
keyframe is output exactly once. Context is chosen when a window is sent, from what placement
accepted, so a failed or rejected window never leaves the next one without an anchor.

When the backend falls behind, waiting keyframes are thinned (never whole windows dropped): the
one whose removal leaves the smallest gap goes, so a window still spans from the placed context
to the newest keyframe with evenly spread views.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from mapany_ros.core.frames import Frame

Group = list[Frame]


@dataclass
class Window:
    """Frame groups for one backend call; ``n_context`` leading groups are placed context, not output."""

    index: int
    groups: list[Group]
    n_context: int

    @property
    def frames(self) -> list[Frame]:
        """The groups flattened, context first, in the order the backend receives them."""
        return [f for g in self.groups for f in g]

    @property
    def output_mask(self) -> list[bool]:
        """Per flattened frame: True when this window is the one that outputs it."""
        return [i >= self.n_context for i, g in enumerate(self.groups) for _ in g]


class PendingKeyframes:
    """Keyframe groups waiting for the backend, cut into windows as they arrive.

    The new keyframes of each window are decided in message time: a window is cut when a whole
    window's worth has arrived, or (:meth:`cut`) when the oldest uncut one has waited too long -
    never by when the backend happens to be free, so a stream is cut the same way at any replay
    rate and offline, as long as at most ``max_windows`` cut windows wait. Beyond that the backend
    is behind: the uncut keyframes stay one window's worth, and the one whose removal leaves the
    smallest gap is skipped (never the newest), so the next window still spans up to now with
    evenly spread views. ``separation(a, b)`` says how far apart two groups are (in keyframe units).
    """

    def __init__(self, size: int, overlap: int, max_windows: int, separation: Callable[[Group, Group], float]
                 ) -> None:
        if size < 2:
            raise ValueError(f"window size must be >= 2, got {size}")
        if not 0 <= overlap < size:
            raise ValueError(f"window overlap must be in [0, size), got {overlap} for size {size}")
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        self.size, self.overlap, self.max_windows = size, overlap, max_windows
        self._separation = separation
        self.clear()

    def clear(self) -> None:
        self._open: list[Group] = []
        self._cut: deque[list[Group]] = deque()
        self._windows = 0
        self._last: Group | None = None  # the newest group already cut: the gap before the first open one

    def __len__(self) -> int:
        """Groups waiting, cut into windows or not."""
        return len(self._open) + sum(len(w) for w in self._cut)

    @property
    def windows_ready(self) -> int:
        return len(self._cut)

    @property
    def oldest_uncut(self) -> Group | None:
        return self._open[0] if self._open else None

    @property
    def uncut(self) -> int:
        return len(self._open)

    @property
    def first_window(self) -> bool:
        """No window was cut yet: the next one has no context and needs ``size`` new groups."""
        return self._windows == 0

    def _whole(self) -> int:
        return self.size - (0 if self.first_window else self.overlap)

    def push(self, group: Group) -> list[Group]:
        """Add the newest keyframe group; returns the waiting groups skipped to make room."""
        self._open.append(group)
        if len(self._open) >= self._whole():
            self.cut()
        skipped = []
        while len(self._open) > self._whole():  # only while max_windows windows wait
            skipped.append(self._skip_thinnest())
        return skipped

    def cut(self) -> None:
        """The uncut groups become a window (a partial one when fewer than a window's worth), if one may wait."""
        if self._open and len(self._cut) < self.max_windows:
            self._cut.append(self._open)
            self._last = self._open[-1]
            self._open = []
            self._windows += 1

    def take(self) -> list[Group]:
        """The new groups of the next window, oldest first ([] when none is cut)."""
        if not self._cut:
            return []
        taken = self._cut.popleft()
        if len(self._open) >= self._whole():  # a window held back while the queue was full
            self.cut()
        return taken

    def _skip_thinnest(self) -> Group:
        """Drop the uncut group (never the newest) whose removal leaves the smallest gap."""
        best, best_gap = 0, float("inf")
        for k in range(len(self._open) - 1):
            before = self._open[k - 1] if k > 0 else self._last
            gap = self._separation(before, self._open[k + 1]) if before is not None else float("inf")
            if gap < best_gap:
                best, best_gap = k, gap
        return self._open.pop(best)
