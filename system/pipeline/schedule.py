"""Pipeline schedules as plain data (in the style of ``torch.distributed.pipelining``).

A schedule is one list of :class:`Action` per stage; stage ``s`` executes its list strictly in
order.  An action is ``(stage, op, microbatch)`` and prints as ``2F0`` (stage 2, forward, mb 0).
Ops: ``F`` forward, ``B`` full backward (input and weight gradient), ``I`` input gradient only,
``W`` weight gradient only (deferred, zero-bubble).  Weight gradients (``B`` or ``W``) always run
in ascending micro-batch order on every stage, so gradient accumulation is bitwise identical to a
single-process reference.  1F1B for S=3 stages and M=4 micro-batches (F=1, B=2 time units,
``-`` = the B continues, ``.`` = idle)::

    0 | 0F0 0F1 0F2  .   .   .   .  0B0  -  0F3 0B1  -   .  0B2  -   .  0B3  -
    1 |  .  1F0 1F1  .   .  1B0  -  1F2 1B1  -  1F3 1B2  -   .  1B3  -   .   .
    2 |  .   .  2F0 2B0  -  2F1 2B1  -  2F2 2B2  -  2F3 2B3  -   .   .   .   .

Interleaved 1F1B (``pipetrain.pipeline.interleaved``) cuts the model into ``S * V`` *pieces*
and gives stage ``s`` the pieces ``s, s + S, s + 2S, ...``; its actions name the piece they run,
printed after an ``@`` (``0F1@2``: stage 0, forward of micro-batch 1 through piece 2). An action
without a piece runs the stage's only piece, whose index is the stage's own.

Communication model (used by :func:`validate` and :func:`simulate`), over pieces ``k`` (the
stages themselves when there are no pieces): ``F(k,m)`` needs ``F(k-1,m)``; ``B/I(k,m)`` needs
``F(k,m)`` and ``B/I(k+1,m)``; ``W(k,m)`` needs ``I(k,m)``. Sends never block, and every link
delivers in order, so each stage must consume a neighbour's frames in the order the neighbour
sends them (:func:`check_link_order`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import NamedTuple


class Op(enum.StrEnum):
    """F forward, B full backward, I input-gradient only, W weight-gradient only."""
    FORWARD = "F"
    BACKWARD = "B"
    BACKWARD_INPUT = "I"
    BACKWARD_WEIGHT = "W"


class Action(NamedTuple):
    stage: int
    op: Op
    microbatch: int
    piece: int | None = None  # which of the stage's pieces (None: its only one)

    def __str__(self) -> str:
        where = "" if self.piece is None else f"@{self.piece}"
        return f"{self.stage}{Op(self.op).value}{self.microbatch}{where}"

    @property
    def segment(self) -> int:
        """The global index of the piece this action runs (the stage's own without pieces)."""
        return self.stage if self.piece is None else self.piece


class ScheduleError(ValueError):
    """A schedule is malformed or cannot run (deadlock)."""


Schedule = list[list[Action]]
F, B, I, W = Op.FORWARD, Op.BACKWARD, Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT  # noqa: E741
DEFAULT_COST: Mapping[Op, float] = {F: 1, B: 2, I: 1, W: 1}


def _check_sizes(num_stages: int, num_microbatches: int) -> None:
    for what, n in (("num_stages", num_stages), ("num_microbatches", num_microbatches)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{what} must be an integer >= 1, got {n!r}")


def gpipe(num_stages: int, num_microbatches: int) -> Schedule:
    """All forwards, then all backwards (ascending). Peak activations per stage: M."""
    _check_sizes(num_stages, num_microbatches)
    mbs = range(num_microbatches)
    return [[Action(s, F, m) for m in mbs] + [Action(s, B, m) for m in mbs]
            for s in range(num_stages)]


def one_f_one_b(num_stages: int, num_microbatches: int) -> Schedule:
    """Warm-up min(S-1-s, M) forwards, then alternate F/B, then cool-down backwards.

    Peak live activations on stage s: min(S - s, M).
    """
    _check_sizes(num_stages, num_microbatches)
    out = []
    for s in range(num_stages):
        warm = min(num_stages - 1 - s, num_microbatches)
        acts = [Action(s, F, m) for m in range(warm)]
        for i in range(num_microbatches):  # steady 1F1B, then cool-down backwards
            acts += [Action(s, F, warm + i)] if i < num_microbatches - warm else []
            acts.append(Action(s, B, i))
        out.append(acts)
    return out


def zero_bubble_h1(num_stages: int, num_microbatches: int) -> Schedule:
    """ZB-H1: 1F1B with B split into I and W; stage s defers its first s W's to the tail.

    Guarantee on stage s: at most min(S - s, M) micro-batches forwarded but not yet I'd (as in
    1F1B) and, whenever a forward runs, at most s with only W pending; so at most min(S, M) live
    activations in total (1F1B's peak, on stage 0).  With F=I=W=1 (B=2) the makespan is
    3M + S - 1 versus 1F1B's 3(M + S - 1).
    """
    _check_sizes(num_stages, num_microbatches)
    out = []
    for s in range(num_stages):
        warm = min(num_stages - 1 - s, num_microbatches)
        acts = [Action(s, F, m) for m in range(warm)]
        next_w = 0
        for i in range(num_microbatches):
            acts += [Action(s, F, warm + i)] if i < num_microbatches - warm else []
            acts.append(Action(s, I, i))
            if i >= s:  # the first s W's are deferred to the tail (fill the cool-down bubbles)
                acts.append(Action(s, W, next_w))
                next_w += 1
        acts += [Action(s, W, m) for m in range(next_w, num_microbatches)]
        out.append(acts)
    return out


def interleaved_warmup(num_stages: int, num_microbatches: int, virtual_stages: int,
                       stage: int) -> int:
    """Megatron's warm-up: forwards that stage ``stage`` runs before its first backward."""
    total = num_microbatches * virtual_stages
    if num_microbatches == num_stages:  # Megatron: then every stage warms up fully
        return total
    return min(total, (num_stages - stage - 1) * 2 + (virtual_stages - 1) * num_stages)


def interleaved_one_f_one_b(num_stages: int, num_microbatches: int,
                            virtual_stages: int = 2) -> Schedule:
    """Interleaved 1F1B (Megatron-LM, torch's ScheduleInterleaved1F1B): stage ``s`` holds pieces
    ``s + v*S`` (v < V) of a model cut into ``S*V``; micro-batches go through in rounds of S.

    A stage's k-th forward is piece-chunk ``(k // S) % V`` of micro-batch ``(k // (S*V)) * S +
    k % S``; its k-th backward the same with the chunks counted from the last. Every stage runs
    the same order, so each consumes its neighbours' frames as they were sent, and each piece
    runs its backwards in ascending micro-batch order (the reference's accumulation order).
    Warm-up as Megatron's (:func:`interleaved_warmup`), then one forward and one backward in
    turn. The bubble shrinks about V times (a stage waits for pieces 1/V as long), for V times
    as many sends of 1/V the work each. Needs ``M`` a multiple of ``S``.
    """
    _check_sizes(num_stages, num_microbatches)
    if not isinstance(virtual_stages, int) or isinstance(virtual_stages, bool) or \
            virtual_stages < 1:
        raise ValueError(f"virtual_stages must be an integer >= 1, got {virtual_stages!r}")
    if num_microbatches % num_stages:
        raise ValueError(f"interleaved 1F1B needs the micro-batches ({num_microbatches}) to be "
                         f"a multiple of the stages ({num_stages})")
    rounds, total = num_stages * virtual_stages, num_microbatches * virtual_stages

    def nth(stage: int, op: Op, k: int) -> Action:
        group, rest = divmod(k, rounds)
        chunk = rest // num_stages if op == F else virtual_stages - 1 - rest // num_stages
        return Action(stage, op, group * num_stages + rest % num_stages,
                      chunk * num_stages + stage)

    out = []
    for s in range(num_stages):
        warm = interleaved_warmup(num_stages, num_microbatches, virtual_stages, s)
        acts = [nth(s, F, k) for k in range(warm)]
        for k in range(total - warm):
            acts += [nth(s, F, warm + k), nth(s, B, k)]
        acts += [nth(s, B, k) for k in range(total - warm, total)]
        out.append(acts)
    return out


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "zb": zero_bubble_h1,
             "interleaved": interleaved_one_f_one_b}
# Pieces per stage of the schedules that cut a stage's share of the model into several.
DEFAULT_VIRTUAL_STAGES = {"interleaved": 2}


def build(name: str, num_stages: int, num_microbatches: int,
          virtual_stages: int | None = None) -> Schedule:
    """Build the named schedule ("gpipe", "1f1b", "zb" or "interleaved"); ``virtual_stages``
    (pieces per stage) only for "interleaved", whose default is 2."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    if name in DEFAULT_VIRTUAL_STAGES:
        return SCHEDULES[name](num_stages, num_microbatches,
                               virtual_stages or DEFAULT_VIRTUAL_STAGES[name])
    if virtual_stages not in (None, 1):
        raise ValueError(f"schedule {name!r} runs one piece per stage, not {virtual_stages}")
    return SCHEDULES[name](num_stages, num_microbatches)


Key = tuple[int, Op, int]  # (piece, op, micro-batch): what a dependency names


def _key(a: Action) -> Key:
    return (a.segment, a.op, a.microbatch)


def dependencies(a: Action, num_pieces: int) -> list[tuple[Key, ...]]:
    """Dependencies of ``a``: each entry is a group of alternatives (any one suffices). The one
    rule that ``simulate``, ``validate`` and the ideal pipeline of a trace all replay."""
    k, op, m = _key(a)
    if op == F:
        return [((k - 1, F, m),)] if k > 0 else []
    if op == W:
        return [((k, I, m),)]
    deps = [((k, F, m),)]
    if k < num_pieces - 1:
        deps.append(((k + 1, B, m), (k + 1, I, m)))
    return deps


def _name(key: Key) -> str:
    return f"{Op(key[1]).value}{key[2]}@{key[0]}"


def num_pieces(schedule: Sequence[Sequence[Action]]) -> int:
    """How many pieces the model is cut into (the stage count without interleaving)."""
    return max((a.segment + 1 for acts in schedule for a in acts), default=len(schedule))


def simulate(schedule: Sequence[Sequence[Action]],
             cost: Mapping[Op, float] = DEFAULT_COST,
             piece_cost: float | Sequence[float] = 1.0) -> dict:
    """Event-driven timing: an action starts at max(stage free, dependencies' finish).

    ``piece_cost`` scales the actions of a piece: one factor for all (1/V when V pieces make
    up one stage's share of the model), or one per piece (measured, unbalanced). Returns
    ``{"makespan", "busy": [per stage], "idle": [makespan - busy per stage], "start":
    {Action: t}, "finish": {Action: t}}``. Raises ScheduleError on deadlock.
    """
    n, pieces = len(schedule), num_pieces(schedule)
    scale = [piece_cost] * pieces if isinstance(piece_cost, int | float) else list(piece_cost)
    pos, free = [0] * n, [0.0] * n
    start: dict[Action, float] = {}
    finish: dict[Action, float] = {}
    done: dict[Key, float] = {}
    progress = True
    while progress:
        progress = False  # sweep until no stage can advance
        for s in range(n):
            while pos[s] < len(schedule[s]):
                a = schedule[s][pos[s]]
                ts = [min((done[d] for d in grp if d in done), default=None)
                      for grp in dependencies(a, pieces)]
                if None in ts:
                    break
                start[a] = max([free[s], *ts])
                free[s] = finish[a] = done[_key(a)] = start[a] + cost[a.op] * scale[a.segment]
                pos[s] += 1
                progress = True
    stuck = [(s, schedule[s][pos[s]]) for s in range(n) if pos[s] < len(schedule[s])]
    if stuck:
        why = "; ".join(
            f"stage {s} stuck at {a} waiting for "
            + " and ".join("/".join(map(_name, g)) for g in dependencies(a, pieces)
                           if not any(d in done for d in g))
            for s, a in stuck)
        raise ScheduleError(f"deadlock: no stage can advance; {why}")
    makespan = max(finish.values(), default=0)
    busy = [sum(cost[a.op] * scale[a.segment] for a in x) for x in schedule]
    return {"makespan": makespan, "busy": busy, "idle": [makespan - b for b in busy],
            "start": start, "finish": finish}


def check_link_order(schedule: Sequence[Sequence[Action]]) -> None:
    """Raise ScheduleError unless every stage consumes each neighbour's frames in the order
    the neighbour sends them: a link is a FIFO, and a frame names only its micro-batch.

    Piece ``k`` lives on stage ``stage_of[k]``; its forward sends to the stage of ``k + 1``
    (the last stage's later pieces wrap round to stage 0), its input gradient to the stage of
    ``k - 1``.
    """
    pieces = num_pieces(schedule)
    stage_of = {a.segment: a.stage for acts in schedule for a in acts}
    sent: dict[tuple[int, int, str], list[tuple[int, int]]] = {}
    received: dict[tuple[int, int, str], list[tuple[int, int]]] = {}
    for acts in schedule:
        for a in acts:
            k, m = a.segment, a.microbatch
            if a.op == F and k + 1 < pieces:
                sent.setdefault((a.stage, stage_of[k + 1], "activation"), []).append((k + 1, m))
            if a.op == F and k > 0:
                received.setdefault((stage_of[k - 1], a.stage, "activation"), []).append((k, m))
            if a.op in (B, I) and k > 0:
                sent.setdefault((a.stage, stage_of[k - 1], "gradient"), []).append((k - 1, m))
            if a.op in (B, I) and k + 1 < pieces:
                received.setdefault((stage_of[k + 1], a.stage, "gradient"), []).append((k, m))
    for link in sorted(set(sent) | set(received)):
        if sent.get(link, []) != received.get(link, []):
            src, dst, kind = link
            raise ScheduleError(
                f"stage {dst} takes the {kind}s of stage {src} in another order than they are "
                f"sent: sent {sent.get(link, [])}, taken {received.get(link, [])} "
                "(piece, micro-batch)")


def validate(schedule: Sequence[Sequence[Action]], num_stages: int,
             num_microbatches: int, virtual_stages: int = 1) -> None:
    """Raise ScheduleError (naming the offending action) unless the schedule is runnable:
    every piece of every stage runs each micro-batch's forward and backward once, weight
    gradients in ascending micro-batch order per piece, links consumed in order, no deadlock."""
    _check_sizes(num_stages, num_microbatches)
    if len(schedule) != num_stages:
        raise ScheduleError(f"expected {num_stages} stage lists, got {len(schedule)}")
    for s, acts in enumerate(schedule):
        own = ({s} if virtual_stages == 1
               else {s + v * num_stages for v in range(virtual_stages)})
        # (piece, mb) -> ops so far
        ops: dict[tuple[int, int], list[Op]] = {(k, m): [] for k in sorted(own)
                                                for m in range(num_microbatches)}
        last_wgrad = dict.fromkeys(own, -1)
        for a in acts:
            if a.stage != s:
                raise ScheduleError(f"stage {s}'s list contains {a}, an action of stage {a.stage}")
            if a.segment not in own:
                raise ScheduleError(f"{a}: stage {s} holds pieces {sorted(own)}, not {a.segment}")
            if (a.segment, a.microbatch) not in ops:
                raise ScheduleError(f"{a}: micro-batch out of range 0..{num_microbatches - 1}")
            seen = ops[a.segment, a.microbatch]
            bwd = [o for o in seen if o != F]
            if a.op == F and F in seen:
                raise ScheduleError(f"duplicate forward {a} on stage {s}")
            if a.op != F and (a.op in bwd or B in bwd or (a.op == B and bwd)):
                raise ScheduleError(f"duplicate or mixed backward {a} on stage {s} "
                                    f"(already has {'+'.join(o.value for o in bwd)})")
            if a.op == W and I not in bwd:
                raise ScheduleError(f"{a} comes before its input gradient {a._replace(op=I)}")
            if a.op in (B, W) and a.microbatch <= last_wgrad[a.segment]:
                raise ScheduleError(f"{a} breaks ascending weight-gradient order on stage {s} "
                                    f"(after micro-batch {last_wgrad[a.segment]})")
            if a.op in (B, W):
                last_wgrad[a.segment] = a.microbatch
            seen.append(a.op)
        for (k, m), seen in ops.items():
            piece = None if virtual_stages == 1 else k
            if F not in seen:
                raise ScheduleError(f"stage {s} never runs forward {Action(s, F, m, piece)}")
            if len(seen) == 1:
                raise ScheduleError(f"stage {s} never runs backward {Action(s, B, m, piece)} "
                                    f"(or {Action(s, I, m, piece)} + {Action(s, W, m, piece)})")
            if W not in seen and B not in seen:
                raise ScheduleError(f"stage {s} runs {Action(s, I, m, piece)} but never "
                                    f"{Action(s, W, m, piece)}")
    check_link_order(schedule)
    simulate(schedule)


def peak_live_activations(stage_actions: Sequence[Action]) -> int:
    """Max number of micro-batches forwarded but not fully backwarded (B, or W after I)."""
    live = peak = 0
    for a in stage_actions:
        live += 1 if a.op == F else -1 if a.op in (B, W) else 0
        peak = max(peak, live)
    return peak


def render(schedule: Sequence[Sequence[Action]], mark: Action | None = None) -> str:
    """Rank-by-time grid using :func:`simulate`'s default costs; ``mark`` is bracketed.

    One row per stage, one column per time unit; ``.`` is idle and ``-`` continues the action
    to its left.  A deadlocking schedule is drawn in list order instead.
    """
    try:
        start = simulate(schedule)["start"]
    except ScheduleError:  # deadlock: draw each stage's list back to back
        start = {a: sum(DEFAULT_COST[b.op] for b in acts[:i])
                 for acts in schedule for i, a in enumerate(acts)}
    width = max((len(str(a)) for acts in schedule for a in acts), default=1)
    idle, cont = ".".center(width), "-".center(width)
    rows = []
    for acts in schedule:
        cells: list[str] = []
        marked = -1
        for a in acts:
            cells += [idle] * (int(start[a]) - len(cells))
            marked = len(cells) if a == mark else marked
            cells.append(str(a).center(width))
            cells += [cont] * (int(DEFAULT_COST[a.op]) - 1)
        rows.append((cells, marked))
    slots = max((len(cells) for cells, _ in rows), default=0)
    lines = []
    for s, (cells, marked) in enumerate(rows):
        cells += [idle] * (slots - len(cells))
        seps = [" "] * (slots + 1)
        if marked >= 0:
            seps[marked], seps[marked + 1] = "[", "]"
        line = "".join(sep + cell for sep, cell in zip(seps, cells + [""], strict=True))
        lines.append(f"{s} |{line}".rstrip())
    return "\n".join(lines)
