"""The inbox's direct sources, read by the waiting thread over real pipes: frames in order, a
command interrupting a wait, failures named as a receiver thread names them."""

from __future__ import annotations

import os
import select
import threading
import time

import numpy as np
import pytest

from pipetrain.pipeline.partition import inbound_bytes_per_step
from pipetrain.runtime.inbox import Inbox, InboxFailure, PeerClosed, reads_directly
from pipetrain.runtime.spinning import poll_spinning, spin_budget
from pipetrain.wire.frames import Kind
from pipetrain.wire.pipe import PipeChannel, open_pipe


@pytest.fixture
def link():
    """(the reading end, the sending end) of one pipe, closed after the test."""
    read_fd, write_fd = open_pipe()
    reader, sender = PipeChannel(read_fd, None, name="in"), PipeChannel(None, write_fd, name="out")
    yield reader, sender
    reader.close()
    sender.close()


def frame(sender: PipeChannel, step: int, index: int) -> None:
    sender.send_frame(Kind.ACTIVATION, step, index, np.full(3, step * 10 + index, np.float32))


def test_a_direct_source_is_read_by_the_waiting_thread_in_order(link):
    reader, sender = link
    threads_before = set(threading.enumerate())
    inbox = Inbox()
    inbox.read_directly("upstream", reader, op_timeout_s=5)
    for index in range(3):
        frame(sender, 1, index)
    got = [inbox.get("upstream") for _ in range(3)]
    assert [(f.step, f.microbatch, float(f.array[0])) for f in got] == [
        (1, 0, 10.0), (1, 1, 11.0), (1, 2, 12.0)]
    assert set(threading.enumerate()) == threads_before  # no receiver thread was started


def test_a_command_on_the_fatal_source_interrupts_a_wait_at_once(link):
    reader, sender = link
    control_r, control_w = open_pipe()
    control, coordinator = (PipeChannel(control_r, None, name="control"),
                            PipeChannel(None, control_w, name="coordinator"))
    try:
        inbox = Inbox()
        inbox.read_directly("upstream", reader, op_timeout_s=5)
        inbox.read_directly("control", control, op_timeout_s=None, fatal=True)
        threading.Timer(0.05, lambda: coordinator.send_frame(
            Kind.CONTROL, 0, 0, np.frombuffer(b'{"type": "halt"}', np.uint8))).start()
        started = time.monotonic()
        with pytest.raises(InterruptedError):
            # interrupted() is the worker's check: a command waits in the control queue
            inbox.get("upstream", interrupted=lambda: inbox.depth("control") > 0)
        assert time.monotonic() - started < 0.4  # not the 0.5 s slice: the poll woke
        assert bytes(inbox.get("control").array) == b'{"type": "halt"}'
    finally:
        control.close()
        coordinator.close()


def test_pump_reads_the_fatal_source_without_waiting(link):
    reader, sender = link
    inbox = Inbox()
    inbox.read_directly("control", reader, op_timeout_s=None, fatal=True)
    inbox.pump()
    assert inbox.depth("control") == 0
    frame(sender, 4, 0)
    inbox.pump()
    assert inbox.depth("control") == 1


def test_a_closed_peer_fails_only_its_source_and_a_fatal_one_fails_all(link):
    reader, sender = link
    inbox = Inbox()
    inbox.read_directly("upstream", reader, op_timeout_s=5)
    frame(sender, 1, 0)
    sender.close()
    assert inbox.get("upstream").microbatch == 0  # what came before the end is delivered
    with pytest.raises(PeerClosed, match="upstream closed its pipe"):
        inbox.get("upstream")
    inbox.put("other", "kept")
    assert inbox.get("other") == "kept"

    read_fd, write_fd = open_pipe()
    control = PipeChannel(read_fd, None, name="control")
    os.close(write_fd)
    try:
        inbox.read_directly("control", control, op_timeout_s=None, fatal=True)
        with pytest.raises(PeerClosed):
            inbox.get("control")
        with pytest.raises(PeerClosed):
            inbox.get("other")  # the control pipe's end fails every source
    finally:
        control.close()


def test_a_corrupt_frame_is_an_inbox_failure_naming_the_source():
    read_fd, write_fd = open_pipe()
    reader = PipeChannel(read_fd, None, name="in")
    try:
        inbox = Inbox()
        inbox.read_directly("downstream", reader, op_timeout_s=5)
        os.write(write_fd, b"not a frame header at all, just bytes" * 2)
        with pytest.raises(InboxFailure, match="downstream: ProtocolError"):
            inbox.get("downstream")
    finally:
        reader.close()
        os.close(write_fd)


def test_only_a_pipe_that_holds_a_step_of_frames_is_read_directly(link):
    reader, sender = link
    capacity = reader.read_capacity()
    assert capacity is not None and capacity >= 64 * 1024
    assert reads_directly(reader, capacity)
    assert not reads_directly(reader, capacity + 1)
    assert sender.read_capacity() is None  # a write-only channel


def test_inbound_bytes_count_every_piece_cut_for_the_replica_rows():
    from pipetrain.config import build_config

    config = build_config({"layers": "64,32,16,10", "batch_size": 64, "microbatches": 4,
                           "dtype": "float32", "replicas": 2})
    model = config.model_spec()
    header = 64
    # A middle stage holding layer 1 (32 -> 16): in, 32 wide; out (gradients back), 16 wide.
    assert inbound_bytes_per_step(model, {1: (1, 2)}, header) == 32 * 32 * 4 + 4 * header
    # The first stage gets only gradients of its output; a lone stage gets nothing.
    assert inbound_bytes_per_step(model, {0: (0, 1)}, header) == 32 * 32 * 4 + 4 * header
    assert inbound_bytes_per_step(model, {0: (0, 3)}, header) == 0
    # Two pieces (interleaved): each piece's cuts count.
    assert inbound_bytes_per_step(model, {0: (0, 1), 2: (2, 3)}, header) == (
        32 * 32 * 4 + 4 * header) + (32 * 16 * 4 + 4 * header)


def test_poll_spinning_polls_for_its_budget_then_sleeps_for_the_timeout(link):
    reader, sender = link
    poller = select.poll()
    poller.register(reader.fileno(), select.POLLIN)
    started = time.perf_counter()
    assert poll_spinning(poller, 0.002, 0) == []  # nothing came: the budget, then no sleep
    assert time.perf_counter() - started >= 0.002
    started = time.perf_counter()
    assert poll_spinning(poller, 0.0, 30) == []  # no budget: straight to a 30 ms poll
    assert time.perf_counter() - started >= 0.025
    frame(sender, 1, 0)
    assert [fd for fd, _ in poll_spinning(poller, 1.0, None)] == [reader.fileno()]


def test_a_process_spins_only_with_a_cpu_of_its_own():
    cpus = len(os.sched_getaffinity(0))
    assert spin_budget(0.001, cpus) == 0.001
    assert spin_budget(0.001, cpus + 1) == 0.0
