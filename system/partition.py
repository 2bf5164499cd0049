"""Cutting the layer stack into contiguous, balanced segments (one per pipeline stage)."""

from __future__ import annotations

from functools import cache


def layer_costs(sizes: list[int]) -> list[int]:
    """Cost of each dense layer: its parameter count (which also tracks its FLOPs per sample)."""
    return [fan_in * fan_out + fan_out for fan_in, fan_out in zip(sizes, sizes[1:], strict=False)]


def partition(costs: list[float], num_stages: int) -> list[tuple[int, int]]:
    """``[(first, stop), ...]``: contiguous segments minimising the largest segment's cost.

    Exact (dynamic programming over cut points); ties go to the earliest cut, so the result is
    a pure function of the costs.
    """
    num_layers = len(costs)
    if not 1 <= num_stages <= num_layers:
        raise ValueError(
            f"cannot split {num_layers} layers into {num_stages} stages: each stage needs a layer"
        )
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)

    @cache
    def best(first: int, stages: int) -> tuple[float, tuple[int, ...]]:
        if stages == 1:
            return prefix[num_layers] - prefix[first], ()
        answer: tuple[float, tuple[int, ...]] | None = None
        for cut in range(first + 1, num_layers - stages + 2):
            rest, cuts = best(cut, stages - 1)
            worst = max(prefix[cut] - prefix[first], rest)
            if answer is None or worst < answer[0]:
                answer = (worst, (cut, *cuts))
        assert answer is not None
        return answer

    cuts = [0, *best(0, num_stages)[1], num_layers]
    return list(zip(cuts, cuts[1:], strict=False))
