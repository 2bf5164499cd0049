"""The parts of the MPI launch that need no running job: rank layout, the world-size check and
its message, the launcher detection, the stand-in for a worker process, and SIGCONT's meaning
on rank 0 under mpirun."""

from __future__ import annotations

import signal
import subprocess

import pytest

from pipetrain.config import ConfigError, build_config
from pipetrain.runtime.mpi_launcher import MpiLauncher, MpiRank
from pipetrain.runtime.signals import Requests
from pipetrain.runtime.topology import Grid
from pipetrain.training.mpi_run import check_world, launch_hint, launcher_rank, world_size


def test_ranks_are_a_coordinator_then_the_grid_replica_by_replica():
    config = build_config({"stages": 3, "replicas": 2})
    assert world_size(config) == 7
    grid = Grid(3, 2)
    assert [grid.rank(at) for at in grid.positions()] == [1, 2, 3, 4, 5, 6]
    assert grid.size + 1 == world_size(config)


def test_world_size_mismatch_names_the_right_count():
    config = build_config({"stages": 2, "replicas": 2, "transport": "mpi"})
    check_world(config, 5)
    with pytest.raises(ConfigError, match=r"started 4 rank\(s\) .* needs 5 .* mpirun -n 5"):
        check_world(config, 4)
    with pytest.raises(ConfigError, match="add --transport mpi"):
        check_world(config.replace(transport="pipe"), 5)
    assert "mpirun -n 5 pipetrain train --transport mpi" in launch_hint(config)


@pytest.mark.parametrize("name", ["OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"])
def test_launcher_rank_comes_from_the_launchers_environment(monkeypatch, name):
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert launcher_rank() is None
    monkeypatch.setenv(name, "3")
    assert launcher_rank() == 3


def test_sigcont_under_mpirun_also_asks_for_a_checkpoint():
    requests = Requests(cont_checkpoints=MpiLauncher.cont_checkpoints)
    requests.apply(signal.SIGTSTP)
    assert requests.paused and not requests.checkpoint
    requests.apply(signal.SIGCONT)  # mpirun's kill sequence starts with it
    assert not requests.paused and requests.checkpoint
    requests.apply(signal.SIGTERM)
    assert requests.stop


def test_a_rank_stands_in_for_a_worker_process():
    rank = MpiRank(2, 1234, "node2")
    assert rank.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        rank.wait(timeout=1.0)
    assert not hasattr(rank, "kill")  # a rank is never killed alone: it is told to stop
    rank.returncode = 0
    assert rank.wait() == 0 and rank.poll() == 0
