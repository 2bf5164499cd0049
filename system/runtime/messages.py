"""The control protocol between the coordinator and its workers: every message a frozen dataclass.

A message travels as one ``CONTROL`` frame whose payload is compact UTF-8 JSON with a ``type``
field; :func:`decode` checks the type and the field names before building the dataclass, so a
malformed or unknown message is a :class:`~pipetrain.wire.frames.ProtocolError`, never a
``KeyError`` deep in a handler. Receivers dispatch with ``match`` on the type. No pickle.

::

    coordinator ──▶ worker    Init, Step, SendParams, WriteCheckpoint, Stop, Hold,
                              Halt, Restore (in-place recovery: pipetrain.runtime.recovery)
    worker ──▶ coordinator    Ready, Heartbeat, StepDone, Digests, ParamsFollow (then one
                              PARAMETER frame per parameter), Checkpointed, Failed, Exited,
                              Halted, Restored

A message that hands over file descriptors (new pipes, snapshot regions) names them in its
``fds`` field; the fds themselves travel in one batch on the worker's courier socket
(``pipetrain.runtime.courier``), sent just before the message on the control channel.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from pipetrain.wire.frames import ProtocolError


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""


# -- commands: coordinator to worker -----------------------------------------------------------


@dataclass(frozen=True)
class Init(Message):
    """Who the worker is, how it reaches its neighbours and where training starts.

    ``links`` maps a link name (``pipetrain.runtime.topology``) to the transport's endpoint: the
    names of two pipe fds of the courier batch (``read``, ``write``) or an MPI peer rank
    (``rank``). ``state_source`` says where the parameters and optimizer state come from:
    ``init`` (the seed), ``checkpoint`` (``resume_from``), ``snapshot`` (the region fd
    ``region`` of the batch, at ``start_step``) or ``peer`` (the replica ``state_root`` of the
    same stage; after any source every replica takes ``state_root``'s state). ``snapshots``:
    keep an in-memory snapshot region (and send its fd with ``Ready``).
    """

    TYPE: ClassVar[str] = "init"
    config: dict[str, Any]
    stage: int
    replica: int
    num_stages: int
    layers: list[int]  # [first, stop) of this stage's layers; a pair per piece if interleaved
    links: dict[str, dict[str, Any]]
    op_timeout_s: float
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    generation: int = 0
    start_step: int = 0
    resume_from: str | None = None
    log_path: str | None = None  # the worker sends its output there
    fds: list[str] = dataclasses.field(default_factory=list)
    state_source: str = "init"
    state_root: int = 0
    snapshots: bool = False
    trace_dir: str | None = None  # record a trace (--trace) and write it there at exit


@dataclass(frozen=True)
class Step(Message):
    TYPE: ClassVar[str] = "step"
    step: int


@dataclass(frozen=True)
class SendParams(Message):
    TYPE: ClassVar[str] = "send_params"


@dataclass(frozen=True)
class WriteCheckpoint(Message):
    TYPE: ClassVar[str] = "write_checkpoint"
    directory: str
    step: int


@dataclass(frozen=True)
class Stop(Message):
    TYPE: ClassVar[str] = "stop"


@dataclass(frozen=True)
class Hold(Message):
    """Keep the snapshot regions in ``fds`` (named ``held:S.R``) open: this worker holds them."""

    TYPE: ClassVar[str] = "hold"
    fds: list[str]


@dataclass(frozen=True)
class Halt(Message):
    """Another worker failed: abandon the step in progress, let the helper threads settle, hand
    over the snapshot regions (own and held, named in the reply) and wait."""

    TYPE: ClassVar[str] = "halt"


@dataclass(frozen=True)
class Restore(Message):
    """Continue from the end of step ``step``: the state of that step (live or from this
    worker's own snapshots), new links (``links`` as in :class:`Init`), generation
    ``generation``, replicas of a stage taking replica ``state_root``'s state, and the regions
    in ``fds`` named ``held:S.R`` to hold from now on."""

    TYPE: ClassVar[str] = "restore"
    step: int
    generation: int
    links: dict[str, dict[str, Any]]
    fds: list[str]
    state_root: int = 0


# -- events: worker to coordinator ---------------------------------------------------------------


@dataclass(frozen=True)
class Ready(Message):
    """Set up; with ``region`` its snapshot region's fd came first on the courier."""

    TYPE: ClassVar[str] = "ready"
    pid: int
    region: bool = False


@dataclass(frozen=True)
class Halted(Message):
    """Halted at the end of step ``step`` (its last update applied); own snapshots of
    ``snapshots`` steps; the steps in each held region (``held``: "S.R" -> steps); the region fds
    sent first on the courier are named in ``fds`` (``region`` and ``held:S.R``)."""

    TYPE: ClassVar[str] = "halted"
    step: int
    snapshots: list[int]
    held: dict[str, list[int]]
    fds: list[str]


@dataclass(frozen=True)
class Restored(Message):
    TYPE: ClassVar[str] = "restored"
    step: int


@dataclass(frozen=True)
class Heartbeat(Message):
    TYPE: ClassVar[str] = "heartbeat"


# Per-stage timings a StepDone carries (and a step event reports), in this order.
METRIC_KEYS = ("compute_s", "wait_data_s", "wait_neighbours_s", "allreduce_s", "loader_depth")


@dataclass(frozen=True)
class StepDone(Message):
    """A step's work is done on this worker; ``loss`` from the last stage only. A stage that
    hashes its gradients itself sends their digests here (as a :class:`Digests` would)."""

    TYPE: ClassVar[str] = "step_done"
    step: int
    loss: float | None
    compute_s: float
    wait_neighbours_s: float
    allreduce_s: float
    wait_data_s: float | None = None  # stages with a loader
    loader_depth: int | None = None
    digests: list[str | None] | None = None

    def metrics(self) -> dict[str, float]:
        return {key: getattr(self, key) for key in METRIC_KEYS
                if getattr(self, key) is not None}


@dataclass(frozen=True)
class Digests(Message):
    """The step's gradient digests (hex) of this worker's share; None where another replica
    hashes that parameter."""

    TYPE: ClassVar[str] = "digests"
    step: int
    digests: list[str | None]


@dataclass(frozen=True)
class ParamsFollow(Message):
    """One ``PARAMETER`` frame per name follows, in this order, numbered from 0."""

    TYPE: ClassVar[str] = "params_follow"
    names: list[str]


@dataclass(frozen=True)
class Checkpointed(Message):
    """The segment is written (replica 0 only: ``file`` and its ``sha256``); every replica
    sends the digest of its parameters, so drift between replicas is seen."""

    TYPE: ClassVar[str] = "checkpointed"
    params_digest: str
    file: str | None = None
    sha256: str | None = None
    error: str | None = None  # the segment could not be written (a full disk): why, one line


@dataclass(frozen=True)
class Failed(Message):
    """The worker failed; ``consequence``: because a neighbour's pipe closed (likely that
    neighbour's own failure, which the coordinator is better placed to name)."""

    TYPE: ClassVar[str] = "failed"
    message: str
    traceback: str = ""
    consequence: bool = False


@dataclass(frozen=True)
class Exited(Message):
    """An MPI rank's last word: its exit status (it exits 0 itself, see the MPI launcher)."""

    TYPE: ClassVar[str] = "exited"
    status: int
    pid: int


MESSAGES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Init, Step, SendParams, WriteCheckpoint, Stop, Hold, Halt,
                              Restore, Ready, Heartbeat, StepDone, Digests, ParamsFollow,
                              Checkpointed, Failed, Exited, Halted, Restored)
}
_FIELDS = {cls: ({f.name for f in dataclasses.fields(cls)},
                 {f.name for f in dataclasses.fields(cls)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING})
           for cls in MESSAGES.values()}


