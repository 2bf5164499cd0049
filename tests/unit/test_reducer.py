"""The all-reduce helper thread: layers submitted one by one, reduced over real pipes."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from system.protocol import Kind
from system.reducer import Reducer
from system.transport import PipeChannel, open_pipe


def chain_channels(size: int) -> dict:
    channels = {}
    for r in range(size - 1):
        fwd, back = open_pipe(), open_pipe()
        channels[r, "next"] = PipeChannel(back[0], fwd[1], name=f"{r}->next")
        channels[r + 1, "prev"] = PipeChannel(fwd[0], back[1], name=f"{r + 1}->prev")
    return channels


def links_for(channels: dict, rank: int, seen_steps: list):
    nxt, prv = channels.get((rank, "next")), channels.get((rank, "prev"))

    def recv(channel, step, index):
        frame = channel.recv_frame(timeout_s=10)
        assert (frame.kind, frame.step, frame.microbatch) == (Kind.REDUCE, step, index)
        return frame.array

    def links(step):
        seen_steps.append(step)
        return {
            "send_next": (lambda i, a: nxt.send_frame(Kind.REDUCE, step, i, a, timeout_s=10))
            if nxt else None,
            "recv_next": (lambda i: recv(nxt, step, i)) if nxt else None,
            "send_prev": (lambda i, a: prv.send_frame(Kind.REDUCE, step, i, a, timeout_s=10))
            if prv else None,
            "recv_prev": (lambda i: recv(prv, step, i)) if prv else None,
        }

    return links


@pytest.mark.parametrize("size", [2, 3])
def test_layers_submitted_one_by_one_sum_in_rank_order(size):
    rng = np.random.default_rng(size)
    shapes = [(7, 5), (5,), (300, 40), (40,)]  # two layers: weight and bias each
    # Per rank. Frames are numbered on across submissions within a step and from 0 again in
    # the next step; the receivers assert both.
    grads = [[(rng.standard_normal(s) * 1e3).astype(np.float32) for s in shapes]
             for _ in range(size)]
    expected = [sum_in_order([grads[r][i] for r in range(size)]) for i in range(len(shapes))]
    channels = chain_channels(size)
    errors: list = []

    def rank_body(rank):
        seen: list = []
        reducer = Reducer(rank, size, links_for(channels, rank, seen))
        try:
            for step in (1, 2):
                arrays = [g.copy() for g in grads[rank]]
                for layer in (2, 0):  # last layer first, weight and bias together
                    reducer.submit(step, arrays[layer:layer + 2])
                reducer.wait()
                for got, want in zip(arrays, expected, strict=True):
                    assert np.array_equal(got, want)
        except Exception as exc:  # noqa: BLE001 - reported in the test thread
            errors.append(exc)
        finally:
            reducer.close()

    threads = [threading.Thread(target=rank_body, args=(r,)) for r in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for channel in channels.values():
        channel.close()
    assert not errors, errors


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

    reducer = Reducer(0, 2, links)
    try:
        reducer.submit(1, [np.ones(4, dtype=np.float32)])
        with pytest.raises(BrokenPipeError, match="replica 1 is gone"):
            reducer.wait()
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

    reducer = Reducer(0, 2, links)
    try:
        reducer.submit(1, [np.ones(4, dtype=np.float32)])
        with pytest.raises(InterruptedError):
            reducer.wait(interrupted=lambda: True)
    finally:
        release.set()
        reducer.close()
