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

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from system.allreduce import chain_allreduce_parts
from system.jobthread import JobThread

# (step) -> the chain's send/receive callables for that step's frames
LinksFor = Callable[[int], dict[str, Any]]


class Reducer(JobThread):
    def __init__(self, rank: int, size: int, links_for: LinksFor, *,
                 blocked_signals: Iterable[int] = ()) -> None:
        self.rank, self.size = rank, size
        self._links_for = links_for
        self._step: int | None = None
        self._next_index = 0
        super().__init__("all-reduce", blocked_signals=blocked_signals)

    def submit(self, step: int, arrays: list[np.ndarray]) -> None:
        """All-reduce ``arrays`` in place, after everything submitted before them."""
        self.enqueue((step, arrays))

    def run_job(self, job: tuple[int, list[np.ndarray]]) -> None:
        step, arrays = job
        if step != self._step:  # chunk frames are numbered from 0 in every step
            self._step, self._next_index = step, 0
        self._next_index = chain_allreduce_parts(
            arrays, self.rank, self.size, first_index=self._next_index, **self._links_for(step))
