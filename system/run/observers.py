"""Who watches a run's events: the terminal, ``metrics.csv`` and, when asked, TensorBoard."""

from __future__ import annotations

from pipetrain.run.metrics import MetricsCsv
from pipetrain.run.progress import Progress
from pipetrain.run.rundir import RunDir

METRICS_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


def observe(run: RunDir, *, quiet: bool = False, tensorboard: bool = False,
            live: bool | None = None) -> Progress:
    """Attach the listeners to ``run`` (they are closed with it); returns the terminal's, for
    the messages that are not events."""
    progress = Progress(run.path, quiet=quiet, live=live)
    run.listeners.append(progress)
    run.listeners.append(MetricsCsv(run.path / METRICS_FILE))
    if tensorboard:
        from pipetrain.run.tensorboard import TensorBoardScalars

        run.listeners.append(TensorBoardScalars(run.path / TENSORBOARD_DIR))
    return progress
