"""The digest helper thread and the double-buffered gradients it relies on."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pipetrain.nn import Dense, Segment
from pipetrain.nn.digest import array_digest
from pipetrain.runtime.background import (
    INLINE_DIGEST_BYTES,
    DigestThread,
    InlineDigester,
    JobFailed,
    make_digester,
)


def test_digests_match_and_keep_order_and_shares():
    reports: list[tuple[int, list]] = []
    arrays = [np.arange(n, dtype=np.float32) for n in (3, 1000, 0, 70_000)]
    digester = DigestThread(lambda step, digests: reports.append((step, digests)))
    try:
        digester.submit(7, arrays)
        digester.submit(8, [None, arrays[1], None, arrays[3]])
        digester.wait()
    finally:
        digester.close()
    expected = [array_digest(a).hex() for a in arrays]
    assert reports == [(7, expected), (8, [None, expected[1], None, expected[3]])]


def test_wait_blocks_until_at_most_n_jobs_are_pending():
    release = threading.Event()
    reported: list[int] = []

    def report(step, digests):
        release.wait()
        reported.append(step)

    digester = DigestThread(report)
    waiter_done = threading.Event()
    try:
        digester.submit(1, [np.zeros(4)])
        digester.submit(2, [np.zeros(4)])
        waiter = threading.Thread(target=lambda: (digester.wait(at_most_pending=1),
                                                  waiter_done.set()))
        waiter.start()
        assert not waiter_done.wait(0.2)  # two jobs pending, the first one held
        release.set()
        waiter.join()
        assert waiter_done.is_set() and reported[0] == 1
        digester.wait()
        assert reported == [1, 2]
    finally:
        release.set()
        digester.close()


def test_a_failed_report_surfaces_in_the_main_thread():
    def report(step, digests):
        raise BrokenPipeError("coordinator gone")

    digester = DigestThread(report)
    try:
        digester.submit(1, [np.zeros(4)])
        with pytest.raises(JobFailed, match="coordinator gone") as failed:
            digester.wait()
        assert isinstance(failed.value.__cause__, BrokenPipeError)  # the original, chained
        with pytest.raises(JobFailed):
            digester.submit(2, [np.zeros(4)])
    finally:
        digester.close()


def test_close_drops_jobs_not_started_and_joins():
    digester = DigestThread(lambda step, digests: None)
    digester.close()
    assert not any(t.name == "digester" for t in threading.enumerate())


def test_swapped_gradient_buffers_leave_the_previous_step_intact():
    rng = np.random.default_rng(0)
    layer = Dense(0, rng.standard_normal((5, 3)), rng.standard_normal(3))
    segment = Segment([layer])
    x, g = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))

    def one_step():
        segment.swap_grad_buffers()
        segment.zero_grads()
        segment.forward(0, x)
        segment.backward(0, g)
        return layer.grad["weight"], layer.grad["bias"]

    first_w, first_b = one_step()
    kept = first_w.copy(), first_b.copy()
    second_w, _ = one_step()
    assert second_w is not first_w  # the next step accumulates elsewhere...
    assert np.array_equal(first_w, kept[0]) and np.array_equal(first_b, kept[1])  # ...untouched
    assert np.array_equal(second_w, first_w)  # same inputs, same gradient
    third_w, _ = one_step()
    assert third_w is first_w  # two sets, alternating


def test_the_inline_digester_reports_what_the_thread_does_after_flush_or_wait():
    arrays = [np.arange(n, dtype=np.float32) for n in (3, 1000, 0, 70_000)]
    by_thread: list[tuple[int, list]] = []
    thread = DigestThread(lambda step, digests: by_thread.append((step, digests)))
    try:
        thread.submit(7, arrays)
        thread.submit(8, [None, arrays[1], None, arrays[3]])
        thread.wait()
    finally:
        thread.close()
    inline_reports: list[tuple[int, list]] = []
    inline = InlineDigester(lambda step, digests: inline_reports.append((step, digests)))
    inline.submit(7, arrays)
    assert inline_reports == []  # kept until the worker has sent its StepDone
    inline.wait(at_most_pending=1)  # the start of the next step: one may stay pending
    assert inline_reports == []
    inline.flush()
    assert inline_reports == by_thread[:1]
    inline.submit(8, [None, arrays[1], None, arrays[3]])
    inline.wait()  # a halt: every pending digest is sent
    assert inline_reports == by_thread
    inline.flush()  # nothing pending: nothing sent twice
    assert inline_reports == by_thread
    # The worker's way: take a step's digests for its StepDone; nothing is reported then.
    inline.submit(9, arrays)
    assert inline.take(8) is None  # not the step submitted: left pending
    assert inline.take(9) == by_thread[0][1]
    assert inline.take(9) is None
    inline.wait()
    assert inline_reports == by_thread
    assert thread.take(9) is None  # a thread always reports itself


def test_an_inline_report_that_fails_raises_a_job_failed_with_the_cause():
    def report(step, digests):
        raise BrokenPipeError("coordinator gone")

    inline = InlineDigester(report)
    inline.submit(1, [np.zeros(4)])
    with pytest.raises(JobFailed, match="coordinator gone") as failed:
        inline.flush()
    assert isinstance(failed.value.__cause__, BrokenPipeError)


def test_small_gradients_are_hashed_inline_and_large_ones_on_a_thread():
    assert isinstance(make_digester(lambda step, digests: None, INLINE_DIGEST_BYTES),
                      InlineDigester)
    big = make_digester(lambda step, digests: None, INLINE_DIGEST_BYTES + 1)
    try:
        assert isinstance(big, DigestThread)
    finally:
        big.close()
