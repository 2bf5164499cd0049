"""pipetrain.runtime.snapshot: a region keeps the newest complete snapshots, never a torn one,
and outlives its writer as long as another process holds its fd."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from pipetrain.runtime import snapshot
from pipetrain.runtime.snapshot import Region, SnapshotError, holder_of, peek_steps
from pipetrain.runtime.topology import Grid, Position


def arrays(value: float) -> dict[str, np.ndarray]:
    return {"param.layers.0.weight": np.full((3, 5), value),
            "param.layers.0.bias": np.full(5, value, dtype=np.float32),
            "optim.step_count": np.array(int(value), dtype=np.int64)}


def test_snapshots_round_trip_and_the_newest_three_stay():
    region = Region.create("test", arrays(0))
    try:
        for step in range(1, 6):
            region.write(step, arrays(step))
        assert region.valid_steps() == [3, 4, 5]
        for step in (3, 4, 5):
            got = region.read(step)
            for name, value in arrays(step).items():
                assert got[name].dtype == value.dtype and np.array_equal(got[name], value)
        with pytest.raises(SnapshotError, match="no snapshot of step 2"):
            region.read(2)
    finally:
        region.close()


def test_a_slot_being_written_is_never_read():
    region = Region.create("test", arrays(0))
    try:
        region.write(1, arrays(1))
        region.write(2, arrays(2))
        region._mark(0, snapshot.WRITING, 0, -1)  # as a writer killed mid-copy leaves it
        assert region.valid_steps() == [2]
        with pytest.raises(SnapshotError):
            region.read(1)
    finally:
        region.close()


def test_a_damaged_slot_fails_its_checksum():
    region = Region.create("test", arrays(0))
    try:
        region.write(7, arrays(7))
        view = region._bytes(0)
        view[3] ^= 0xFF
        view.release()
        with pytest.raises(SnapshotError, match="checksum"):
            region.read(7)
    finally:
        region.close()


def test_forget_after_drops_the_abandoned_future():
    region = Region.create("test", arrays(0))
    try:
        for step in (4, 5, 6):
            region.write(step, arrays(step))
        region.forget_after(4)
        assert region.valid_steps() == [4]
        region.write(5, arrays(50))  # the re-run step goes into a free slot
        assert region.valid_steps() == [4, 5] and region.read(5)["optim.step_count"] == 50
    finally:
        region.close()


def test_attach_refuses_a_region_laid_out_for_other_arrays():
    region = Region.create("test", arrays(0))
    try:
        other = {"param.layers.0.weight": np.zeros((4, 5))}
        with pytest.raises(SnapshotError):
            Region.attach(os.dup(region.fd), other)
        again = Region.attach(os.dup(region.fd), arrays(0))
        region.write(9, arrays(9))
        assert again.valid_steps() == [9] and again.read(9)["optim.step_count"] == 9
        again.close()
    finally:
        region.close()


def test_the_region_outlives_its_writer_while_another_process_holds_it():
    """A child writes two snapshots into a region it created, hands the fd up and is killed;
    the parent, now the only holder, still reads them."""
    code = (
        "import os, sys, numpy as np, socket\n"
        "from pipetrain.runtime.snapshot import Region\n"
        "from tests.runtime.test_snapshot import arrays\n"
        "r = Region.create('child', arrays(0))\n"
        "r.write(10, arrays(10)); r.write(11, arrays(11))\n"
        "s = socket.socket(fileno=int(sys.argv[1]))\n"
        "socket.send_fds(s, [b'x'], [r.fd])\n"
        "os.kill(os.getpid(), 9)\n")
    import socket

    ours, theirs = socket.socketpair()
    try:
        child = subprocess.run([sys.executable, "-c", code, str(theirs.fileno())],
                               pass_fds=[theirs.fileno()], cwd=os.getcwd(), timeout=60,
                               env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert child.returncode == -9
        _, fds, _, _ = socket.recv_fds(ours, 16, 1)
        assert peek_steps(fds[0]) == [10, 11]
        held = Region.attach(fds[0], arrays(0))
        assert np.array_equal(held.read(11)["param.layers.0.weight"], np.full((3, 5), 11.0))
        held.close()
    finally:
        ours.close()
        theirs.close()


def test_holders_go_round_the_grid():
    grid = Grid(3, 2)
    positions = grid.positions()
    holders = [holder_of(grid, at) for at in positions]
    assert holders == positions[1:] + positions[:1]
    assert all(h != at for h, at in zip(holders, positions, strict=True))
    assert holder_of(Grid(1, 1), Position(0, 0)) is None  # the coordinator holds it


def test_a_small_state_is_copied_at_submit_and_a_big_one_on_the_thread():
    state = arrays(3)
    region = Region.create("test", state)
    calls: list[int] = []
    try:
        small = snapshot.make_snapshots(region, lambda: state, calls.append,
                                        snapshot.INLINE_SNAPSHOT_BYTES)
        assert isinstance(small, snapshot.InlineSnapshots)
        small.submit(5)  # copied here and now, the hook first
        assert calls == [5] and region.valid_steps() == [5]
        assert all(np.array_equal(region.read(5)[name], state[name]) for name in state)
        small.wait()
        small.close()
        big = snapshot.make_snapshots(region, lambda: state, calls.append,
                                      snapshot.INLINE_SNAPSHOT_BYTES + 1)
        try:
            assert isinstance(big, snapshot.SnapshotThread)
            big.submit(6)
            big.wait()
            assert calls == [5, 6] and region.valid_steps() == [5, 6]
        finally:
            big.close()
    finally:
        region.close()
