"""The coordinator: the workers' lifecycle and the step protocol with them.

::

                 ┌──────────── coordinator (this process) ─────────────┐
                 │ Step k ──▶ every stage; waits for every StepDone    │
                 └──┬──────────────────┬──────────────────┬────────────┘
              control channel    control channel    control channel
                 ┌──▼──┐ activations ┌──▼──┐ activations ┌──▼──┐
                 │  0  │ ──────────▶ │  1  │ ──────────▶ │  2  │ (loss)
                 │     │ ◀────────── │     │ ◀────────── │     │
                 └─────┘  gradients  └─────┘  gradients  └─────┘

Steps run in lock-step: the coordinator sends ``Step k`` to every stage and waits for all of their
``StepDone`` replies (loss from the last stage) before the next step. The per-parameter gradient
digests come later in ``Digests`` messages from the workers' helper threads; when the boundary
has nothing to do, ``Step k + 1`` is sent before they arrive (``TrainingRun.may_run_ahead``).
Boundaries with no step in flight are where pauses, checkpoints and stops take effect. The main
thread only ever waits in ``poll`` on the control channels and the signal pipe, so a worker's
death (end-of-file on its control pipe) or error is seen at once and becomes a
:class:`~pipetrain.runtime.diagnosis.WorkerFailed`, never a hang. Who starts the workers is the
:class:`~pipetrain.runtime.launcher.Launcher`'s business; who is to blame is
``pipetrain.runtime.diagnosis``'s; replacing one worker while the others run on is
``pipetrain.runtime.recovery``'s.
The event loop it waits in (``poll``, heartbeats, failures, signals) is
:class:`pipetrain.runtime.control_loop.ControlLoop`, which this class extends.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipetrain import hooks
from pipetrain.config import TrainConfig
from pipetrain.nn.digest import combine
from pipetrain.pipeline.partition import canonical_positions
from pipetrain.pipeline.partition import stage_bounds as partition_stages
from pipetrain.pipeline.schedule import validate as validate_schedule
from pipetrain.run.rundir import RunDir
from pipetrain.runtime import messages
from pipetrain.runtime.checkpointing import write_checkpoint
from pipetrain.runtime.control_loop import ControlLoop
from pipetrain.runtime.courier import close_all
from pipetrain.runtime.diagnosis import WorkerFailed
from pipetrain.runtime.launcher import Launcher, WorkerHandle
from pipetrain.runtime.recovery import Outcome, Recovery, hand_region
from pipetrain.runtime.signals import SignalControl
from pipetrain.runtime.topology import Grid, Position
from pipetrain.wire.frames import Kind

COORDINATOR = hooks.Place(hooks.COORDINATOR)


def stage_bounds(config: TrainConfig) -> list[tuple[int, ...]]:
    """The layers ``[first, stop)`` of every stage (flattened pairs, one per piece, when
    interleaved), balanced by parameters or measured time."""
    return partition_stages(config.model_spec(), config.stages, config.balance,
                            config.pieces_per_stage)


class Coordinator(ControlLoop):
    def __init__(self, config: TrainConfig, run: RunDir, signals: SignalControl | None,
                 launcher: Launcher) -> None:
        super().__init__(config, signals, launcher)
        self.run = run
        self.grid = Grid(config.stages, config.replicas, ring=config.ring)
        self.bounds = stage_bounds(config)
        validate_schedule(config.build_schedule(), config.stages, config.microbatches,
                          config.pieces_per_stage)
        self.digest_order = canonical_positions(config.model_spec(), self.bounds)
        self.generation = 0  # how many worker groups were started: 0 first, then restarts
        self.snapshots = launcher.replaceable  # in-memory snapshots, for in-place recovery
        # Snapshot regions this process holds: only a grid of one worker has no peer to do it.
        self.held_regions: dict[Position, int] = {}
        self.data_digest: dict | None = None  # the dataset's content, for every manifest
        self.departed: list[WorkerHandle] = []  # failed in a recovery, exit not reported yet

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, resume_from: Path | None = None, start_step: int = 0) -> None:
        """Start every worker of the S x R grid, send each its ``Init``, and wait until all are
        ready. With ``resume_from`` (a verified checkpoint directory) every stage loads its
        parameters and optimizer state from it instead of initialising them from the seed."""
        self.release_regions()
        self.workers = self.launcher.start(self.grid, self.bounds, self.log_path,
                                           self.generation)
        for worker in self.workers:
            self.send(worker, self.init_message(
                worker, start_step=start_step,
                state_source="checkpoint" if resume_from else "init",
                resume_from=str(resume_from) if resume_from else None))
        # The spare's Python start-up overlaps the workers' set-up, not the first steps.
        self.launcher.keep_spare(self.run.path / "logs", self.generation + 1)
        self.await_ready(self.workers)
        self.generation += 1

    def await_ready(self, workers: list[WorkerHandle]) -> None:
        """Wait for the ``Ready`` of ``workers`` (just started), then place their regions."""
        replies = self.collect(messages.Ready, workers=workers)
        for worker, reply in zip(workers, replies, strict=True):
            worker.ready, worker.region = True, reply.region
        self.hand_regions(workers)

    def init_message(self, worker: WorkerHandle, **fields) -> messages.Init:
        config = self.config
        return messages.Init(
            config=config.to_json(), stage=worker.index, replica=worker.replica,
            num_stages=config.stages, layers=list(worker.layers), links=worker.endpoints,
            op_timeout_s=self.op_timeout_s,
            heartbeat_interval_s=min(1.0, config.heartbeat_timeout / 5),
            heartbeat_timeout_s=config.heartbeat_timeout, generation=self.generation,
            log_path=str(worker.log_path), fds=list(worker.fds), snapshots=self.snapshots,
            trace_dir=str(self.run.path / "trace") if config.trace else None, **fields)

    def hand_regions(self, workers: list[WorkerHandle]) -> None:
        """Give each new snapshot region to the worker that holds it (``hand_region``)."""
        for worker in workers:
            if worker.region:
                hand_region(self, worker)

    def release_regions(self) -> None:
        close_all(list(self.held_regions.values()))
        self.held_regions.clear()

    def take_departed(self) -> list[WorkerHandle]:
        """The workers a recovery took out (exited), each reported once."""
        departed, self.departed = self.departed, []
        return departed

    def clear_results(self) -> None:
        """Forget step results: a new or recovered group reports afresh."""
        self._done.clear()
        self._digests.clear()

    def log_path(self, at: Position) -> Path:
        suffix = f"-replica-{at.replica}" if self.config.replicas > 1 else ""
        return self.run.path / "logs" / f"stage-{at.stage}{suffix}.log"

    def shutdown(self, *, graceful: bool = True) -> list[WorkerHandle]:
        """Stop every worker, reap it and close its channels; returns the handles, now exited.

        Graceful: a ``Stop``, then force after a grace period. Not graceful (after a failure,
        when nothing in the group can be trusted): force at once, which also makes a restart
        fast.
        """
        stopped, self.workers = self.workers, []
        self.launcher.stop(stopped, graceful=graceful)
        self.release_regions()
        self.clear_results()
        return stopped

    @property
    def pids(self) -> list[int]:
        return [worker.process.pid for worker in self.workers]

    # -- training ----------------------------------------------------------------------------

    def start_step(self, step: int) -> None:
        self.broadcast(messages.Step(step=step))
        hooks.current().step_started(step)

    def finish_step(self, step: int) -> tuple[float, list[messages.StepDone]]:
        """Wait for every ``StepDone`` of ``step``; the loss and the replies. The digests may
        still be on their way (:meth:`step_digest`), so the next step can start meanwhile."""
        self._wait_for(self._done, step, "step_done")
        done = self._done.pop(step)
        replies = [done[id(worker)] for worker in self.workers]
        loss = 0.0
        for worker, reply in zip(self.workers, replies, strict=True):
            if worker.index == self.config.stages - 1:  # workers are in replica order
                loss += float(reply.loss)
        return loss, replies

    def step_digest(self, step: int) -> str:
        """The step's ``grad_digest``, once every worker has sent its share: per stage, per
        parameter, the digest made by replica ``position % R`` (they all hold the same
        all-reduced gradients), combined in canonical order."""
        self._wait_for(self._digests, step, "digests")
        shares = self._digests.pop(step)
        replicas = self.config.replicas
        parts: list[bytes] = []
        by_place = {(worker.index, worker.replica): shares[id(worker)] for worker in self.workers}
        for index, position in self.digest_order:
            digest = by_place[index, position % replicas][position]
            if digest is None:
                raise WorkerFailed(f"no digest of parameter {position} of stage {index} "
                                   f"in step {step}")
            parts.append(bytes.fromhex(digest))
        return combine(parts)

    def _wait_for(self, store: dict[int, dict], step: int, what: str) -> None:
        def unexpected(worker: WorkerHandle, message: messages.Message) -> None:
            raise self._failure(worker, f"expected {what} of step {step}, got {message.TYPE}")

        self.pump(unexpected, lambda: len(store.get(step, ())) == len(self.workers))

    def gather_params(self) -> dict[str, np.ndarray]:
        """Every parameter, from replica 0's stages."""
        primary = [worker for worker in self.workers if worker.replica == 0]
        for worker in primary:
            self.send(worker, messages.SendParams())
        params: dict[str, np.ndarray] = {}
        answered: set[int] = set()

        def handle(worker: WorkerHandle, message: messages.Message) -> None:
            if (not isinstance(message, messages.ParamsFollow) or worker.index in answered
                    or worker.replica):
                raise self._failure(worker, f"expected params, got {message.TYPE}")
            # The worker sends its parameter frames right behind the header, under one lock.
            for position, name in enumerate(message.names):
                frame = worker.control.recv_frame(timeout_s=self.op_timeout_s)
                if frame.kind != Kind.PARAMETER or frame.microbatch != position:
                    raise self._failure(worker, f"bad parameter frame for {name}")
                params[name] = frame.array
            answered.add(worker.index)

        self.pump(handle, lambda: len(answered) == len(primary))
        return {name: params[name] for name in self.config.model_spec().parameter_names()}

    def recover(self, failure: WorkerFailed, emitted: int) -> Outcome:
        """Replace the failed worker(s) while the others run on (``pipetrain.runtime.
        recovery``); raises when that is impossible and the group must restart instead."""
        return Recovery(self).run(failure, emitted)

    def checkpoint(self, step: int, epoch: int) -> Path:
        """Every stage writes its segment into a temporary directory, then it is committed
        (``pipetrain.runtime.checkpointing``)."""
        return write_checkpoint(self, step, epoch)
