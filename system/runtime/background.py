"""Work a worker hands to helper threads, off the step's critical path: hashing and all-reduce.

A :class:`JobThread` works through jobs in the order they were submitted; the main thread later
waits for the jobs it depends on. A job that fails stops the thread, and the failure is raised in
the main thread at its next ``wait`` or ``enqueue`` as a :class:`JobFailed` caused by the
original exception (a lost replica stays recognisable as a ``PeerClosed`` cause).

* :class:`DigestThread` hashes a step's finished gradients and reports the digests. The stage
  accumulates the next step into a second set of gradient arrays meanwhile
  (``Segment.swap_grad_buffers``), and hashlib releases the GIL on large buffers, so hashing
  runs beside the next step's compute on whichever core is idle. A stage whose gradients are
  small (:data:`INLINE_DIGEST_BYTES`) hashes them on the main thread instead, right after its
  ``StepDone`` (:class:`InlineDigester`): there the hand-off cost more than the hashing.
* :class:`ReduceThread` sums each layer's gradients with the other replicas
  (:func:`pipetrain.wire.allreduce.chain_allreduce_parts`) as soon as the stage reports the
  layer final (``Stage.on_grads_final``, last layer first), while the main thread computes the
  layers below. Every replica submits the same layers in the same order, so the chunk frames
  line up, and every element is still summed ``((g0 + g1) + g2) + ...``.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from pipetrain import tracing
from pipetrain.nn.digest import array_digest
from pipetrain.threads import start_helper
from pipetrain.wire.allreduce import chain_allreduce_parts

_STOP = object()


class JobFailed(RuntimeError):
    """A helper thread's job failed; ``__cause__`` is what it raised."""


