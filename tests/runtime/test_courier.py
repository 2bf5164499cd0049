"""pipetrain.runtime.courier: batches of named fds over a Unix socket, to a running process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipetrain.runtime.courier import Courier, CourierError, close_all, courier_pair
from tests.helpers import REPO, cli_env

# A running process receives a pipe's write end and writes through it.
CHILD = """
import os, sys
from pipetrain.runtime.courier import Courier
courier = Courier.from_fd(int(sys.argv[1]), name="child")
fds = courier.receive(["pipe.write"])
os.write(fds["pipe.write"], b"through the courier")
os.close(fds["pipe.write"])
courier.close()
"""


def test_a_running_process_gets_a_pipe_end_and_uses_it():
    ours, theirs = courier_pair("test")
    read_fd, write_fd = os.pipe()
    try:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(theirs)], pass_fds=[theirs],
                                 cwd=REPO, env=cli_env())
        os.close(theirs)
        ours.send({"pipe.write": write_fd})
        os.close(write_fd)  # the child holds it now
        assert child.wait(timeout=60) == 0
        assert os.read(read_fd, 100) == b"through the courier"
        assert os.read(read_fd, 100) == b""  # every copy of the write end is closed
    finally:
        os.close(read_fd)
        ours.close()


def test_a_batch_must_be_the_one_announced():
    ours, theirs = courier_pair("test")
    peer = Courier.from_fd(theirs, name="peer")
    read_fd, write_fd = os.pipe()
    try:
        ours.send({"a": read_fd, "b": write_fd})
        with pytest.raises(CourierError, match="expected fds"):
            peer.receive(["a"])
        assert peer.receive([]) == {}  # nothing announced, nothing read
        with pytest.raises(CourierError, match="no fds within"):
            peer.receive(["a"], timeout_s=0.05)
        ours.close()
        with pytest.raises(CourierError, match="closed"):
            peer.receive(["a"], timeout_s=5)
    finally:
        close_all([read_fd, write_fd])
        peer.close()
