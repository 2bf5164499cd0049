"""Faults on the real pipe between two stages: the channel the harness's hooks hand a stage.

Why a wrapper around the sending stage's channel rather than a relay process between the
stages: a relay would add a copy and a process to every link of every run for the sake of tests,
and it would need to parse frames to act "at step N" anyway. The wrapper sits in the sending
stage (installed at the ``wrap_channel`` hook, only for links the plan names), sees each frame's
step, and acts on the real pipe: it delays or throttles the write, flips bits in the bytes that
really cross the pipe (the receiver's CRC must catch them), or closes the write end (the
receiver reads end-of-file). A run with no link fault planned keeps its channels as they are.

A fault is ``{"kind": "delay"|"throttle"|"corrupt"|"sever", "link": "0->1", "replica": 0,
"at_step": 5, "for_steps": 2, "generation": 0, ...}`` with ``latency_ms`` / ``jitter_ms``
(delay), ``bandwidth_bytes_per_s`` (throttle), ``flips`` (corrupt). ``for_steps`` 0 means until
the end. A fault acts in one worker generation (0: before any restart) so a recovered run can
finish.
"""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np

from pipetrain.wire.channel import Channel, ChannelClosed
from pipetrain.wire.frames import Frame, Kind, byte_view, describe, encode_header
from pipetrain.wire.pipe import PipeChannel

KINDS = ("delay", "throttle", "corrupt", "sever")


def faults_for(plan: list[dict[str, Any]], stage: int, neighbour: int, replica: int,
               generation: int) -> list[dict[str, Any]]:
    """The faults of ``plan`` on the link from ``stage`` to ``neighbour`` in this group."""
    link = f"{stage}->{neighbour}"
    return [fault for fault in plan
            if fault.get("link") == link and fault.get("replica", 0) == replica
            and fault.get("generation", 0) == generation]


class FaultyChannel(Channel):
    """A :class:`PipeChannel` whose sends suffer the planned faults."""

    def __init__(self, inner: PipeChannel, plan: list[dict[str, Any]], seed: int = 0) -> None:
        self.inner = inner
        self.name = inner.name
        self.plan = plan
        self.rng = random.Random(seed)  # noqa: S311 - jitter, not security

    def _active(self, step: int) -> list[dict[str, Any]]:
        active = []
        for fault in self.plan:
            start, steps = fault.get("at_step", 1), fault.get("for_steps", 1)
            if step >= start and (steps == 0 or step < start + steps):
                active.append(fault)
        return active

    def send_frame(self, kind: Kind, step: int, microbatch: int, array: np.ndarray, *,
                   timeout_s: float | None = None) -> None:
        corrupt = None
        for fault in self._active(step):
            if fault["kind"] == "delay":
                jitter = fault.get("jitter_ms", 0)
                time.sleep(max(0.0, fault.get("latency_ms", 10) +
                               self.rng.uniform(-jitter, jitter)) / 1000)
            elif fault["kind"] == "throttle":
                time.sleep(array.nbytes / float(fault.get("bandwidth_bytes_per_s", 1e6)))
            elif fault["kind"] == "sever":
                self.inner.close_write()
                raise ChannelClosed(f"{self.name}: link severed by fault injection at step {step}")
            elif fault["kind"] == "corrupt":
                corrupt = fault
        if corrupt is None:
            self.inner.send_frame(kind, step, microbatch, array, timeout_s=timeout_s)
            return
        header = encode_header(kind, step, microbatch, array)
        payload = bytearray(byte_view(array))
        for _ in range(int(corrupt.get("flips", 1))):
            if payload:
                position = self.rng.randrange(len(payload))
                payload[position] ^= 1 << self.rng.randrange(8)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.inner.write_buffers([memoryview(header), memoryview(payload)], deadline, timeout_s,
                                 describe(kind, step, microbatch))

    def recv_frame(self, *, timeout_s: float | None = None,
                   out: np.ndarray | None = None) -> Frame:
        return self.inner.recv_frame(timeout_s=timeout_s, out=out)

    def fileno(self) -> int:
        return self.inner.fileno()

    def close(self) -> None:
        self.inner.close()
