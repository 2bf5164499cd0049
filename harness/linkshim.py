"""Faults on the real pipe between two stages: the channel the harness's hooks hand a stage.

Why a wrapper around the sending stage's channel rather than a relay process between the
stages: a relay would add a copy and a process to every link of every run for the sake of tests,
and it would need to parse frames to act "at step N" anyway. The wrapper sits in the sending
stage (installed at the ``wrap_channel`` hook, only for links the plan names), sees each frame's
step and micro-batch, and acts on the real pipe: it delays or throttles the write, flips bits in
the bytes that really cross the pipe (the receiver's CRC must catch them), or closes the write
end instead of sending a frame or right after it (the receiver reads end-of-file, the sender's
next send fails). A run with no link fault planned
keeps its channels as they are.

A fault is ``{"kind": "delay"|"throttle"|"corrupt"|"sever", "link": "0->1", "replica": 0,
"at_step": 5, "for_steps": 2, "microbatch": None, "when": "before", "id": 3, ...}`` with
``latency_ms`` / ``jitter_ms`` (delay), ``bandwidth_bytes_per_s`` (throttle), ``flips``
(corrupt). Its point is its first frame: the frame of ``microbatch`` in step ``at_step``, or the
step's first frame on the link. Delay and throttle then act on every frame of ``for_steps``
steps (0: to the end); corrupt and sever act on that one frame. Before acting the shim claims
the landing (``claim``): with the harness there, a fault lands once, the first time any worker
group reaches its frame.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pipetrain.wire.channel import Channel, ChannelClosed
from pipetrain.wire.frames import Frame, Kind, byte_view, describe, encode_header
from pipetrain.wire.pipe import PipeChannel

KINDS = ("delay", "throttle", "corrupt", "sever")
SPANNING = ("delay", "throttle")
# (fault, step, point) -> whether it acts here
Claim = Callable[[dict[str, Any], int, str], bool]


def faults_for(plan: list[dict[str, Any]], stage: int, neighbour: int, replica: int,
               generation: int | None) -> list[dict[str, Any]]:
    """The faults of ``plan`` on the link from ``stage`` to ``neighbour`` (in ``generation``,
    or in any when None: the harness decides which group they land in)."""
    link = f"{stage}->{neighbour}"
    return [fault for fault in plan
            if fault.get("link") == link and fault.get("replica", 0) == replica
            and (generation is None or fault.get("generation", 0) == generation)]


def frame_point(kind: Kind, microbatch: int, when: str = "before") -> str:
    """The ``point`` of a landing on a frame: ``send activation 2`` or ``sent gradient 0``."""
    return f"{'send' if when == 'before' else 'sent'} {kind.name.lower()} {microbatch}"


class FaultyChannel(Channel):
    """A :class:`PipeChannel` whose sends suffer the planned faults."""

    def __init__(self, inner: PipeChannel, plan: list[dict[str, Any]], seed: int = 0,
                 claim: Claim | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.plan = plan
        self.rng = random.Random(seed)  # noqa: S311 - jitter, not security
        self.claim = claim or (lambda fault, step, point: True)
        self._landed: dict[int, bool] = {}  # plan index -> acts (decided at its first frame)

    def _at_point(self, fault: dict[str, Any], step: int, microbatch: int) -> bool:
        wanted = fault.get("microbatch")
        return step == fault.get("at_step", 1) and (wanted is None or wanted == microbatch)

    def _active(self, kind: Kind, step: int, microbatch: int) -> list[dict[str, Any]]:
        active = []
        for index, fault in enumerate(self.plan):
            if index not in self._landed:
                if not self._at_point(fault, step, microbatch):
                    continue
                point = frame_point(kind, microbatch, fault.get("when", "before"))
                self._landed[index] = self.claim(fault, step, point)
                if self._landed[index]:
                    active.append(fault)
                continue
            if not self._landed[index] or fault["kind"] not in SPANNING:
                continue  # corrupt and sever act on their one frame only
            start, steps = fault.get("at_step", 1), fault.get("for_steps", 1)
            if step >= start and (steps == 0 or step < start + steps):
                active.append(fault)
        return active

    def send_frame(self, kind: Kind, step: int, microbatch: int, array: np.ndarray, *,
                   timeout_s: float | None = None) -> None:
        corrupt = sever_after = None
        for fault in self._active(kind, step, microbatch):
            if fault["kind"] == "delay":
                jitter = fault.get("jitter_ms", 0)
                time.sleep(max(0.0, fault.get("latency_ms", 10) +
                               self.rng.uniform(-jitter, jitter)) / 1000)
            elif fault["kind"] == "throttle":
                time.sleep(array.nbytes / float(fault.get("bandwidth_bytes_per_s", 1e6)))
            elif fault["kind"] == "sever" and fault.get("when", "before") == "after":
                sever_after = fault
            elif fault["kind"] == "sever":
                self._sever(step)
            elif fault["kind"] == "corrupt":
                corrupt = fault
        if corrupt is None:
            self.inner.send_frame(kind, step, microbatch, array, timeout_s=timeout_s)
        else:
            self._send_corrupted(corrupt, kind, step, microbatch, array, timeout_s)
        if sever_after is not None:
            # The frame got through; the receiver reads end-of-file when it next reads, and
            # this stage's next send on the link fails.
            self.inner.close_write()

    def _sever(self, step: int) -> None:
        self.inner.close_write()
        raise ChannelClosed(f"{self.name}: link severed by fault injection at step {step}")

    def _send_corrupted(self, fault: dict[str, Any], kind: Kind, step: int, microbatch: int,
                        array: np.ndarray, timeout_s: float | None) -> None:
        header = encode_header(kind, step, microbatch, array)
        payload = bytearray(byte_view(array))
        for _ in range(int(fault.get("flips", 1))):
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

    def read_capacity(self) -> int | None:
        return self.inner.read_capacity()

    def close(self) -> None:
        self.inner.close()
