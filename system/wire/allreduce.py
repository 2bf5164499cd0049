"""A deterministic all-reduce among the R replicas of one pipeline stage: a pipelined chain.

::

    reduce:     r0 ──g0──▶ r1 ──g0+g1──▶ r2 ──(g0+g1)+g2──▶ r3  (holds the total)
    broadcast:  r0 ◀────── r1 ◀───────── r2 ◀──────────────── r3   (chunk by chunk, meanwhile)

Every element is summed in replica order, ``((g0 + g1) + g2) + ...``, exactly as the single-process
reference sums its replicas, so replicated training stays bitwise equal to it. A ring all-reduce
moves the same bytes per link but starts each chunk's sum at a different rank, which would change
the order per chunk; a chain keeps one order for all. The buffer is cut into chunks that fit a
pipe buffer, and chunks flow down the chain while later ones are still being added, so every link
is busy at once (the latency is ``(R - 1 + chunks)`` chunk transfers rather than
``(R - 1) * chunks``).

The function is given its neighbours as callables, so the same code runs over pipes, over MPI,
or between threads in a test.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CHUNK_BYTES = 512 * 1024  # half of the 1 MiB pipe buffer: a chunk never waits for room

Send = Callable[[int, np.ndarray], None]  # (chunk index, data)
Receive = Callable[[int], np.ndarray]     # chunk index -> data


def chunk_bounds(size: int, itemsize: int, chunk_bytes: int = CHUNK_BYTES) -> list[slice]:
    step = max(1, chunk_bytes // itemsize)
    return [slice(start, min(start + step, size)) for start in range(0, size, step)] or [
        slice(0, 0)
    ]


def chain_allreduce(
    flat: np.ndarray, rank: int, size: int, *, send_next: Send | None, recv_prev: Receive | None,
    send_prev: Send | None, recv_next: Receive | None, chunk_bytes: int = CHUNK_BYTES,
) -> np.ndarray:
    """Sum ``flat`` over all ranks in rank order, in place; every rank ends with the total."""
    if flat.ndim != 1 or not flat.flags.c_contiguous:
        raise ValueError("all-reduce needs a flat, contiguous buffer")
    chain_allreduce_parts([flat], rank, size, send_next=send_next, recv_prev=recv_prev,
                          send_prev=send_prev, recv_next=recv_next, chunk_bytes=chunk_bytes)
    return flat


def chain_allreduce_parts(
    parts: list[np.ndarray], rank: int, size: int, *, send_next: Send | None,
    recv_prev: Receive | None, send_prev: Send | None, recv_next: Receive | None,
    chunk_bytes: int = CHUNK_BYTES, first_index: int = 0,
) -> int:
    """Sum every array of ``parts`` over all ranks in rank order, in place, without copying
    them into one buffer first. Chunk frames are numbered from ``first_index``; returns the
    number after the last one, where a following call on the same links goes on.

    Reduce and broadcast are interleaved chunk by chunk: the last rank sends each total back as
    soon as it has it, and every other rank passes totals on between its reduce chunks, so both
    directions of every link carry data at once, where reducing every chunk before any comes
    back leaves one direction idle (``python -m bench.allreduce`` measures it). Rank ``r`` lets the
    broadcast trail its reduce by ``2 * (R - 1 - r)`` chunks, the round trip to the last rank,
    so it does not wait on a chunk that cannot have come back yet. Callers must read ahead (the
    worker's receiver threads do) or use chunks that fit the links' buffers.
    """
    views = []
    for part in parts:
        if not part.flags.c_contiguous:
            raise ValueError("all-reduce needs contiguous arrays")
        views.append(part.reshape(-1))
    chunks = [view[bounds] for view in views
              for bounds in chunk_bounds(view.size, view.itemsize, chunk_bytes)]
    if size == 1:
        return first_index + len(chunks)
    is_last = rank == size - 1
    lag = 2 * (size - 1 - rank)
    returned = 0  # broadcast chunks received (and passed on) so far

    def take_total(position: int) -> None:
        chunk, index = chunks[position], first_index + position
        total = recv_next(index)
        _check(total, chunk, index, "broadcast")
        chunk[...] = total
        if rank > 0:
            send_prev(index, chunk)

    for position, chunk in enumerate(chunks):
        index = first_index + position
        if rank > 0:
            partial = recv_prev(index)
            _check(partial, chunk, index, "reduce")
            np.add(partial, chunk, out=chunk)  # (g0 + ... + g_{r-1}) + g_r
        if is_last:
            send_prev(index, chunk)  # the total: straight back down the chain
            continue
        send_next(index, chunk)
        if position >= lag:
            take_total(returned)
            returned += 1
    if not is_last:
        for position in range(returned, len(chunks)):
            take_total(position)
    return first_index + len(chunks)


def broadcast_from_first(
    flat: np.ndarray, rank: int, size: int, *, send_next: Send | None, recv_prev: Receive | None,
) -> np.ndarray:
    """Copy rank 0's ``flat`` to every rank, down the chain (used to sync initial weights)."""
    for index, part in enumerate(chunk_bounds(flat.size, flat.itemsize)):
        if rank > 0:
            data = recv_prev(index)
            _check(data, flat[part], index, "weight broadcast")
            flat[part] = data
        if rank < size - 1:
            send_next(index, flat[part])
    return flat


def broadcast_from(
    arrays: list[np.ndarray], rank: int, size: int, root: int, *, send_next: Send | None,
    send_prev: Send | None, recv_prev: Receive | None, recv_next: Receive | None,
) -> None:
    """Copy rank ``root``'s ``arrays`` to every rank, in place, along the chain both ways
    (ranks below the root get them through the ranks between, and so do the ranks above).
    Chunks are numbered across the arrays, in order."""
    if not 0 <= root < size:
        raise ValueError(f"broadcast root {root} outside 0..{size - 1}")
    index = 0
    for array in arrays:
        flat = array.reshape(-1)
        for part in chunk_bounds(flat.size, flat.itemsize):
            if rank < root:
                data = recv_next(index)
            elif rank > root:
                data = recv_prev(index)
            if rank != root:
                _check(data, flat[part], index, "state broadcast")
                flat[part] = data
            if rank <= root and rank > 0:
                send_prev(index, flat[part])
            if rank >= root and rank < size - 1:
                send_next(index, flat[part])
            index += 1


def _check(received: np.ndarray, expected: np.ndarray, index: int, phase: str) -> None:
    if received.shape != expected.shape or received.dtype != expected.dtype:
        raise ValueError(f"all-reduce {phase} chunk {index}: got {received.dtype}"
                         f"{received.shape}, expected {expected.dtype}{expected.shape}")


def flatten(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.empty(0)


def unflatten(flat: np.ndarray, arrays: list[np.ndarray]) -> None:
    """Copy ``flat`` back into ``arrays`` (in place, same order as :func:`flatten`)."""
    offset = 0
    for array in arrays:
        array.reshape(-1)[...] = flat[offset: offset + array.size]
        offset += array.size
