"""Fixtures of the MPI tests: a private directory for Open MPI's shared memory, and the
reference runs that every MPI run is compared with."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import run_cli
from tests.mpi.mpirun import require_mpi


@pytest.fixture(autouse=True)
def _mpi_available():
    require_mpi()


@pytest.fixture
def shm_dir(tmp_path):
    """Where Open MPI puts its shared-memory backing files for this test (Open MPI allows any
    local file system; /tmp is one): a job killed on purpose cannot remove its own, and
    /dev/shm, which the leak check watches, is shared with every other test running."""
    path = tmp_path / "ompi-shm"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """`pipetrain reference` per set of math options, computed once per module."""
    cache: dict[tuple[str, ...], Path] = {}

    def get(*options: str) -> Path:
        if options not in cache:
            run_dir = tmp_path_factory.mktemp("reference")
            run_cli("reference", "--run-dir", str(run_dir), *options, check=True)
            cache[options] = run_dir
        return cache[options]

    return get
