"""The coordinator's judgement of silence: what waits in a pipe is no silence, and time the
coordinator itself was not running counts for no worker (real pipes, no processes)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from pipetrain.config import TrainConfig
from pipetrain.runtime import messages
from pipetrain.runtime.coordinator import Coordinator
from pipetrain.runtime.diagnosis import WorkerFailed
from pipetrain.runtime.launcher import PipeLauncher, WorkerHandle
from pipetrain.runtime.topology import Position
from pipetrain.wire.frames import Kind
from pipetrain.wire.pipe import PipeChannel, open_pipe


class Alive:
    """A process that is still running, as far as the judgement goes."""

    pid = 4242

    def poll(self):
        return None

    def wait(self, timeout=None):
        raise subprocess.TimeoutExpired("alive", timeout)


@pytest.fixture
def coordinator():
    config = TrainConfig(heartbeat_timeout=1.0)
    yield Coordinator(config, run=None, signals=None, launcher=PipeLauncher(1))


@pytest.fixture
def worker():
    read_fd, write_fd = open_pipe()
    ours = PipeChannel(read_fd, None, name="control")
    theirs = PipeChannel(None, write_fd, name="worker side")
    handle = WorkerHandle(Position(1, 0), (1, 2), Alive(), ours, log_path="log", endpoints={},
                          ready=True)
    yield handle, theirs
    ours.close()
    theirs.close()


def test_a_worker_silent_past_the_timeout_is_blamed(coordinator, worker):
    handle, _ = worker
    handle.last_seen = time.monotonic() - 3
    with pytest.raises(WorkerFailed, match="no heartbeat for 3"):
        coordinator._check_heartbeats([handle])


def test_a_heartbeat_waiting_in_the_pipe_is_no_silence(coordinator, worker):
    handle, theirs = worker
    handle.last_seen = time.monotonic() - 3  # the coordinator was busy elsewhere
    theirs.send_frame(Kind.CONTROL, 0, 0, messages.encode(messages.Heartbeat()))
    coordinator._check_heartbeats([handle])  # not blamed: read first


def test_time_the_coordinator_was_not_running_counts_for_nobody(coordinator, worker):
    handle, _ = worker
    coordinator.workers = [handle]
    now = time.monotonic()
    handle.last_seen = now - 0.5
    coordinator._last_tick = now - 5.0  # asleep (SIGSTOP) for 5 s after asking for 0.1 s
    coordinator._tick(0.1)
    assert now <= handle.last_seen <= time.monotonic()  # moved on by the gap (to now at most)
    coordinator._check_heartbeats([handle])


def test_a_worker_still_starting_is_given_the_operation_timeout(coordinator, worker):
    handle, _ = worker
    handle.ready = False
    handle.last_seen = time.monotonic() - 5  # a slow Python start-up on a loaded machine
    coordinator._check_heartbeats([handle])
    handle.last_seen = time.monotonic() - coordinator.op_timeout_s - 1
    with pytest.raises(WorkerFailed, match="not ready after"):
        coordinator._check_heartbeats([handle])


def test_a_poll_that_returns_on_time_moves_no_clock(coordinator, worker):
    handle, _ = worker
    coordinator.workers = [handle]
    now = time.monotonic()
    handle.last_seen = now - 0.5
    coordinator._last_tick = now - 0.9
    coordinator._tick(1.0)  # asked to sleep up to 1 s, woke after 0.9 s: watched time
    assert handle.last_seen == pytest.approx(now - 0.5)
    assert os.path.exists("/proc/self")
