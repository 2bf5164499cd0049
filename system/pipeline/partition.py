"""Cutting the layer stack into contiguous, balanced segments (one per pipeline stage)."""

from __future__ import annotations

import time
from functools import cache

import numpy as np


def layer_costs(sizes: list[int]) -> list[int]:
    """Cost of each dense layer: its parameter count (which also tracks its FLOPs per sample)."""
    return [fan_in * fan_out + fan_out for fan_in, fan_out in zip(sizes, sizes[1:], strict=False)]


def measured_layer_costs(sizes: list[int], microbatch: int, dtype: str,
                         repeats: int = 5) -> list[float]:
    """Seconds per micro-batch of each layer's forward and backward, measured here and now.

    Parameter count tracks FLOPs but not speed: a wide first layer fed by a narrow input runs
    at a different rate than a square one, and the loss and ReLU add their own time. The
    median of a few repeats on random data is enough to balance the stages.
    """
    rng = np.random.default_rng(0)
    costs = []
    for fan_in, fan_out in zip(sizes, sizes[1:], strict=False):
        x = rng.standard_normal((microbatch, fan_in)).astype(dtype)
        weight = rng.standard_normal((fan_in, fan_out)).astype(dtype)
        grad_w = np.zeros_like(weight)
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            y = np.maximum(x @ weight, 0)
            grad_y = np.where(y > 0, y, 0)
            _ = grad_y @ weight.T
            grad_w += x.T @ grad_y
            samples.append(time.perf_counter() - started)
        costs.append(sorted(samples)[len(samples) // 2])
    return costs


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
