"""Sparse voxel storage on one torch device: packed int64 keys, per-voxel sums, a sorted index.

Voxel data lives in slot arrays that only grow at their end, so adding a keyframe never moves
the voxels already there. The key -> slot index is a large sorted run plus a small sorted run
of recent insertions, merged into the large one when it reaches a fraction of it: a keyframe
costs O(its voxels + the small run) and the O(map) merge happens once every many keyframes
(searchsorted and index_copy only; no hashing, no sort of the map, no Python loop over voxels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

COORD_BITS = 21
COORD_OFFSET = 1 << (COORD_BITS - 1)  # voxel coordinates in [-2^20, 2^20) pack into 21 bits each
_COORD_MASK = (1 << COORD_BITS) - 1
#: Columns of the per-voxel sums: weight, weighted offset from the voxel centre in voxels (3), weighted RGB (3).
NUM_SUMS = 7
#: The recent-insertions run is merged into the main run when longer than this or 1/_DELTA_FRACTION of it.
_DELTA_MIN = 8192
_DELTA_FRACTION = 32
_FIRST_CAPACITY = 65536


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def pack(idx: torch.Tensor) -> torch.Tensor:
    """(n, 3) int64 voxel coordinates -> (n,) non-negative int64 keys, ordered like (x, y, z)."""
    return pack_columns(idx.T.contiguous())


def pack_columns(c: torch.Tensor) -> torch.Tensor:
    """:func:`pack` of coordinates given as (3, n) rows (contiguous rows: several times faster)."""
    return ((c[0] + COORD_OFFSET) << (2 * COORD_BITS)) | ((c[1] + COORD_OFFSET) << COORD_BITS) | (c[2] + COORD_OFFSET)


def unpack(keys: torch.Tensor) -> torch.Tensor:
    """(n,) int64 keys -> (n, 3) int64 voxel coordinates."""
    shifts = torch.tensor([2 * COORD_BITS, COORD_BITS, 0], device=keys.device)
    return ((keys[:, None] >> shifts) & _COORD_MASK) - COORD_OFFSET


@dataclass
class Contribution:
    """Samples summed per voxel: what one keyframe added to the map, so it can be taken out again."""

    keys: torch.Tensor  # (M,) int64, sorted, unique
    sums: torch.Tensor  # (M, NUM_SUMS) float32
    counts: torch.Tensor  # (M,) int32 samples per voxel

    @property
    def nbytes(self) -> int:
        return nbytes(self.keys, self.sums, self.counts)


def reduce_samples(points: torch.Tensor, weights: torch.Tensor, rgb: torch.Tensor, voxel_size: float) -> Contribution:
    """Sum weighted samples (points in metres, weights, RGB: uint8, or float means) per voxel.

    ``counts`` are the samples per voxel. Deterministic on a CPU: the same samples give the same
    sums bit for bit, so a contribution can be computed again to be taken out of a grid.
    """
    # Coordinates as rows, one contiguous row per axis: on a CPU the packing, offsets and sums then
    # stream through memory, several times faster than (n, 3) columns for millions of samples.
    p = (points.float() / voxel_size).T.contiguous()
    idx = torch.floor(p)
    keys, inverse, counts = torch.unique(pack_columns(idx.long()), return_inverse=True, return_counts=True)
    w = weights.float()
    offset, colour = p.sub_(idx).sub_(0.5), rgb.float().T
    # One weighted bincount per row: faster than index_add_ of (n, 7) rows.
    columns = [w, *(w * offset[k] for k in range(3)), *(w * colour[k] for k in range(3))]
    sums = torch.stack([torch.bincount(inverse, c, keys.numel()) for c in columns], dim=1).float()
    return Contribution(keys, sums, counts.to(torch.int32))


def voxel_means(keys: torch.Tensor, sums: torch.Tensor, voxel_size: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted mean position (metres, float32), summed weight and mean colour (float) of voxels."""
    w = sums[:, 0]
    safe = w.clamp_min(1e-20)[:, None]
    # float32: voxel coordinates are integers below 2^20, so a mean is off by at most 1/8 voxel at
    # 50 km from the origin and by 1/1000 within a kilometre.
    xyz = (unpack(keys).float() + 0.5 + sums[:, 1:4] / safe) * voxel_size
    return xyz, w, sums[:, 4:7] / safe


