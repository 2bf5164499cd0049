"""Cutting the model into contiguous, balanced segments (one per pipeline stage).

Cuts fall between layers, never inside one: a transformer block is one layer of the model.
"""

from __future__ import annotations

import time
from functools import cache

import numpy as np

from pipetrain.nn import Context, build_segment, init_parameters
from pipetrain.pipeline.stage import ModelSpec


def layer_costs(sizes: list[int]) -> list[int]:
    """Cost of each dense layer of a ``layers = [...]`` stack: its parameter count (which also
    tracks its FLOPs per sample)."""
    return [fan_in * fan_out + fan_out for fan_in, fan_out in zip(sizes, sizes[1:], strict=False)]


def parameter_costs(model: ModelSpec) -> list[int]:
    """Each layer's parameter count (for the shorthand, exactly :func:`layer_costs`).

    Parameter-free layers cost nothing here and join whichever neighbour the cut favours; a
    block is one layer, so no cut ever falls inside it.
    """
    return [layer.num_params for layer in model.resolved]


def measured_layer_costs(model: ModelSpec, microbatch: int, repeats: int = 5) -> list[float]:
    """Seconds per micro-batch of each layer's forward and backward, measured here and now.

    Parameter count tracks FLOPs but not speed: a convolution has few parameters and many
    FLOPs, attention's cost grows with the sequence, not with its weights, and a wide first
    layer fed by a narrow input runs at a different rate than a square one. Each layer runs on
    random data of its real input shape; the median of a few repeats is enough to balance the
    stages.
    """
    rng = np.random.default_rng(0)
    dtype = np.dtype(model.dtype)
    params = init_parameters(model.resolved, model.seed, dtype)
    context = Context(seed=model.seed, step=1, positions=np.arange(microbatch))
    costs = []
    for layer in model.resolved:
        segment = build_segment(model.resolved, params, layer.index, layer.index + 1)
        segment.needs_input_grad = layer.index > 0
        if layer.index == 0 and model.data.tokens:
            x = rng.integers(0, max(model.data.vocab, 1), (microbatch, *layer.in_shape))
        else:
            x = rng.standard_normal((microbatch, *layer.in_shape)).astype(dtype)
        grad = rng.standard_normal((microbatch, *layer.out_shape)).astype(dtype)
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            segment.forward(0, x, context=context)
            segment.backward(0, grad)
            samples.append(time.perf_counter() - started)
        costs.append(sorted(samples)[len(samples) // 2])
    return costs


def stage_bounds(model: ModelSpec, stages: int, balance: str) -> list[tuple[int, int]]:
    """The layers ``[first, stop)`` of every stage, balanced by parameters or measured time."""
    if balance == "time":
        microbatch = max(1, model.batch_size // (model.replicas * model.microbatches))
        return partition(measured_layer_costs(model, microbatch), stages)
    if balance != "params":
        raise ValueError(f"unknown balance {balance!r} (params or time)")
    return partition(parameter_costs(model), stages)


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
