"""pipetrain.runtime.topology: who links to whom in the S x R grid, computed once."""

from __future__ import annotations

import pytest

from pipetrain.runtime.topology import (
    DOWNSTREAM,
    NEXT_REPLICA,
    PREV_REPLICA,
    UPSTREAM,
    Grid,
    Position,
)


def test_positions_go_replica_by_replica_and_ranks_follow():
    grid = Grid(3, 2)
    assert grid.positions() == [Position(0, 0), Position(1, 0), Position(2, 0),
                                Position(0, 1), Position(1, 1), Position(2, 1)]
    assert [grid.rank(at) for at in grid.positions()] == [1, 2, 3, 4, 5, 6]
    assert grid.size == 6


def test_links_name_each_neighbour_from_the_holders_side():
    grid = Grid(3, 2)
    assert grid.links(Position(0, 0)) == {DOWNSTREAM: Position(1, 0),
                                          NEXT_REPLICA: Position(0, 1)}
    assert grid.links(Position(1, 1)) == {UPSTREAM: Position(0, 1),
                                          DOWNSTREAM: Position(2, 1),
                                          PREV_REPLICA: Position(1, 0)}
    assert Grid(1, 1).links(Position(0, 0)) == {}


CASES = [(1, 1, False), (1, 3, False), (4, 1, False), (3, 2, False), (2, 4, False),
         (2, 1, True), (2, 2, True), (3, 2, True), (4, 1, True), (1, 2, True)]


@pytest.mark.parametrize(("stages", "replicas", "ring"), CASES)
def test_links_are_symmetric_and_edges_list_each_once(stages, replicas, ring):
    grid = Grid(stages, replicas, ring=ring)
    opposite = {UPSTREAM: DOWNSTREAM, DOWNSTREAM: UPSTREAM, PREV_REPLICA: NEXT_REPLICA,
                NEXT_REPLICA: PREV_REPLICA}
    for at in grid.positions():
        for name, peer in grid.links(at).items():
            assert grid.links(peer)[opposite[name]] == at
    edges = grid.edges()
    wrap = replicas if ring and stages > 1 else 0  # one link round the ring per replica
    assert len(edges) == len(set(edges)) == (
        (stages - 1) * replicas + stages * (replicas - 1) + wrap)
    for link in edges:  # each named from both of its sides, the names opposite
        assert grid.links(link.low)[link.low_name] == link.high
        assert grid.links(link.high)[link.high_name] == link.low
        assert opposite[link.low_name] == link.high_name
    # every link end of every worker is in exactly one edge
    ends = [(e.low, e.low_name) for e in edges] + [(e.high, e.high_name) for e in edges]
    assert sorted(ends, key=str) == sorted(
        ((at, name) for at in grid.positions() for name in grid.links(at)), key=str)


def test_a_ring_links_the_last_stage_round_to_the_first():
    grid = Grid(3, 1, ring=True)
    assert grid.links(Position(2, 0))[DOWNSTREAM] == Position(0, 0)
    assert grid.links(Position(0, 0))[UPSTREAM] == Position(2, 0)
    assert grid.wraps(Position(2, 0), DOWNSTREAM) and grid.wraps(Position(0, 0), UPSTREAM)
    assert not grid.wraps(Position(1, 0), DOWNSTREAM)
    assert not Grid(3, 1).wraps(Position(2, 0), DOWNSTREAM)
    # two stages: both pipeline links join the same pair, one each way round
    two = Grid(2, 1, ring=True)
    assert two.links(Position(0, 0)) == {UPSTREAM: Position(1, 0), DOWNSTREAM: Position(1, 0)}
    assert [(e.low, e.low_name, e.high) for e in two.edges()] == [
        (Position(0, 0), DOWNSTREAM, Position(1, 0)), (Position(1, 0), DOWNSTREAM, Position(0, 0))]
    assert Grid(1, 2, ring=True).links(Position(0, 0)) == {NEXT_REPLICA: Position(0, 1)}


def test_an_empty_grid_is_refused():
    with pytest.raises(ValueError, match="at least one stage"):
        Grid(0, 1)
