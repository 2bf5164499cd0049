"""Who links to whom in the S x R grid of workers, computed once and transport-neutral.

::

              stage 0          stage 1          stage 2
    replica 0   (0,0) ◀──────▶ (1,0) ◀──────▶ (2,0)      pipeline links: activations down,
                  ▲              ▲              ▲          gradients up
                  ▼              ▼              ▼          replica links: the all-reduce chain
    replica 1   (0,1) ◀──────▶ (1,1) ◀──────▶ (2,1)

A link is named from the side that holds it (``upstream`` / ``downstream`` along the pipeline,
``previous replica`` / ``next replica`` along the chain); each is two one-way streams. A *ring*
(interleaved 1F1B: the last stage's pieces feed the first stage's next ones) adds one link per
replica from the last stage's ``downstream`` to the first stage's ``upstream``; with two stages
the two stages then share two links, one each way round. The pipe
launcher turns a link into two ``os.pipe``s, the MPI launcher into a peer rank; the worker only
sees names and channels.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipetrain.pipeline.stage import DOWNSTREAM, UPSTREAM

PREV_REPLICA, NEXT_REPLICA = "previous replica", "next replica"
PIPELINE_LINKS = (UPSTREAM, DOWNSTREAM)
REPLICA_LINKS = (PREV_REPLICA, NEXT_REPLICA)


@dataclass(frozen=True, order=True)
class Position:
    """A worker's place in the grid."""

    stage: int
    replica: int


@dataclass(frozen=True)
class Link:
    """One link, from the side that names it ``downstream`` (or ``next replica``)."""

    low: Position
    low_name: str
    high: Position
    high_name: str


@dataclass(frozen=True)
class Grid:
    stages: int
    replicas: int
    ring: bool = False  # the last stage links round to the first (interleaved 1F1B)

    def __post_init__(self) -> None:
        if self.stages < 1 or self.replicas < 1:
            raise ValueError(f"a grid needs at least one stage and one replica, got "
                             f"{self.stages} x {self.replicas}")

    def positions(self) -> list[Position]:
        """Every worker, replica by replica, stages in order: the order of every list of
        workers (and of MPI ranks 1..S*R)."""
        return [Position(s, r) for r in range(self.replicas) for s in range(self.stages)]

    def links(self, at: Position) -> dict[str, Position]:
        """The neighbours of ``at``, by link name (only the links it has)."""
        found = {}
        ring = self.ring and self.stages > 1
        if at.stage > 0 or ring:
            found[UPSTREAM] = Position((at.stage - 1) % self.stages, at.replica)
        if at.stage < self.stages - 1 or ring:
            found[DOWNSTREAM] = Position((at.stage + 1) % self.stages, at.replica)
        if at.replica > 0:
            found[PREV_REPLICA] = Position(at.stage, at.replica - 1)
        if at.replica < self.replicas - 1:
            found[NEXT_REPLICA] = Position(at.stage, at.replica + 1)
        return found

    def edges(self) -> list[Link]:
        """Every link once, from the side that names it ``downstream`` or ``next replica``
        (with a ring of two stages, the two links between them are two edges)."""
        other = {DOWNSTREAM: UPSTREAM, NEXT_REPLICA: PREV_REPLICA}
        return [Link(at, name, peer, other[name]) for at in self.positions()
                for name, peer in self.links(at).items() if name in other]

    def wraps(self, at: Position, name: str) -> bool:
        """Whether ``at``'s link ``name`` is the ring's link round from the last stage to the
        first (MPI gives it a tag of its own: with two stages it joins the same two ranks as
        the other pipeline link)."""
        return self.ring and self.stages > 1 and (
            (name == DOWNSTREAM and at.stage == self.stages - 1)
            or (name == UPSTREAM and at.stage == 0))

    def rank(self, at: Position) -> int:
        """The MPI rank of ``at`` (rank 0 is the coordinator)."""
        return 1 + at.replica * self.stages + at.stage

    @property
    def size(self) -> int:
        return self.stages * self.replicas
