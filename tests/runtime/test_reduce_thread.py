"""The all-reduce helper thread: layers submitted one by one, reduced over real pipes."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pipetrain.runtime.background import JobFailed, ReduceThread
from tests.wire.chain_ranks import run_ranks


@pytest.mark.parametrize("size", [2, 3])
def test_layers_submitted_one_by_one_sum_in_rank_order(size):
    rng = np.random.default_rng(size)
    shapes = [(7, 5), (5,), (300, 40), (40,)]  # two layers: weight and bias each
    # Per rank. Frames are numbered on across submissions within a step and from 0 again in
    # the next step; the receivers assert both.
    grads = [[(rng.standard_normal(s) * 1e3).astype(np.float32) for s in shapes]
             for _ in range(size)]
    expected = [sum_in_order([grads[r][i] for r in range(size)]) for i in range(len(shapes))]

    def rank_body(rank, links):
        reducer = ReduceThread(rank, size, links)
        try:
            for step in (1, 2):
                arrays = [g.copy() for g in grads[rank]]
                for layer in (2, 0):  # last layer first, weight and bias together
                    reducer.submit(step, {f"p{i}": arrays[i] for i in (layer, layer + 1)})
                reducer.wait()
                for got, want in zip(arrays, expected, strict=True):
                    assert np.array_equal(got, want)
        finally:
            reducer.close()

    run_ranks(size, rank_body)


def sum_in_order(values: list[np.ndarray]) -> np.ndarray:
    total = values[0].copy()
    for value in values[1:]:
        total += value
    return total


def test_a_failed_link_surfaces_in_wait_and_close_joins():
    def links(step):
        def broken(index, data):
            raise BrokenPipeError("replica 1 is gone")
        return {"send_next": broken, "recv_next": None, "send_prev": None, "recv_prev": None}

    reducer = ReduceThread(0, 2, links)
    try:
        reducer.submit(1, {"p": np.ones(4, dtype=np.float32)})
        with pytest.raises(JobFailed, match="replica 1 is gone") as failed:
            reducer.wait()
        assert isinstance(failed.value.__cause__, BrokenPipeError)
    finally:
        reducer.close()
    assert not any(t.name == "all-reduce" for t in threading.enumerate())


def test_wait_gives_up_when_interrupted():
    release = threading.Event()

    def links(step):
        def stuck(index):
            release.wait()
            raise InterruptedError("released")
        return {"send_next": lambda i, a: None, "recv_next": stuck, "send_prev": None,
                "recv_prev": None}

    reducer = ReduceThread(0, 2, links)
    try:
        reducer.submit(1, {"p": np.ones(4, dtype=np.float32)})
        with pytest.raises(InterruptedError):
            reducer.wait(interrupted=lambda: True)
    finally:
        release.set()
        reducer.close()
