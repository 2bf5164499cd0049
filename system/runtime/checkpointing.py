"""A consistent checkpoint of a running group, at a step boundary.

Every stage (replica 0 of each) writes its segment into a hidden temporary directory
(``pipetrain.run.checkpoint``) and every replica reports a digest of its parameters, so replicas
that drifted apart are an error, not silence; the coordinator then writes the manifest and
renames the directory into place. A segment that could not be written (a full disk) comes back
as an error in the stage's reply: the temporary directory is removed, earlier checkpoints stay
intact, and the run fails with that one line (a :class:`StorageError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipetrain import hooks
from pipetrain.run import checkpoint
from pipetrain.run.storage import StorageError
from pipetrain.runtime import messages

if TYPE_CHECKING:
    from pipetrain.runtime.coordinator import Coordinator

COORDINATOR = hooks.Place(hooks.COORDINATOR)


def write_checkpoint(coordinator: Coordinator, step: int, epoch: int) -> Path:
    tmp = checkpoint.begin(coordinator.run.checkpoints, step)
    try:
        return _write(coordinator, tmp, step, epoch)
    except BaseException:
        checkpoint.abandon(tmp)  # nothing half-written stays; earlier ones are intact
        raise


def _write(c: Coordinator, tmp: Path, step: int, epoch: int) -> Path:
    c.broadcast(messages.WriteCheckpoint(directory=str(tmp), step=step))
    replies = c.collect(messages.Checkpointed)
    for reply in replies:
        if reply.error is not None:
            raise StorageError(reply.error)
    files = {reply.file: reply.sha256 for reply in replies if reply.file is not None}
    digests: dict[int, str] = {}
    for worker, reply in zip(c.workers, replies, strict=True):
        expected = digests.setdefault(worker.index, reply.params_digest)
        if reply.params_digest != expected:
            raise c._failure(worker, f"parameters differ from replica 0's at step {step} "
                             "(replicas drifted apart)")
    hooks_now = hooks.current()
    hooks_now.checkpoint_phase(COORDINATOR, step, "segments_written")
    return checkpoint.commit(
        tmp, step=step, epoch=epoch, files=files, config=c.config.math_config(),
        config_digest=c.config.math_digest(), data=c.data_digest,
        on_phase=lambda phase: hooks_now.checkpoint_phase(COORDINATOR, step, phase))
