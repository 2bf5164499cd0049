"""In-place recovery: replace only the failed workers; the others keep running and their state.

After TorchFT's live recovery from a peer and Gemini's in-memory checkpoints::

    failure seen ──▶ kill the failed ──▶ Halt the survivors ──▶ plan ──▶ new links for all,
                                         (each: its step,                 replacements started
                                          snapshots, regions)             from a peer or a
                                                                          snapshot; Restore
                                                                          the survivors

* **Halt.** Every survivor abandons the step in progress (its links closed under it), lets its
  helper threads settle, hands over the fds of the snapshot regions it keeps
  (``pipetrain.runtime.snapshot``) and reports the last step whose update it applied (the
  committed step c or, having finished it, c + 1) and the steps of its snapshots.
* **Plan** (:func:`plan`, pure): the step ``T`` everyone continues from. A failed worker with a
  surviving replica of its stage takes that replica's state (no step lost). One without takes
  the newest complete snapshot in its region, which its holder kept open; the copy runs in the
  background, so that may be one step short of the last step reported (at most one step lost).
  ``T`` is never past the last step whose event was written (its digests are complete), and
  every survivor reaches ``T`` live or from a snapshot of its own. No such ``T`` (a worker and
  the holder of its region died together): :class:`RecoveryImpossible`, and the caller falls
  back to restarting the whole group from the newest disk checkpoint.
* **Restore.** New pipes for every link (simplest, and no stale frame survives), replacements
  (the launcher's spare first) and survivors continue from ``T``; the replicas of a stage that
  lost a worker broadcast the state of a surviving one (``state_root``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipetrain import hooks
from pipetrain.runtime import messages
from pipetrain.runtime.courier import close_all
from pipetrain.runtime.diagnosis import WorkerFailed
from pipetrain.runtime.launcher import WorkerHandle
from pipetrain.runtime.snapshot import holder_of, peek_steps
from pipetrain.runtime.topology import Grid, Position

if TYPE_CHECKING:
    from pipetrain.runtime.coordinator import Coordinator


COORDINATOR = hooks.Place(hooks.COORDINATOR)


class RecoveryImpossible(RuntimeError):
    """The in-memory state of a failed worker is gone: restart the group from disk."""


def key(at: Position) -> str:
    return f"{at.stage}.{at.replica}"


@dataclass(frozen=True)
class Report:
    """What a survivor said when halted: its step and its own snapshots' steps."""

    step: int
    snapshots: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    step: int                        # T: everyone continues after it
    sources: dict[Position, str]     # failed position -> "peer" | "snapshot"
    roots: dict[int, int]            # stage -> the replica whose state all its replicas take


def plan(grid: Grid, failed: set[Position], reports: dict[Position, Report],
         regions: dict[Position, tuple[int, ...]], emitted: int) -> Plan:
    """The recovery of ``failed`` (see the module docstring). ``reports``: every survivor's;
    ``regions``: the snapshot steps of each failed worker's region still held by someone;
    ``emitted``: the last step whose event was written."""
    sources: dict[Position, str] = {}
    reachable: list[set[int]] = []  # the steps each worker can continue from
    for at in sorted(failed):
        peers = [p for p in reports if p.stage == at.stage]
        if peers:
            sources[at] = "peer"
        elif regions.get(at):
            sources[at] = "snapshot"
            reachable.append(set(regions[at]))
        else:
            raise RecoveryImpossible(f"the in-memory state of stage {at.stage} replica "
                                     f"{at.replica} is gone (its region's holder failed too)")
    reachable += [{report.step, *report.snapshots} for report in reports.values()]
    candidates = {step for step in set.intersection(*reachable) if step <= emitted}
    if not candidates:
        raise RecoveryImpossible("no step that every worker can continue from")
    roots = {}
    for stage in sorted({at.stage for at in failed}):
        surviving = sorted(p.replica for p in reports if p.stage == stage)
        roots[stage] = surviving[0] if surviving else 0
    return Plan(max(candidates), sources, roots)


@dataclass(frozen=True)
class Outcome:
    step: int
    replaced: list[WorkerHandle]  # the failed workers' handles (exited)
    sources: dict[Position, str]
    survivor_steps: list[int]  # where the survivors were (before rolling back to ``step``)


