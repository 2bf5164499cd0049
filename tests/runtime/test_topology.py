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


@pytest.mark.parametrize(("stages", "replicas"), [(1, 1), (1, 3), (4, 1), (3, 2), (2, 4)])
def test_links_are_symmetric_and_edges_list_each_once(stages, replicas):
    grid = Grid(stages, replicas)
    opposite = {UPSTREAM: DOWNSTREAM, DOWNSTREAM: UPSTREAM, PREV_REPLICA: NEXT_REPLICA,
                NEXT_REPLICA: PREV_REPLICA}
    for at in grid.positions():
        for name, peer in grid.links(at).items():
            assert grid.links(peer)[opposite[name]] == at
    edges = grid.edges()
    assert len(edges) == len(set(edges)) == (stages - 1) * replicas + stages * (replicas - 1)
    assert all(a < b for a, b in edges)


def test_an_empty_grid_is_refused():
    with pytest.raises(ValueError, match="at least one stage"):
        Grid(0, 1)