# Field names in order, per class: encode reads them directly.
_NAMES = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in MESSAGES.values()}


def _nested(value: object) -> dict:
    """json.dumps' fallback: a dataclass inside a field, as ``asdict`` would have made it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot encode {type(value).__name__} in a control message")


def encode(message: Message) -> np.ndarray:
    """The CONTROL payload of ``message``: UTF-8 JSON as a uint8 array (NaN allowed, so a
    diverged loss can still be reported). The fields are read one level deep, not through
    ``dataclasses.asdict`` (its recursive copy was 3-5x the whole encode for a StepDone, sent
    every step); the JSON is byte for byte the same."""
    body = {"type": message.TYPE}
    names = _NAMES.get(type(message)) or tuple(f.name for f in dataclasses.fields(message))
    for name in names:
        body[name] = getattr(message, name)
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False, default=_nested)
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(array: np.ndarray) -> Message:
    """The message in a CONTROL payload; anything else is a :class:`ProtocolError`."""
    if array.dtype != np.uint8 or array.ndim != 1:
        raise ProtocolError(f"a control payload must be a 1-d uint8 array, got {array.dtype} "
                            f"with shape {array.shape}")
    try:
        body = json.loads(array.tobytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"control payload is not valid UTF-8: {exc}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ProtocolError(f"control payload is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"control payload is not a JSON object: {str(body)[:80]}")
    cls = MESSAGES.get(body.pop("type", None))
    if cls is None:
        raise ProtocolError(f"unknown control message {str(body)[:80]}")
    known, required = _FIELDS[cls]
    unknown, missing = set(body) - known, required - set(body)
    if unknown or missing:
        raise ProtocolError(f"{cls.TYPE} message with unknown fields {sorted(unknown)} or "
                            f"missing fields {sorted(missing)}")
    return cls(**body)


__all__ = ["MESSAGES", "METRIC_KEYS", "Checkpointed", "Digests", "Exited", "Failed", "Halt",
           "Halted", "Heartbeat", "Hold", "Init", "Message", "ParamsFollow", "Ready",
           "Restore", "Restored", "SendParams", "Step", "StepDone", "Stop", "WriteCheckpoint",
           "decode", "encode"]
