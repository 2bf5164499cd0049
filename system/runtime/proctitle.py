"""Process titles: what ``ps`` and ``top`` show for each process of a run.

``pipetrain: coordinator runs/train-...``, ``pipetrain: stage 1/3 replica 0``, instead of a row
of identical ``python3 -P -m pipetrain.runtime.worker 13 16``. setproctitle rewrites the
process's argv area (``/proc/PID/cmdline``, what ``ps`` and psutil read) and its ``comm``
name; without it (not installed) titles are skipped, never an error.
"""

from __future__ import annotations

from pipetrain.runtime.topology import Position

PREFIX = "pipetrain: "


def set_title(title: str) -> None:
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(title)


def stage_title(at: Position, stages: int) -> str:
    """``pipetrain: stage 1/3 replica 0``: stage 1 (counting from 0) of 3, replica 0."""
    return f"{PREFIX}stage {at.stage}/{stages} replica {at.replica}"
