"""One helper thread that works through jobs in the order they were submitted.

The worker hands work that may run beside its main thread (hashing gradients, reducing them with
the other replicas) to such a thread. The main thread later waits for the jobs it depends on;
a job that fails stops the thread, and the failure is raised in the main thread at its next
``wait`` or ``enqueue``, with the original exception type (a lost replica stays a
``PeerClosed``, so the worker reports it as the consequence it is).
"""

from __future__ import annotations

import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

_STOP = object()


class JobThread:
    """Subclasses implement :meth:`run_job` and submit jobs with :meth:`enqueue`."""

    def __init__(self, name: str, *, blocked_signals: Iterable[int] = ()) -> None:
        self._blocked = set(blocked_signals)
        self._cond = threading.Condition()
        self._jobs: deque[Any] = deque()
        self._pending = 0  # submitted and not yet finished
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name)
        self._thread.start()

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
            error = self._error
            raise type(error)(str(error)) from error

    def _run(self) -> None:
        if self._blocked:  # signals are the main thread's to take
            signal.pthread_sigmask(signal.SIG_BLOCK, self._blocked)
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