def _merge_sorted(
    a_keys: torch.Tensor, a_slots: torch.Tensor, b_keys: torch.Tensor, b_slots: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of two sorted, disjoint (key, slot) runs in O(len a + len b), without a sort."""
    if b_keys.numel() == 0:
        return a_keys, a_slots
    if a_keys.numel() == 0:
        return b_keys, b_slots
    total = a_keys.numel() + b_keys.numel()
    dest_b = torch.searchsorted(a_keys, b_keys) + torch.arange(b_keys.numel(), device=b_keys.device)
    is_b = torch.zeros(total, dtype=torch.bool, device=b_keys.device)
    is_b[dest_b] = True
    dest_a = torch.nonzero(~is_b, as_tuple=True)[0]
    keys = torch.empty(total, dtype=a_keys.dtype, device=a_keys.device)
    slots = torch.empty(total, dtype=a_slots.dtype, device=a_slots.device)
    keys.index_copy_(0, dest_a, a_keys).index_copy_(0, dest_b, b_keys)
    slots.index_copy_(0, dest_a, a_slots).index_copy_(0, dest_b, b_slots)
    return keys, slots


class VoxelGrid:
    """Voxels by key: weighted sums, sample counts and the stamp of the last update of each.

    ``capacity_limit`` caps the doubling of the slot arrays (the map's voxel budget); a
    keyframe may still overflow it until the owner evicts.
    """

    def __init__(self, device: torch.device, capacity_limit: int) -> None:
        self.device = device
        self._limit = capacity_limit
        self.size = 0  # slots in use: [0, size)
        self._slot_arrays(min(_FIRST_CAPACITY, capacity_limit))
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        self._main = (empty, empty)
        self._delta = (empty, empty)

    def _slot_arrays(self, capacity: int) -> None:
        dev = self.device
        self.keys = torch.zeros(capacity, dtype=torch.int64, device=dev)
        self.sums = torch.zeros((capacity, NUM_SUMS), dtype=torch.float32, device=dev)
        self.counts = torch.zeros(capacity, dtype=torch.int32, device=dev)
        self.stamps = torch.zeros(capacity, dtype=torch.int32, device=dev)

    @classmethod
    def from_contribution(cls, c: Contribution, capacity_limit: int) -> VoxelGrid:
        """A grid holding exactly ``c`` (sorted unique keys), built without a search."""
        grid = cls(c.keys.device, capacity_limit)
        n = c.keys.numel()
        grid._slot_arrays(max(n, 1))
        grid.size = n
        grid.keys[:n], grid.sums[:n], grid.counts[:n] = c.keys, c.sums, c.counts
        grid._main = (c.keys.clone(), torch.arange(n, device=c.keys.device))
        return grid

    @property
    def nbytes(self) -> int:
        return nbytes(self.keys, self.sums, self.counts, self.stamps, *self._main, *self._delta)

    def compact(self) -> None:
        """Shrink the slot arrays to the voxels in use and fold the recent run into the main one
        (a grid that will not grow any more: a closed submap)."""
        n = self.size
        old = (self.keys[:n], self.sums[:n], self.counts[:n], self.stamps[:n])
        self._slot_arrays(max(n, 1))
        for fresh, used in zip((self.keys, self.sums, self.counts, self.stamps), old):
            fresh[:n] = used
        self._main = _merge_sorted(*self._main, *self._delta)
        self._delta = (self._delta[0][:0], self._delta[1][:0])

    def find(self, keys: torch.Tensor) -> torch.Tensor:
        """Slot of each key, -1 where absent."""
        slots = torch.full_like(keys, -1)
        for run_keys, run_slots in (self._main, self._delta):
            if run_keys.numel():
                pos = torch.searchsorted(run_keys, keys).clamp_(max=run_keys.numel() - 1)
                slots = torch.where(run_keys[pos] == keys, run_slots[pos], slots)
        return slots

    def add(self, c: Contribution, stamp: int) -> None:
        """Sum a contribution in, creating its new voxels; their stamp becomes ``stamp``."""
        slots = self.find(c.keys)
        new = slots < 0
        if bool(new.any()):
            slots[new] = self._allocate(c.keys[new])
        self.sums.index_add_(0, slots, c.sums)
        self.counts.index_add_(0, slots, c.counts)
        self.stamps[slots] = stamp

    def subtract(self, c: Contribution) -> None:
        """Take a contribution out; voxels left without samples are zeroed (removed by the next eviction)."""
        slots = self.find(c.keys)
        present = slots >= 0
        slots = slots[present]
        self.sums.index_add_(0, slots, c.sums[present], alpha=-1)
        self.counts.index_add_(0, slots, c.counts[present], alpha=-1)
        emptied = slots[self.counts[slots] <= 0]
        self.sums[emptied] = 0.0
        self.counts[emptied] = 0

    def remove(self, keep: torch.Tensor) -> None:
        """Drop the voxels of used slots where ``keep`` (size,) is False."""
        n = self.size
        new_slot = torch.cumsum(keep, 0) - 1
        old = (self.keys[:n], self.sums[:n], self.counts[:n], self.stamps[:n])
        self._slot_arrays(self.keys.numel())
        self.size = int(keep.sum())
        for fresh, used in zip((self.keys, self.sums, self.counts, self.stamps), old):
            fresh[: self.size] = used[keep]
        runs = []
        for run_keys, run_slots in (self._main, self._delta):
            kept = keep[run_slots]
            runs.append((run_keys[kept], new_slot[run_slots[kept]]))
        self._main, self._delta = runs

    def _allocate(self, keys: torch.Tensor) -> torch.Tensor:
        """Slots for new sorted keys at the end of the arrays, entered in the recent-insertions run."""
        n, k = self.size, keys.numel()
        self._reserve(n + k)
        slots = torch.arange(n, n + k, device=self.device)
        self.keys[n : n + k] = keys
        self.size = n + k
        self._delta = _merge_sorted(*self._delta, keys, slots)
        if self._delta[0].numel() > max(_DELTA_MIN, self._main[0].numel() // _DELTA_FRACTION):
            self._main = _merge_sorted(*self._main, *self._delta)
            self._delta = (self._delta[0][:0], self._delta[1][:0])
        return slots

    def _reserve(self, needed: int) -> None:
        """Grow the slot arrays to hold ``needed`` voxels: doubling, but not past the limit unless needed."""
        capacity = self.keys.numel()
        if needed <= capacity:
            return
        old = (self.keys, self.sums, self.counts, self.stamps)
        self._slot_arrays(max(needed, min(2 * capacity, self._limit)))
        for fresh, used in zip((self.keys, self.sums, self.counts, self.stamps), old):
            fresh[: self.size] = used[: self.size]
