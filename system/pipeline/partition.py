"""Cutting the model into contiguous, balanced segments (one per pipeline stage, or V per
stage for interleaved 1F1B).

Cuts fall between layers, never inside one: a transformer block is one layer of the model.
With V pieces per stage the model is cut into ``S * V`` contiguous pieces and stage ``s`` holds
pieces ``s, s + S, s + 2S, ...``: a stage's layers are then given as ``(first, stop)`` pairs, one
per piece in ascending order, flattened into one tuple (``(0, 1, 2, 3)``: layers 0 and 2), so
that a stage of one piece keeps its plain ``(first, stop)``.
"""

from __future__ import annotations

import math
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


def stage_bounds(model: ModelSpec, stages: int, balance: str,
                 virtual_stages: int = 1) -> list[tuple[int, ...]]:
    """The layers of every stage, balanced by parameters or measured time: ``(first, stop)``,
    or with ``virtual_stages`` V > 1 the flattened pairs of its V pieces (see the module)."""
    if balance == "time":
        microbatch = max(1, model.batch_size // (model.replicas * model.microbatches))
        costs: list[float] = measured_layer_costs(model, microbatch)
    elif balance == "params":
        costs = list(parameter_costs(model))
    else:
        raise ValueError(f"unknown balance {balance!r} (params or time)")
    pieces = partition(costs, stages * virtual_stages)
    return [tuple(bound for piece in pieces[stage::stages] for bound in piece)
            for stage in range(stages)]


def stage_pieces(layers: tuple[int, ...] | list[int], stage: int,
                 stages: int) -> dict[int, tuple[int, int]]:
    """``{piece: (first, stop)}`` of a stage's flattened layer pairs (see the module)."""
    if not layers or len(layers) % 2:
        raise ValueError(f"stage {stage}: layers must be (first, stop) pairs, got {layers!r}")
    return {stage + position * stages: (layers[2 * position], layers[2 * position + 1])
            for position in range(len(layers) // 2)}


def inbound_bytes_per_step(model: ModelSpec, pieces: dict[int, tuple[int, int]],
                           header_bytes: int) -> int:
    """The most a neighbour can send this stage on one link in one step: per piece, a frame per
    micro-batch (activations in, or gradients of its output), each as large as the widest of
    the piece's cuts, for this replica's rows of the batch. Steps run in lock-step, so this is
    all that can be waiting in the link before the stage reads it."""
    resolved = model.resolved
    rows = -(-model.batch_size // model.replicas)
    itemsize = np.dtype(model.dtype).itemsize
    total = 0
    for first, stop in pieces.values():
        cuts = [math.prod(resolved[first].in_shape)] if first > 0 else []
        if stop < len(resolved):
            cuts.append(math.prod(resolved[stop - 1].out_shape))
        if cuts:
            total += rows * max(cuts) * itemsize + model.microbatches * header_bytes
    return total


def describe_layers(layers: tuple[int, ...] | list[int]) -> str:
    """``0-1`` for one piece, ``0-0, 2-2`` for several."""
    return ", ".join(f"{layers[i]}-{layers[i + 1] - 1}" for i in range(0, len(layers), 2))


def stage_names(model: ModelSpec, layers: tuple[int, ...] | list[int]) -> list[str]:
    """A stage's parameter names in its own order (its pieces ascending)."""
    return [name for first, stop in zip(layers[::2], layers[1::2], strict=True)
            for name in model.parameter_names(first, stop)]


def canonical_positions(model: ModelSpec,
                        bounds: list[tuple[int, ...]]) -> list[tuple[int, int]]:
    """``(stage, position)`` of every parameter in canonical order (layer index ascending, a
    layer's own order inside it), ``position`` counting in the stage's own order: stage by
    stage with one piece per stage, in turns across the stages with several."""
    keyed = [(int(name.split(".")[1]), position, stage)
             for stage, layers in enumerate(bounds)
             for position, name in enumerate(stage_names(model, layers))]
    return [(stage, position) for _, position, stage in sorted(keyed)]


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