class JobThread:
    """Subclasses implement :meth:`run_job` and submit jobs with :meth:`enqueue`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._cond = threading.Condition()
        self._jobs: deque[Any] = deque()
        self._pending = 0  # submitted and not yet finished
        self._error: BaseException | None = None
        self._thread = start_helper(self._run, name=name)

    def run_job(self, job: Any) -> None:
        raise NotImplementedError

    def enqueue(self, job: Any) -> None:
        with self._cond:
            self._raise_if_failed()
            self._jobs.append(job)
            self._pending += 1
            self._cond.notify_all()

    def wait(self, at_most_pending: int = 0, *,
             interrupted: Callable[[], bool] = lambda: False) -> None:
        """Until no more than ``at_most_pending`` jobs are unfinished. Wakes every 0.5 s to
        call ``interrupted`` (the worker's liveness and SIGTERM check) and raises
        InterruptedError when it says so."""
        with self._cond:
            while self._pending > at_most_pending and self._error is None:
                if interrupted():
                    raise InterruptedError("interrupted by a signal")
                self._cond.wait(0.5)
            self._raise_if_failed()

    def close(self) -> None:
        """Stop the thread (jobs not started yet are dropped) and join it. A job in progress
        must be able to finish or fail: the worker first fails the inbox it may wait on."""
        with self._cond:
            self._jobs.clear()
            self._jobs.append(_STOP)
            self._cond.notify_all()
        self._thread.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise JobFailed(f"{self.name} thread: {type(self._error).__name__}: "
                            f"{self._error}") from self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                job = self._jobs.popleft()
            if job is _STOP:
                return
            try:
                self.run_job(job)
            except BaseException as exc:  # noqa: BLE001 - raised in the main thread instead
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()


# (step, hex digest per parameter or None where another replica hashes it)
DigestReport = Callable[[int, list[str | None]], None]


class DigestThread(JobThread):
    def __init__(self, report: DigestReport) -> None:
        self._report = report
        super().__init__("digester")

    def submit(self, step: int, arrays: list[np.ndarray | None]) -> None:
        """Hash ``arrays`` (None: not this worker's share, reported as None) and report them."""
        self.enqueue((step, arrays))

    def run_job(self, job: tuple[int, list[np.ndarray | None]]) -> None:
        _hash_and_report(job, self._report)

    def flush(self) -> None:
        """Nothing to do: the thread hashes as soon as a step is submitted."""

    def take(self, step: int) -> list[str | None] | None:
        """Never: the thread reports the digests itself (``Digests``)."""
        return None


def _hash_and_report(job: tuple[int, list[np.ndarray | None]], report: DigestReport) -> None:
    report(job[0], _hashed(job))


def _hashed(job: tuple[int, list[np.ndarray | None]]) -> list[str | None]:
    step, arrays = job
    with tracing.current().span("digest", tracing.DIGEST, {"step": step}):
        return [None if a is None else array_digest(a).hex() for a in arrays]


# Gradients up to this size are hashed on the main thread: XXH3 takes about 1 us per 10 KiB
# here, while handing a step to the digester thread (a wake-up, then the GIL going back and
# forth) took about 70 us of the main thread's step on a tiny model (py-spy, issue 19).
INLINE_DIGEST_BYTES = 256 * 1024


class InlineDigester:
    """The :class:`DigestThread` interface without a thread, for a stage whose gradients are
    small: ``submit`` keeps the step, and :meth:`take` hashes it for the worker to send in its
    ``StepDone`` (one message, not two: the coordinator emits the step's event as soon as it
    has both). :meth:`flush` or any ``wait`` hashes and reports a step not taken. The arrays are
    the same ones a thread would hash: the stage leaves them alone until the step after next
    (``Segment.swap_grad_buffers``)."""

    def __init__(self, report: DigestReport) -> None:
        self._report = report
        self._job: tuple[int, list[np.ndarray | None]] | None = None

    def submit(self, step: int, arrays: list[np.ndarray | None]) -> None:
        self.flush()
        self._job = (step, arrays)

    def flush(self) -> None:
        if self._job is None:
            return
        step = self._job[0]
        digests = self.take(step)
        try:
            self._report(step, digests)
        except Exception as exc:  # the same as the thread's failure: a JobFailed with a cause
            raise JobFailed(f"digester: {type(exc).__name__}: {exc}") from exc

    def take(self, step: int) -> list[str | None] | None:
        """The digests of ``step``, submitted last, hashed now (not reported)."""
        job = self._job
        if job is None or job[0] != step:
            return None
        self._job = None
        try:
            return _hashed(job)
        except Exception as exc:  # the same as the thread's failure: a JobFailed with a cause
            raise JobFailed(f"digester: {type(exc).__name__}: {exc}") from exc

    def wait(self, at_most_pending: int = 0, *,
             interrupted: Callable[[], bool] = lambda: False) -> None:
        if at_most_pending == 0:
            self.flush()

    def close(self) -> None:
        self._job = None  # as the thread does with a job not started yet


def make_digester(report: DigestReport, grad_bytes: int) -> DigestThread | InlineDigester:
    """Inline for small gradients (:data:`INLINE_DIGEST_BYTES`), else a thread."""
    if grad_bytes <= INLINE_DIGEST_BYTES:
        return InlineDigester(report)
    return DigestThread(report)


# (step) -> the chain's send/receive callables for that step's frames
LinksFor = Callable[[int], dict[str, Any]]
# (step, parameter names) -> None: called on this thread before each layer's reduction
BeforeReduce = Callable[[int, list[str]], None]


class ReduceThread(JobThread):
    def __init__(self, rank: int, size: int, links_for: LinksFor, *,
                 before_reduce: BeforeReduce = lambda step, names: None) -> None:
        self.rank, self.size = rank, size
        self._links_for = links_for
        self._before_reduce = before_reduce
        self._step: int | None = None
        self._next_index = 0
        super().__init__("all-reduce")

    def submit(self, step: int, grads: dict[str, np.ndarray]) -> None:
        """All-reduce the arrays of ``grads`` in place, after everything submitted before."""
        self.enqueue((step, grads))

    def run_job(self, job: tuple[int, dict[str, np.ndarray]]) -> None:
        step, grads = job
        if step != self._step:  # chunk frames are numbered from 0 in every step
            self._step, self._next_index = step, 0
        self._before_reduce(step, list(grads))
        with tracing.current().span("all-reduce", tracing.ALLREDUCE,
                                    {"step": step, "params": list(grads)}):
            self._next_index = chain_allreduce_parts(
                list(grads.values()), self.rank, self.size, first_index=self._next_index,
                **self._links_for(step))
