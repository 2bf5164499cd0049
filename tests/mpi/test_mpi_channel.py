"""MpiChannel between two real ranks keeps the pipe channel's contract: every dtype and shape
round-trips, the payload is the sender's at the time of sending, and a corrupt header, an
oversized claim, a corrupt or short payload or a message that is no header is refused with
ProtocolError, after which the stream counts as out of sync. (The cases run inside
``channel_checks.py`` under ``mpirun -n 2``.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO
from tests.mpi.mpirun import MPIRUN, mpi_env

SCRIPT = Path(__file__).with_name("channel_checks.py")
CASES = 23


def test_mpi_channel_checks(shm_dir):
    result = subprocess.run([MPIRUN, "-n", "2", sys.executable, str(SCRIPT)],
                            capture_output=True, text=True, timeout=180, env=mpi_env(shm_dir),
                            cwd=REPO)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert [line for line in lines if not line.startswith("ok ")] == []
    assert len(lines) == CASES, lines
