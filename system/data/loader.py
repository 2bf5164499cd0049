"""Threaded prefetch of micro-batches, delivered in sampler order whatever the threads' timing.

Items are numbered in sampler order: item ``k`` is step ``first + k // M``, micro-batch ``k % M``.

    loader-0 ─┐ 1. take a slot   (Semaphore: at most `prefetch` items in flight)
    loader-1 ─┤ 2. claim next k  (under the Condition's lock)
    loader-N ─┘ 3. gather, augment, cast; ready[k] = MicroBatch
                        │
                        v
    reorder buffer {k: MicroBatch} ──> main thread: get(step, mb) takes strictly
                                       k = 0, 1, 2, ... and frees the slot

Why a reorder buffer and not a ``queue.Queue``: a queue hands items out in completion order,
which depends on thread timing; keyed by item number, the order depends on the sampler only. The
slot is taken *before* the claim, so an item in production already counts against the bound: with
a stalled consumer at most ``prefetch`` micro-batches exist and the loaders sleep. The loader
owns its threads: ``stop()`` (or leaving the ``with`` block) wakes and joins every one, and the
first failure in any thread stops the others and is raised by ``get()``. Waits never poll: each
wait is woken by whoever changes what it waits for, ``stop()`` included.

What an item holds is computed by the pure :func:`prepare_microbatch`, which the single-process
reference can call directly: the bits do not depend on which thread ran it. Threads overlap
loading with compute only where numpy releases the GIL (copies, large arrays); the per-sample
generators of the augmentation are GIL-bound, so one or two threads are enough.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from functools import partial

import numpy as np

from pipetrain import hooks
from pipetrain.data.augment import AUGMENTATIONS
from pipetrain.data.workload import Workload
from pipetrain.threads import start_helper


class LoaderError(RuntimeError):
    """A loader thread failed (``__cause__`` is the original error), or the loader was stopped."""


class OrderError(ValueError):
    """``get()`` asked for an item other than the next one in sampler order."""


@dataclass(frozen=True, eq=False)
class MicroBatch:
    step: int  # global optimizer step, from 1
    microbatch: int
    indices: np.ndarray  # sample indices into the workload
    x: np.ndarray | None  # inputs (C-contiguous, the model's dtype), None when not needed
    y: np.ndarray | None  # int labels, None when not needed


def prepare_microbatch(
    workload: Workload, step: int, microbatch: int, *, replica: int, replicas: int,
    microbatches: int, need_x: bool, need_y: bool, augment: str | None, seed: int, dtype,
) -> MicroBatch:
    """One micro-batch of this replica: gather, augment, cast. Pure: same arguments, same bits."""
    epoch, step_in_epoch = workload.locate(step)
    indices = workload.batches.microbatch(epoch, step_in_epoch, replicas, microbatches, replica,
                                          microbatch)
    x = None
    if need_x:
        x = workload.x[indices]  # fancy indexing copies: the dataset is never written
        if augment is not None:  # augmentations see (samples, features); images are flattened
            x = AUGMENTATIONS[augment](x.reshape(len(x), -1), indices, seed,
                                       epoch).reshape(x.shape)
        # Tokens stay integers; numbers take the model's dtype.
        x = np.ascontiguousarray(x, dtype=None if np.issubdtype(x.dtype, np.integer) else dtype)
    y = workload.y[indices] if need_y else None
    return MicroBatch(step, microbatch, indices, x, y)


# A micro-batch up to this size is loaded by the worker's main thread between steps: gathering
# a few rows takes microseconds, while handing them over from a loader thread (a wake-up, then
# the GIL going back and forth) cost the tiny model's step more than the loading (issue 19).
INLINE_ITEM_BYTES = 64 * 1024
THREADS = 2  # when a micro-batch is bigger: enough, the GIL-bound parts being serial anyway


def auto_threads(workload: Workload, *, replicas: int, microbatches: int, augment: bool) -> int:
    """The loader threads a stage gets unless the config says: 0 (the main thread) for small
    micro-batches without augmentation, else :data:`THREADS`."""
    rows = -(-workload.batches.batch_size // (replicas * microbatches))
    item_bytes = rows * int(np.prod(workload.x.shape[1:])) * workload.x.itemsize
    return 0 if item_bytes <= INLINE_ITEM_BYTES and not augment else THREADS


class Loader:
    """Prefetches this stage's micro-batches with ``threads`` threads; single consumer."""

    def __init__(
        self, workload: Workload, *, replica: int, replicas: int, microbatches: int,
        need_x: bool, need_y: bool, threads: int = 2, prefetch: int = 4,
        augment: str | None = None, seed: int, dtype, place: hooks.Place | None = None,
    ) -> None:
        for name, value, low in (("threads", threads, 0), ("prefetch", prefetch, 1),
                                 ("replicas", replicas, 1), ("microbatches", microbatches, 1)):
            if value < low:
                raise ValueError(f"loader: {name} must be >= {low}, got {value}")
        if not 0 <= replica < replicas:
            raise ValueError(f"loader: replica {replica} outside 0..{replicas - 1}")
        if augment is not None and augment not in AUGMENTATIONS:
            raise ValueError(f"loader: unknown augmentation {augment!r} "
                             f"(choose from {sorted(AUGMENTATIONS)} or None)")
        if not (need_x or need_y):
            raise ValueError("loader: a stage that needs neither inputs nor labels needs no loader")
        self._workload = workload
        self._prepare = partial(prepare_microbatch, workload, replica=replica, replicas=replicas,
                                microbatches=microbatches, need_x=need_x, need_y=need_y,
                                augment=augment, seed=seed, dtype=dtype)
        self._microbatches, self._num_threads = microbatches, threads
        self._prefetch = prefetch
        self._place = place  # who this loader serves, for the loader_item hook
        # Semaphore: a counted bound is exactly "at most `prefetch` items in flight"; acquire
        # blocks a producer without CPU until the consumer frees a slot (back-pressure).
        self._slots = threading.Semaphore(prefetch)
        # Condition: the reorder buffer and counters change under one lock, and each waiter
        # (the consumer for its item, pause() for idle producers) re-checks its own predicate.
        self._cond = threading.Condition()
        # Event: stop is a one-way latch every thread can test without the lock.
        self._stopping = threading.Event()
        # Event: "may produce"; cleared by pause(), a paused producer sleeps in wait() on it.
        self._may_produce = threading.Event()
        self._may_produce.set()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._first = self._count = self._next_claim = self._next_take = 0
        self._ready: dict[int, MicroBatch] = {}
        self._in_production = self._produced = self._max_depth = 0
        self._paused = False
        self._error: tuple[int, BaseException] | None = None
        self._wait_s = 0.0
        # Slots of taken items not yet given back (release_taken); None: each get gives its
        # slot back at once (the default).
        self._held: int | None = None

    def _item(self, k: int) -> tuple[int, int]:
        return self._first + k // self._microbatches, k % self._microbatches

    def start(self, first_step: int, last_step: int) -> None:
        """Produce every micro-batch of steps ``first_step..last_step`` (inclusive), in order."""
        if self._started or self._stopping.is_set():
            raise RuntimeError("loader: start() runs once; make a new Loader for other steps")
        total = self._workload.total_steps
        if not (1 <= first_step <= last_step + 1 and last_step <= total):
            raise ValueError(f"loader: steps {first_step}..{last_step} outside 1..{total}")
        self._first, self._count = first_step, (last_step - first_step + 1) * self._microbatches
        self._started = True
        for t in range(self._num_threads):
            self._threads.append(start_helper(self._produce, name=f"loader-{t}"))

    def _produce(self) -> None:
        while True:
            self._may_produce.wait()
            self._slots.acquire()
            with self._cond:
                if self._stopping.is_set() or self._next_claim >= self._count:
                    self._slots.release()  # hand the wake-up on to a sibling waiting for a slot
                    return
                if self._paused:  # paused after our wait(): give the slot back, sleep again
                    self._slots.release()
                    continue
                k, self._next_claim = self._next_claim, self._next_claim + 1
                self._in_production += 1
            step, microbatch = self._item(k)
            item, error = None, None
            try:
                hooks.current().loader_item(self._place, step, microbatch)
                item = self._prepare(step, microbatch)
            except BaseException as exc:  # any failure must reach the consumer
                error = exc
            with self._cond:
                self._in_production -= 1
                if error is None:
                    self._ready[k] = item
                    self._produced += 1
                    self._max_depth = max(self._max_depth, len(self._ready))
                elif self._error is None:
                    self._error = (k, error)
                self._cond.notify_all()
            if error is not None:
                self._halt()
                return

    def get(self, step: int, microbatch: int, timeout_s: float | None = None) -> MicroBatch:
        """The micro-batch ``(step, microbatch)``, which must be the next one in sampler order."""
        with self._cond:
            k = self._next_take
            if not self._started:
                raise RuntimeError("loader: get() before start()")
            if k >= self._count:
                last = self._first + self._count // self._microbatches - 1
                raise OrderError(f"loader: get(step {step}, micro-batch {microbatch}) after "
                                 f"every item of steps {self._first}..{last} was delivered")
            if (step, microbatch) != self._item(k):
                want_step, want_mb = self._item(k)
                raise OrderError(f"loader: get(step {step}, micro-batch {microbatch}) out of "
                                 f"order: the next item is step {want_step} micro-batch "
                                 f"{want_mb} (items come in sampler order, each once)")
            if not self._num_threads:
                return self._make_here(k, step, microbatch)
            if self._held and self._next_claim <= k:
                # Item k is not even claimed: every slot may be held here, so give them back
                # (holding may delay the producers, never stop them).
                self._slots.release(self._held)
                self._held = 0
            began = time.perf_counter()
            ready = self._cond.wait_for(lambda: k in self._ready or self._error is not None
                                        or self._stopping.is_set(), timeout_s)
            self._wait_s += time.perf_counter() - began
            if self._error is not None:
                raise self._failed("loader thread")
            if k not in self._ready:
                if not ready:
                    raise TimeoutError(f"loader: step {step} micro-batch {microbatch} not "
                                       f"ready after {timeout_s} s (paused or stalled?)")
                raise LoaderError(f"loader stopped before step {step} micro-batch "
                                  f"{microbatch} was prepared")
            item = self._ready.pop(k)
            self._next_take += 1
            if self._held is not None:
                self._held += 1
                return item
        self._slots.release()
        return item

    def _make_here(self, k: int, step: int, microbatch: int) -> MicroBatch:
        """Without threads the consumer takes what :meth:`fill` made, or prepares the item
        itself now."""
        item = self._ready.pop(k, None)
        if item is None and self._error is not None and self._error[0] == k:
            raise self._failed("loader")  # met by fill(): raised where a thread's would be
        if item is None:
            began = time.perf_counter()
            try:
                item = self._prepare_here(k)
            finally:
                self._wait_s += time.perf_counter() - began
        self._next_take = k + 1
        return item

    def _prepare_here(self, k: int) -> MicroBatch:
        step, microbatch = self._item(k)
        if self._stopping.is_set():
            raise LoaderError(f"loader stopped before step {step} micro-batch {microbatch} was "
                              "prepared")
        try:
            hooks.current().loader_item(self._place, step, microbatch)
            item = self._prepare(step, microbatch)
        except Exception as exc:
            self._error = (k, exc)
            raise self._failed("loader") from exc
        self._next_claim = max(self._next_claim, k + 1)
        self._produced += 1
        return item

    def _failed(self, who: str) -> LoaderError:
        """The recorded failure, for whoever asks for its item (``__cause__``: the original)."""
        k, exc = self._error
        step, microbatch = self._item(k)
        error = LoaderError(f"{who} failed preparing step {step} micro-batch {microbatch}: "
                            f"{type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error

    def fill(self) -> None:
        """Without threads: prepare items ahead, up to ``prefetch``, here and now (a worker
        calls this after its reply, while the coordinator turns the step round)."""
        if self._num_threads or not self._started:
            return
        with self._cond:
            while (not self._paused and self._error is None and self._next_claim < self._count
                   and self._next_claim - self._next_take < self._prefetch):
                k = self._next_claim
                try:
                    self._ready[k] = self._prepare_here(k)
                except LoaderError:
                    return  # kept for get(k), which raises it in its step
                self._max_depth = max(self._max_depth, len(self._ready))

    def hold_slots(self) -> None:
        """From now on ``get`` keeps the slots of the items it takes until
        :meth:`release_taken`, or until the item it wants is not even claimed: a worker gives
        a step's slots back after its reply, where waking the producers no longer delays the
        step (each wake-up cost the consumer ~70 us on a tiny model, issue 19)."""
        with self._cond:
            if self._held is None:
                self._held = 0

    def release_taken(self) -> None:
        """Give back the slots :meth:`hold_slots` kept: the producers go on."""
        with self._cond:
            held, self._held = self._held, (0 if self._held is not None else None)
        if held:
            self._slots.release(held)

    def pause(self) -> None:
        """Produce nothing new; returns once no item is in production (loaders idle, no CPU).

        Items already prepared can still be taken with ``get()``; one not yet prepared waits
        for ``resume()``."""
        with self._cond:
            self._paused = True
            self._may_produce.clear()
            self._cond.wait_for(lambda: self._in_production == 0)

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._may_produce.set()

    def _halt(self) -> None:
        with self._cond:
            if self._stopping.is_set():
                return
            self._stopping.set()
            self._cond.notify_all()  # the consumer and pause() re-check and see the stop
        self._may_produce.set()  # paused producers wake and see the stop
        if self._num_threads:
            self._slots.release(self._num_threads)  # so do producers waiting for a slot

    def stop(self) -> None:
        """End production and join every loader thread; safe to call more than once."""
        self._halt()
        for thread in self._threads:
            thread.join()

    def stats(self) -> dict[str, int | float | bool]:
        with self._cond:
            return {
                "items_produced": self._produced,
                "items_consumed": self._next_take,
                "consumer_wait_s": self._wait_s,
                "queue_depth": len(self._ready),
                "max_queue_depth": self._max_depth,
                "in_production": self._in_production,
                "paused": self._paused,
            }

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
