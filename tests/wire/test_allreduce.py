"""The chain all-reduce over real pipes, one thread per rank, against np.sum in rank order."""

from __future__ import annotations

import numpy as np
import pytest

from pipetrain.wire.allreduce import broadcast_from_first, chain_allreduce, chunk_bounds
from tests.wire.chain_ranks import run_ranks


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
        return chain_allreduce(flat, rank, size, chunk_bytes=chunk_bytes, **links(1))

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
        step_links = links(1)
        return broadcast_from_first(flat, rank, size, send_next=step_links["send_next"],
                                    recv_prev=step_links["recv_prev"])

    for result in run_ranks(size, body):
        assert np.array_equal(result, source)


def test_chunks_cover_the_buffer():
    bounds = chunk_bounds(1001, 8, 96)
    assert bounds[0] == slice(0, 12) and bounds[-1].stop == 1001
    assert sum(b.stop - b.start for b in bounds) == 1001
    assert chunk_bounds(0, 8) == [slice(0, 0)]