class Recovery:
    """Carries out one in-place recovery on ``coordinator``'s workers."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        self.failed: dict[Position, WorkerHandle] = {}
        self.halted: dict[Position, messages.Halted] = {}
        self.fds: dict[str, int] = {}  # region fds handed over: "S.R" (own) or "held:S.R"

    def run(self, first: WorkerFailed, emitted: int) -> Outcome:
        c = self.c
        self._fail(first.worker)
        try:
            self._halt_survivors()
            reports = {at: Report(m.step, tuple(m.snapshots)) for at, m in self.halted.items()}
            the_plan = plan(c.grid, set(self.failed), reports, self._region_steps(), emitted)
            hooks.current().recovery_phase(COORDINATOR, the_plan.step, "planned")
            self._restore(the_plan)
            hooks.current().recovery_phase(COORDINATOR, the_plan.step, "recovered")
        finally:
            close_all(self.fds)
        return Outcome(the_plan.step, list(self.failed.values()), the_plan.sources,
                       sorted(report.step for report in reports.values()))

    # -- halting -----------------------------------------------------------------------------

    def _fail(self, worker: WorkerHandle | None) -> None:
        if worker is None:
            raise RecoveryImpossible("no single worker to blame")
        if worker.position in self.failed:
            return
        self.failed[worker.position] = worker
        self.c.departed.append(worker)  # its worker_exit is reported, whatever happens next
        if worker.process.poll() is None:
            worker.process.kill()
        worker.process.wait()
        worker.returncode = worker.process.returncode
        worker.control.close()
        if worker.courier is not None:
            worker.courier.close()

    def _survivors(self) -> list[WorkerHandle]:
        return [w for w in self.c.workers if w.position not in self.failed]

    def _halt_survivors(self) -> None:
        c = self.c
        for worker in self._survivors():
            try:
                c.send(worker, messages.Halt())
            except WorkerFailed as exc:
                self._fail(exc.worker)

        def handle(worker: WorkerHandle, message: messages.Message) -> None:
            match message:
                case messages.Halted(fds=names):
                    got = c.launcher.receive_fds(worker, names)
                    if "region" in got:
                        got[key(worker.position)] = got.pop("region")
                    self.fds.update(got)
                    self.halted[worker.position] = message
                case messages.ParamsFollow(names=names):  # a gather cut short: drain it
                    for _ in names:
                        worker.control.recv_frame(timeout_s=c.op_timeout_s)
                case _:
                    pass  # replies to commands of the abandoned step

        def absorb(worker: WorkerHandle, message: messages.Failed) -> None:
            if not message.consequence:  # failing on its own: it is leaving
                raise c._failure(worker, message.message or "unknown error")

        while True:
            pending = [w for w in self._survivors() if w.position not in self.halted]
            if not pending:
                break
            try:
                c.pump(handle, lambda p=pending: all(w.position in self.halted for w in p),
                       workers=pending, on_failed=absorb)
            except WorkerFailed as exc:
                self._fail(exc.worker)
        c.clear_results()

    def _region_steps(self) -> dict[Position, tuple[int, ...]]:
        """The steps in each failed worker's region that someone still holds."""
        found = {}
        for at in self.failed:
            holder = holder_of(self.c.grid, at)
            if holder is None:
                fd = self.c.held_regions.pop(at, None)
                if fd is not None:
                    self.fds[f"held:{key(at)}"] = fd
                    found[at] = tuple(peek_steps(fd))
            elif holder in self.halted:
                found[at] = tuple(self.halted[holder].held.get(key(at), ()))
        return found

    # -- restoring ---------------------------------------------------------------------------

    def _restore(self, the_plan: Plan) -> None:
        c, grid = self.c, self.c.grid
        generation = c.generation
        replacements: list[WorkerHandle] = []
        for index, worker in enumerate(c.workers):  # in place: a failure leaves no orphan
            if worker.position in self.failed:
                c.workers[index] = c.launcher.spawn(worker.position, worker.layers,
                                                    worker.log_path, generation,
                                                    worker.replicated)
                replacements.append(c.workers[index])
        workers = c.workers
        extra: dict[Position, dict[str, int]] = {}
        for new in replacements:
            at = new.position
            fds = extra.setdefault(at, {})
            if the_plan.sources[at] == "snapshot":
                fds["region"] = self.fds[f"held:{key(at)}"]
            for held in grid.positions():  # the regions the failed worker kept: its now
                if holder_of(grid, held) == at and key(held) in self.fds:
                    fds[f"held:{key(held)}"] = self.fds[key(held)]
        c.launcher.link(grid, workers, extra)
        for worker in workers:
            root = the_plan.roots.get(worker.index, -1)
            if worker in replacements:
                source = the_plan.sources[worker.position]
                c.send(worker, c.init_message(worker, start_step=the_plan.step,
                                              state_source=source, state_root=root))
            else:
                c.send(worker, messages.Restore(
                    step=the_plan.step, generation=generation, links=worker.endpoints,
                    fds=list(worker.fds), state_root=root))
        survivors = [w for w in workers if w not in replacements]
        c.collect(messages.Restored, workers=survivors) if survivors else None
        c.await_ready(replacements)
        c.generation += 1


def hand_region(coordinator: Coordinator, worker: WorkerHandle) -> None:
    """``worker`` sent its snapshot region's fd before its ``Ready``: pass it to the worker
    that holds it (``Hold``) and close the coordinator's copy (a grid of one worker has no peer
    to hold it: the coordinator keeps it)."""
    c = coordinator
    fd = c.launcher.receive_fds(worker, ["region"])["region"]
    holder = holder_of(c.grid, worker.position)
    if holder is None:
        close_all([c.held_regions.pop(worker.position)] if worker.position in c.held_regions
                  else [])
        c.held_regions[worker.position] = fd
        return
    target = next(w for w in c.workers if w.position == holder)
    name = f"held:{key(worker.position)}"
    try:
        c.launcher.send_fds(target, {name: fd})
    finally:
        close_all([fd])
    c.send(target, messages.Hold(fds=[name]))
