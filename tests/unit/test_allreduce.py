"""The chain all-reduce over real pipes, one thread per rank, against np.sum in rank order."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from system.allreduce import broadcast_from_first, chain_allreduce, chunk_bounds
from system.protocol import Kind
from system.transport import PipeChannel, open_pipe


def run_ranks(size: int, body) -> list:
    """Run body(rank, links) in one thread per rank over real pipes; return their results."""
    forward = [open_pipe() for _ in range(size - 1)]  # r -> r+1
    backward = [open_pipe() for _ in range(size - 1)]  # r+1 -> r
    channels = {}
    for r in range(size - 1):
        channels[r, "next"] = PipeChannel(backward[r][0], forward[r][1], name=f"{r}->next")
        channels[r + 1, "prev"] = PipeChannel(forward[r][0], backward[r][1], name=f"{r + 1}->prev")
    results: list = [None] * size
    errors: list = []

    def links(rank: int) -> dict:
        nxt, prv = channels.get((rank, "next")), channels.get((rank, "prev"))
        return {
            "send_next": (lambda i, a: nxt.send_frame(Kind.REDUCE, 1, i, a, timeout_s=10))
            if nxt else None,
            "recv_next": (lambda i: nxt.recv_frame(timeout_s=10).array) if nxt else None,
            "send_prev": (lambda i, a: prv.send_frame(Kind.REDUCE, 1, i, a, timeout_s=10))
            if prv else None,
            "recv_prev": (lambda i: prv.recv_frame(timeout_s=10).array) if prv else None,
        }

    def target(rank: int) -> None:
        try:
            results[rank] = body(rank, links(rank))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for channel in channels.values():
        channel.close()
    assert not errors, errors
    return results


@pytest.mark.parametrize("size", [2, 3, 4, 5])
@pytest.mark.parametrize("length,chunk_bytes", [(1, 8), (7, 16), (1001, 96), (4096, 1 << 20)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_chain_allreduce_sums_in_rank_order(size, length, chunk_bytes, dtype):
    rng = np.random.default_rng(length * 10 + size)
    inputs = [(rng.standard_normal(length) * 10.0 ** rng.integers(-3, 3)).astype(dtype)
              for _ in range(size)]
    expected = inputs[0].copy()
    for grad in inputs[1:]:
        expected += grad  # ((g0 + g1) + g2) + ...: the documented order

    def body(rank, links):
        flat = inputs[rank].copy()
        return chain_allreduce(flat, rank, size, chunk_bytes=chunk_bytes, **links)

    for result in run_ranks(size, body):
        assert result.dtype == dtype
        assert np.array_equal(result, expected)


def test_order_matters_so_the_test_can_fail():
    """Floating-point sums in another order differ: the bitwise check above is meaningful."""
    values = [np.float64(0.1), np.float64(0.2), np.float64(0.3)]
    assert (values[0] + values[1]) + values[2] != values[0] + (values[1] + values[2])


@pytest.mark.parametrize("size", [2, 4])
def test_broadcast_from_first(size):
    source = np.arange(1000, dtype=np.float64)

    def body(rank, links):
        flat = source.copy() if rank == 0 else np.zeros_like(source)
        return broadcast_from_first(flat, rank, size, send_next=links["send_next"],
                                    recv_prev=links["recv_prev"])

    for result in run_ranks(size, body):
        assert np.array_equal(result, source)


def test_chunks_cover_the_buffer():
    bounds = chunk_bounds(1001, 8, 96)
    assert bounds[0] == slice(0, 12) and bounds[-1].stop == 1001
    assert sum(b.stop - b.start for b in bounds) == 1001
    assert chunk_bounds(0, 8) == [slice(0, 0)]
