"""Ranks of a replica chain as threads over real pipes, for the all-reduce tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from pipetrain.wire.frames import Kind
from pipetrain.wire.pipe import PipeChannel, open_pipe

LinksFor = Callable[[int], dict[str, Any]]  # step -> send/receive callables


def run_ranks(size: int, body: Callable[[int, LinksFor], Any]) -> list:
    """Run ``body(rank, links_for)`` in one thread per rank, the ranks joined in a chain of real
    pipes; returns their results. Receivers check that each frame is the REDUCE frame of the
    step and index they expect."""
    channels = {}
    for r in range(size - 1):
        fwd, back = open_pipe(), open_pipe()
        channels[r, "next"] = PipeChannel(back[0], fwd[1], name=f"{r}->next")
        channels[r + 1, "prev"] = PipeChannel(fwd[0], back[1], name=f"{r + 1}->prev")

    def recv(channel: PipeChannel, step: int, index: int):
        frame = channel.recv_frame(timeout_s=10)
        assert (frame.kind, frame.step, frame.microbatch) == (Kind.REDUCE, step, index)
        return frame.array

    def links_for(rank: int) -> LinksFor:
        nxt, prv = channels.get((rank, "next")), channels.get((rank, "prev"))

        def links(step: int) -> dict[str, Any]:
            def sender(channel):
                return (lambda i, a: channel.send_frame(Kind.REDUCE, step, i, a, timeout_s=10)
                        ) if channel else None

            def receiver(channel):
                return (lambda i: recv(channel, step, i)) if channel else None

            return {"send_next": sender(nxt), "recv_next": receiver(nxt),
                    "send_prev": sender(prv), "recv_prev": receiver(prv)}

        return links

    results: list = [None] * size
    errors: list = []

    def target(rank: int) -> None:
        try:
            results[rank] = body(rank, links_for(rank))
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
