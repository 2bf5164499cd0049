"""The hooks seam: the named program points where a test harness may act, and nothing else.

After pytest's hook specifications: this module declares the points, each a documented method
that does nothing; the system calls them where they are, and an implementation (a subclass of
:class:`Hooks`) overrides the ones it needs. Nothing is installed by default, so the system's
behaviour and cost are those of a few no-op calls per step. The scenario harness
(``pipetrain_harness.hooks``) installs its implementation once, first thing in each process it
starts; it is the only way faults, deliberate bugs and test delays enter the product. The system
never imports an implementation and never reads a variable that would switch one on.

Points are placed so that "where a fault lands" can be named exactly and reached again in a
replay: a point is a moment in the program's own order (before step N's first action, before
action ``B2`` of step N, a frame of a link, a checkpoint phase), not a moment in time. An
implementation may block at a point (park the process while the harness acts on it from outside)
or act in place (delay, raise, change state).

Who calls what (``place`` says which process and generation, see :class:`Place`):

========================  =============  ====================================================
point                     process        when
========================  =============  ====================================================
``worker_command``        coordinator    before spawning a worker: its command line
``quiet_boundary``        coordinator    a step's results are in: may the next one start early?
                          (and worker)   (a worker: finish the last step's snapshot copy first?)
``at_boundary``           coordinator    at a step boundary, before signals are acted on
``step_started``          coordinator    a step's command sent to every worker, results awaited
``checkpoint_phase``      both           after each phase of writing a checkpoint
``recovery_phase``        both           at each phase of replacing a failed worker in place
``worker_ready``          worker         set-up done, about to report ready
``state_restored``        worker         parameters and optimizer state loaded (resume, restart)
``before_step``           worker         step N's command received, before any of its work
``before_action``         worker         before each schedule action of a step
``before_reduce``         worker         on the all-reduce thread, before a layer's reduction
``after_update``          worker         the step's optimizer update applied
``snapshot_copy``         worker         before a step's state is copied: on the snapshot thread,
                                         or (a state of up to 64 KiB) on the main thread
                                         right after the step's reply
``wrap_channel``          worker         a link to a neighbour opened: may wrap the channel
``loader_item``           worker         before preparing a micro-batch: in a loader thread, or
                                         (no loader threads) on the main thread
========================  =============  ====================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

COORDINATOR = "coordinator"
STAGE = "stage"


@dataclass(frozen=True)
class Place:
    """Which process calls a hook: the coordinator, or stage ``stage`` of replica ``replica``
    in ``generation`` (0 for the first group, counting up with every recovery, in place or of
    the whole group: the survivors of an in-place recovery move to the new generation too).
    A spare worker, started before it knows its position, has ``stage`` and ``replica`` None
    (``worker_command`` only)."""

    role: str
    stage: int | None = None
    replica: int | None = None
    generation: int = 0

    def __str__(self) -> str:
        if self.role == COORDINATOR:
            return COORDINATOR
        return f"stage {self.stage} replica {self.replica} (generation {self.generation})"


class Hooks:
    """The points, each a no-op. Subclass and override; install with :func:`install`."""

    # -- the coordinator ---------------------------------------------------------------------

    def worker_command(self, place: Place, argv: list[str]) -> list[str]:
        """The command line that starts the worker at ``place``; returns the one to use."""
        return argv

    def quiet_boundary(self, step: int) -> bool:
        """Asked when step ``step`` is done on every worker and the coordinator could start
        the next step before this one's digests are in (nothing else to do at this boundary).
        True keeps the boundary quiet instead: the step's event is written and
        :meth:`at_boundary` runs with no step in flight, so a fault planned for the next step
        finds the one before it complete in every process. Each worker asks it too, before
        step ``step + 1``: True makes it finish its snapshot copy of ``step`` first."""
        return False

    def at_boundary(self, step: int) -> None:
        """A step boundary with no step in flight (``step`` steps done), before pending
        signals are read: a signal delivered while this runs is acted on at this boundary."""

    def step_started(self, step: int) -> None:
        """Step ``step`` has been sent to every worker; the coordinator is about to wait for
        their results (the workers are at work: a stall of the coordinator here is one in the
        middle of a step)."""

    def checkpoint_phase(self, place: Place, step: int, phase: str) -> None:
        """A checkpoint of ``step`` reached ``phase``: ``segment_written`` (a stage wrote and
        fsynced its file), then on the coordinator ``segments_written``, ``manifest_written``
        and ``committed`` (renamed into place)."""

    def recovery_phase(self, place: Place, step: int, phase: str) -> None:
        """An in-place recovery to the end of ``step`` (``pipetrain.runtime.recovery``)
        reached ``phase``: on the coordinator ``planned`` (the survivors halted, the step
        chosen) and ``recovered`` (everyone restored or ready); on a worker, survivor or
        replacement, ``state_transfer`` (its state is that of ``step``, its new links are
        open, the replicas of its stage are about to take one replica's state)."""

    # -- a worker ----------------------------------------------------------------------------

    def worker_ready(self, place: Place) -> None:
        """The worker at ``place`` has set up its links, loader and state."""

    def state_restored(self, place: Place, stage: Any) -> None:
        """``stage`` (a :class:`pipetrain.pipeline.stage.Stage`) has loaded its parameters and
        optimizer state from a checkpoint, on a resume or a restart."""

    def before_step(self, place: Place, step: int) -> None:
        """Step ``step`` was commanded; none of its work has started."""

    def before_action(self, place: Place, step: int, action: Any) -> None:
        """Before ``action`` (a :class:`pipetrain.pipeline.schedule.Action`, printed ``1B2``,
        or ``1B2@3`` naming its piece when interleaved) of step ``step``, its input not yet
        received."""

    def before_reduce(self, place: Place, step: int, names: list[str]) -> None:
        """On the all-reduce thread: the gradients of ``names`` (one layer) are about to be
        summed with the other replicas."""

    def after_update(self, place: Place, step: int, stage: Any) -> None:
        """The optimizer update of step ``step`` has been applied to ``stage``'s parameters
        (the step's gradient digests are already taken)."""

    def snapshot_copy(self, place: Place, step: int) -> None:
        """On the snapshot thread: the state of step ``step`` is about to be copied into the
        worker's in-memory snapshot region (``pipetrain.runtime.snapshot``); the main thread
        goes on meanwhile, up to the next update."""

    def wrap_channel(self, place: Place, peer: Place, channel: Any) -> Any:
        """The link from ``place`` to its neighbour ``peer`` is open; returns the channel to
        use instead (a :class:`pipetrain.wire.channel.Channel`; by default the same one)."""
        return channel

    def loader_item(self, place: Place, step: int, microbatch: int) -> None:
        """In a loader thread, before it prepares micro-batch ``microbatch`` of ``step``."""


_NO_HOOKS = Hooks()
_current: Hooks = _NO_HOOKS


def current() -> Hooks:
    """The installed implementation (the no-op one unless something was installed)."""
    return _current


def install(hooks: Hooks) -> None:
    """Install ``hooks`` for the rest of this process (once, at its start)."""
    global _current
    if not isinstance(hooks, Hooks):
        raise TypeError(f"hooks must be a pipetrain.hooks.Hooks, got {type(hooks).__name__}")
    _current = hooks


@contextlib.contextmanager
def installed(hooks: Hooks) -> Iterator[Hooks]:
    """Install ``hooks`` for a ``with`` block, then put back what was there (for tests)."""
    global _current
    previous = _current
    install(hooks)
    try:
        yield hooks
    finally:
        _current = previous
