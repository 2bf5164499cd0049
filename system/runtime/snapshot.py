"""In-memory snapshots of a worker's state, refreshed every step, held by another process.

After Gemini's in-memory checkpoints: every worker copies its parameters and optimizer state,
once per step, into a *region* of shared memory (a ``memfd``), on a helper thread while the next
step computes (the copy only reads the arrays, and the main thread waits for it before it
applies the next update). The region outlives the worker: another process keeps the memfd open
(its *holder*, see :func:`holder_of`), so when the worker dies its replacement maps the same
region and continues from the newest complete snapshot, without touching the disk. When the
worker and its holder die together the region is gone and recovery falls back to the newest
disk checkpoint; the coordinator keeps no copy, as it could not across machines.

A region has ``SLOTS`` slots, each one step's state. A slot is written ``writing`` (step -1),
then the arrays, then their CRC32C and step, and only then marked ``valid``: a worker killed
mid-copy leaves that one slot invalid and the others intact. Three slots because a survivor may
have to roll back two steps: it may have finished step c+1 while the failed worker's newest
complete snapshot is step c-1 (killed while copying step c; see ``pipetrain.runtime.recovery``).

Layout: a 256-byte header (magic, slot count, slot size, layout length, then per slot its
state, CRC and step), the layout (JSON: name, dtype, shape, offset of every array), then the
slots, page-aligned.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable

import crc32c
import numpy as np

from pipetrain import tracing
from pipetrain.hooks import Place
from pipetrain.runtime.background import JobThread
from pipetrain.runtime.topology import Grid, Position

MAGIC = b"PTSNAP01"
SLOTS = 3
EMPTY, WRITING, VALID = 0, 1, 2
_HEAD = struct.Struct("<8sIIQ")  # magic, slots, layout bytes, slot bytes
_SLOT = struct.Struct("<IIq")    # state, crc32c, step
_SLOT_TABLE = 64
_LAYOUT_AT = 256
_ALIGN = 64
PAGE = mmap.PAGESIZE


class SnapshotError(RuntimeError):
    """A region that does not hold what it should (layout, step or checksum)."""


def holder_of(grid: Grid, at: Position) -> Position | None:
    """Who keeps ``at``'s region open: the next worker in grid order, round the grid; None
    (the coordinator holds it) when the grid has a single worker."""
    positions = grid.positions()
    if len(positions) == 1:
        return None
    return positions[(positions.index(at) + 1) % len(positions)]


def layout_of(arrays: dict[str, np.ndarray]) -> tuple[list[list], int]:
    """([name, dtype, shape, offset] per array, bytes one slot needs)."""
    layout, offset = [], 0
    for name, array in arrays.items():
        offset = -(-offset // _ALIGN) * _ALIGN
        layout.append([name, array.dtype.str, list(array.shape), offset])
        offset += array.nbytes
    return layout, max(offset, 1)


class Region:
    """One worker's snapshot slots in a memfd; owns the fd and the mapping."""

    def __init__(self, fd: int, layout: list[list], slot_bytes: int, *, create: bool) -> None:
        self.fd = fd
        self.layout = layout
        self.slot_bytes = -(-slot_bytes // PAGE) * PAGE
        layout_text = json.dumps(layout).encode()
        self.data_at = -(-(_LAYOUT_AT + len(layout_text)) // PAGE) * PAGE
        size = self.data_at + SLOTS * self.slot_bytes
        if create:
            os.ftruncate(fd, size)
        elif os.fstat(fd).st_size != size:
            raise SnapshotError(f"snapshot region of {os.fstat(fd).st_size} bytes, expected "
                                f"{size} (another model or stage split?)")
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._used = layout[-1][3] + _nbytes(layout[-1]) if layout else 0
        # Per slot, its arrays as views of the mapping, made once: building them for every
        # copy cost more than copying a small model's state (dropped before the map closes).
        self._targets: dict[int, list[tuple[str, np.ndarray]]] = {}
        if create:
            _HEAD.pack_into(self._map, 0, MAGIC, SLOTS, len(layout_text), self.slot_bytes)
            self._map[_LAYOUT_AT:_LAYOUT_AT + len(layout_text)] = layout_text
        else:
            magic, slots, length, slot_bytes_found = _HEAD.unpack_from(self._map, 0)
            found = bytes(self._map[_LAYOUT_AT:_LAYOUT_AT + length])
            if (magic, slots, slot_bytes_found, found) != (MAGIC, SLOTS, self.slot_bytes,
                                                           layout_text):
                self._map.close()  # the fd is the caller's to close
                raise SnapshotError("snapshot region laid out for other arrays")

    @classmethod
    def create(cls, name: str, arrays: dict[str, np.ndarray]) -> Region:
        layout, slot_bytes = layout_of(arrays)
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            return cls(fd, layout, slot_bytes, create=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, arrays: dict[str, np.ndarray]) -> Region:
        """The region in ``fd`` (taken over), which must be laid out for ``arrays``."""
        layout, slot_bytes = layout_of(arrays)
        try:
            return cls(fd, layout, slot_bytes, create=False)
        except BaseException:
            os.close(fd)
            raise

    # -- slots -----------------------------------------------------------------------------

    def _slot(self, index: int) -> tuple[int, int, int]:
        return _SLOT.unpack_from(self._map, _SLOT_TABLE + index * _SLOT.size)

    def _mark(self, index: int, state: int, crc: int, step: int) -> None:
        _SLOT.pack_into(self._map, _SLOT_TABLE + index * _SLOT.size, state, crc, step)

    def _bytes(self, index: int) -> memoryview:
        start = self.data_at + index * self.slot_bytes
        return memoryview(self._map)[start:start + self._used]

    def valid_steps(self) -> list[int]:
        return sorted(step for state, _, step in map(self._slot, range(SLOTS))
                      if state == VALID)

    def write(self, step: int, arrays: dict[str, np.ndarray]) -> None:
        """Copy ``arrays`` (as laid out) into a free slot, or over the oldest one."""
        slots = [self._slot(i) for i in range(SLOTS)]
        free = [i for i, (state, _, _) in enumerate(slots) if state != VALID]
        index = free[0] if free else min(range(SLOTS), key=lambda i: slots[i][2])
        self._mark(index, WRITING, 0, -1)
        for name, target in self._targets_of(index):
            np.copyto(target, arrays[name])
        view = self._bytes(index)
        try:
            crc = crc32c.crc32c(view)
        finally:
            view.release()
        self._mark(index, VALID, crc, step)

    def _targets_of(self, index: int) -> list[tuple[str, np.ndarray]]:
        targets = self._targets.get(index)
        if targets is None:
            start = self.data_at + index * self.slot_bytes
            targets = self._targets[index] = [
                (name, np.frombuffer(self._map, dtype=dtype, count=int(np.prod(shape)),
                                     offset=start + offset).reshape(shape))
                for name, dtype, shape, offset in self.layout]
        return targets

    def read(self, step: int) -> dict[str, np.ndarray]:
        """Copies of the arrays of the valid slot of ``step``, checksum verified."""
        for index in range(SLOTS):
            state, crc, found = self._slot(index)
            if state == VALID and found == step:
                view = self._bytes(index)
                try:
                    if crc32c.crc32c(view) != crc:
                        raise SnapshotError(f"snapshot of step {step}: checksum mismatch")
                    return {name: np.frombuffer(view, dtype=dtype, count=int(np.prod(shape)),
                                                offset=offset).reshape(shape).copy()
                            for name, dtype, shape, offset in self.layout}
                finally:
                    view.release()
        raise SnapshotError(f"no snapshot of step {step} (have {self.valid_steps()})")

    def forget_after(self, step: int) -> None:
        """Invalidate snapshots newer than ``step`` (after rolling back to it)."""
        for index in range(SLOTS):
            state, _, found = self._slot(index)
            if state == VALID and found > step:
                self._mark(index, EMPTY, 0, -1)

    def close(self) -> None:
        self._targets.clear()  # no view may outlive the mapping (mmap refuses to close)
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def peek_steps(fd: int) -> list[int]:
    """The valid steps of the region in ``fd`` (the holder's report; it knows no layout)."""
    with mmap.mmap(fd, _LAYOUT_AT, mmap.MAP_SHARED, mmap.PROT_READ) as head:
        if _HEAD.unpack_from(head, 0)[0] != MAGIC:
            return []
        return sorted(step for state, _, step in
                      (_SLOT.unpack_from(head, _SLOT_TABLE + i * _SLOT.size)
                       for i in range(SLOTS)) if state == VALID)


def _nbytes(entry: list) -> int:
    return int(np.prod(entry[2])) * np.dtype(entry[1]).itemsize


def region_name(place: Place) -> str:
    return f"pipetrain-snapshot-s{place.stage}r{place.replica}"


# () -> every array of the worker's state, by name (parameters, then optimizer state)
StateArrays = Callable[[], dict[str, np.ndarray]]


class SnapshotThread(JobThread):
    """Copies the worker's state into its region after each update, off the critical path."""

    def __init__(self, region: Region, state: StateArrays,
                 before_copy: Callable[[int], None] = lambda step: None) -> None:
        self.region = region
        self._state = state
        self._before_copy = before_copy
        super().__init__("snapshot")

    def submit(self, step: int) -> None:
        self.enqueue(step)

    def run_job(self, step: int) -> None:
        copy_state(self.region, self._state, self._before_copy, step)


def copy_state(region: Region, state: StateArrays, before_copy: Callable[[int], None],
               step: int) -> None:
    """The state of ``step`` into ``region`` (the ``snapshot_copy`` hook first), traced."""
    before_copy(step)
    with tracing.current().span("snapshot", tracing.SNAPSHOT, {"step": step}):
        region.write(step, state())


# A state up to this size is copied by the main thread right after the step's reply: the copy
# takes microseconds, while handing it to the thread (a wake-up, then the GIL going back and
# forth beside the next step) cost a tiny model's step more than the copy (issue 19).
INLINE_SNAPSHOT_BYTES = 64 * 1024


class InlineSnapshots:
    """The :class:`SnapshotThread` interface without a thread, for a small state: ``submit``
    copies at once, on the calling (main) thread."""

    def __init__(self, region: Region, state: StateArrays,
                 before_copy: Callable[[int], None] = lambda step: None) -> None:
        self.region = region
        self._state = state
        self._before_copy = before_copy

    def submit(self, step: int) -> None:
        copy_state(self.region, self._state, self._before_copy, step)

    def wait(self, at_most_pending: int = 0, *,
             interrupted: Callable[[], bool] = lambda: False) -> None:
        """Nothing is ever pending."""

    def close(self) -> None:
        pass


def make_snapshots(region: Region, state: StateArrays, before_copy: Callable[[int], None],
                   state_bytes: int) -> SnapshotThread | InlineSnapshots:
    """Inline for a small state (:data:`INLINE_SNAPSHOT_BYTES`), else a thread."""
    if state_bytes <= INLINE_SNAPSHOT_BYTES:
        return InlineSnapshots(region, state, before_copy)
    return SnapshotThread(region, state, before_copy)
