"""The all-reduce of a replicated stage on a helper thread, overlapped with backward.

A layer's weight gradient is final as soon as the last micro-batch's weight pass has gone
through that layer; the layers below it still have GEMMs to do. The stage reports each layer
then (``Stage.on_grads_final``, last layer first) and the worker hands its arrays to this
thread, which runs :func:`system.allreduce.chain_allreduce_parts` on them while the main thread
computes the next layer. Each element is still summed ``((g0 + g1) + g2) + ...`` in replica
order, and every replica submits the same layers in the same order (the schedule is the same),
so the chunk frames line up and the result is bitwise what the reference computes.
The main thread calls :meth:`Reducer.wait` before it uses the gradients.
"""

from __future__ import annotations

import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from system.allreduce import chain_allreduce_parts

# (step) -> the chain's send/receive callables for that step's frames
LinksFor = Callable[[int], dict[str, Any]]


class Reducer:
    def __init__(self, rank: int, size: int, links_for: LinksFor, *,
                 blocked_signals: Iterable[int] = ()) -> None:
        self.rank, self.size = rank, size
        self._links_for = links_for
        self._blocked = set(blocked_signals)
        self._cond = threading.Condition()
        self._jobs: deque[tuple[int, list[np.ndarray]] | None] = deque()
        self._pending = 0
        self._error: BaseException | None = None
        self._step, self._next_index = None, 0
        self._thread = threading.Thread(target=self._run, name="all-reduce")
        self._thread.start()

    def submit(self, step: int, arrays: list[np.ndarray]) -> None:
        """All-reduce ``arrays`` in place, after everything submitted before them."""
        with self._cond:
            self._jobs.append((step, arrays))
            self._pending += 1
            self._cond.notify_all()

    def wait(self, interrupted: Callable[[], bool] = lambda: False) -> None:
        """Until everything submitted is reduced; re-raises the thread's failure. Wakes every
        0.5 s to call ``interrupted`` (the worker's liveness and SIGTERM check)."""
        with self._cond:
            while self._pending and self._error is None:
                if interrupted():
                    raise InterruptedError("interrupted by a signal")
                self._cond.wait(0.5)
            if self._error is not None:
                error = self._error
                raise type(error)(str(error)) from error

    def close(self) -> None:
        with self._cond:
            self._jobs.clear()
            self._jobs.append(None)
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        if self._blocked:  # signals are the main thread's to take
            signal.pthread_sigmask(signal.SIG_BLOCK, self._blocked)
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                job = self._jobs.popleft()
            if job is None:
                return
            step, arrays = job
            if step != self._step:  # chunk frames are numbered from 0 in every step
                self._step, self._next_index = step, 0
            try:
                self._next_index = chain_allreduce_parts(
                    arrays, self.rank, self.size, first_index=self._next_index,
                    **self._links_for(step))
            except BaseException as exc:  # noqa: BLE001 - surfaced to the main thread by wait()
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()
