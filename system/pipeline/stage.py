"""The compute of one pipeline stage, free of pipes and processes.

A :class:`Stage` holds its own segment of layers, its optimizer and the state of the micro-batches
in flight. It executes one schedule :class:`~pipetrain.pipeline.schedule.Action` at a time and
*says* what to send (an :class:`Outgoing`) instead of touching pipes; the worker process
(``pipetrain.runtime.worker``) moves the frames. This keeps the math testable in one process and
the plumbing thin.

Where a stage's inputs come from:

* ``F`` on the first stage reads samples from the workload; on the others, the activation frame
  of the previous stage;
* ``B``/``I`` on the last stage uses the logit gradient it computed in its own ``F``; on the
  others, the gradient frame of the next stage.

With interleaved 1F1B a stage holds several non-contiguous *pieces* (``pipetrain.pipeline.
partition``), each its own segment; an action names the piece it runs, and "first" and "last"
above are the model's first and last piece. Piece ``k + 1`` is always on the next stage (the
last stage's wrap round to stage 0), so a piece's frames still go ``DOWNSTREAM`` and
``UPSTREAM``: the worker maps them to its links.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from pipetrain.data.loader import MicroBatch
from pipetrain.data.sampler import batch_positions
from pipetrain.nn import (
    Context,
    InputSpec,
    LayerSpec,
    ResolvedLayer,
    Segment,
    build_segment,
    init_parameters,
    make_optimizer,
    parameter_names,
    resolve,
    softmax_cross_entropy,
)
from pipetrain.pipeline.schedule import Action, Op
from pipetrain.wire.frames import Kind

UPSTREAM, DOWNSTREAM = "upstream", "downstream"
# (step, {name: gradient}): one layer's gradients, final for the step (Stage.on_grads_final)
GradsFinal = Callable[[int, dict[str, np.ndarray]], None]


@dataclass(frozen=True)
class ModelSpec:
    """What a stage needs to know of the whole model and its training step."""

    layers: tuple[LayerSpec, ...]
    data: InputSpec  # the shape of one sample (the model's input)
    seed: int
    dtype: str
    optimizer: str
    lr: float
    batch_size: int  # the global batch: every loss is divided by it
    microbatches: int
    replicas: int = 1

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @cached_property
    def resolved(self) -> list[ResolvedLayer]:
        """Every layer with its shapes (raises ModelError if the model does not fit)."""
        return resolve(self.layers, self.data)

    def parameter_names(self, first: int = 0, stop: int | None = None) -> list[str]:
        return parameter_names(self.resolved, first, stop)

    @cached_property
    def _positions(self) -> list[list[np.ndarray]]:
        return [[batch_positions(self.batch_size, self.replicas, self.microbatches, replica,
                                 microbatch) for microbatch in range(self.microbatches)]
                for replica in range(self.replicas)]

    def context(self, step: int, replica: int, microbatch: int) -> Context:
        """The training context of a micro-batch: its rows' positions in the global batch
        (worked out once: cutting the batch costs more than a small layer's step)."""
        return Context(seed=self.seed, step=step, positions=self._positions[replica][microbatch])


@dataclass(frozen=True)
class Outgoing:
    direction: str  # DOWNSTREAM (to the next stage) or UPSTREAM (to the previous one)
    kind: Kind
    microbatch: int
    array: np.ndarray


class Stage:
    """Layers ``[first_layer, stop_layer)`` of the model, as stage ``index`` of ``num_stages``;
    or, with ``pieces`` (``{piece: (first, stop)}``) of a model cut into ``num_pieces``, those.

    ``on_grads_final(step, grads)`` is called with each layer's gradient arrays as soon as they
    are final for the step (the last micro-batch's weight pass has gone through the layer's
    piece), last layer of a piece first; a replicated stage starts reducing them there.
    """

    def __init__(
        self, *, model: ModelSpec, index: int, num_stages: int, first_layer: int = 0,
        stop_layer: int = 0, source: Callable[[int, int], MicroBatch] | None,
        on_grads_final: GradsFinal | None = None, replica: int = 0,
        pieces: dict[int, tuple[int, int]] | None = None, num_pieces: int | None = None,
    ) -> None:
        self.model = model
        self.index = index
        self.replica = replica
        self.pieces = dict(sorted((pieces or {index: (first_layer, stop_layer)}).items()))
        self.num_pieces = num_stages if num_pieces is None else num_pieces
        self.is_first = 0 in self.pieces
        self.is_last = self.num_pieces - 1 in self.pieces
        if (self.is_first or self.is_last) and source is None:
            raise ValueError("the first and last stages need a source of micro-batches")
        # source(step, micro-batch) -> MicroBatch: the loader's get() in a worker process.
        self.source = source
        dtype = np.dtype(model.dtype)
        self.params: dict[str, np.ndarray] = {}
        for first, stop in self.pieces.values():  # ascending pieces: canonical name order
            self.params.update(init_parameters(model.resolved, model.seed, dtype, first, stop))
        self.segments = {piece: build_segment(model.resolved, self.params, first, stop)
                         for piece, (first, stop) in self.pieces.items()}
        self.optimizer = make_optimizer(model.optimizer, self.params, model.lr)
        self.names = list(self.params)
        self._step = 0
        self._logit_grads: dict[int, np.ndarray] = {}
        self.step_loss = 0.0
        self._weight_passes = dict.fromkeys(self.pieces, 0)
        self.on_grads_final = on_grads_final

    @property
    def segment(self) -> Segment:
        """The segment of a stage of one piece."""
        if len(self.segments) != 1:
            raise AttributeError(f"stage {self.index} holds {len(self.segments)} pieces")
        return next(iter(self.segments.values()))

    def grads(self) -> dict[str, np.ndarray]:
        """The step's gradient of every parameter, in ``names`` order."""
        grads: dict[str, np.ndarray] = {}
        for segment in self.segments.values():
            grads.update(segment.grads())
        return grads

    # -- one step ----------------------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        """Prepare step ``step`` (from 1): a zeroed set of gradient arrays (the previous step's
        set is left intact for the digest thread), this replica's micro-batches."""
        for segment in self.segments.values():
            segment.swap_grad_buffers()
            segment.zero_grads()
        self.step_loss = 0.0
        self._logit_grads.clear()
        self._weight_passes = dict.fromkeys(self.pieces, 0)
        self._step = step

    def discard_step(self) -> None:
        """Forget a step abandoned half-way (in-place recovery): its micro-batches in flight."""
        for segment in self.segments.values():
            segment.saved.clear()
        self._logit_grads.clear()

    def _piece(self, action: Action) -> tuple[int, Segment]:
        piece = action.segment
        if piece not in self.segments:
            raise ValueError(f"stage {self.index} holds pieces {list(self.segments)}, not "
                             f"{piece} ({action})")
        return piece, self.segments[piece]

    def needs_input(self, action: Action) -> str | None:
        """Which neighbour's frame ``action`` consumes, or None if it needs none."""
        piece, _ = self._piece(action)
        if action.op is Op.FORWARD:
            return None if piece == 0 else UPSTREAM
        if action.op in (Op.BACKWARD, Op.BACKWARD_INPUT):
            return None if piece == self.num_pieces - 1 else DOWNSTREAM
        return None

    def execute(self, action: Action, received: np.ndarray | None) -> Outgoing | None:
        mb = action.microbatch
        piece, segment = self._piece(action)
        is_first, is_last = piece == 0, piece == self.num_pieces - 1
        if action.op is Op.FORWARD:
            item = self.source(self._step, mb) if is_first or is_last else None
            if is_first:
                received = item.x
            context = self.model.context(self._step, self.replica, mb)
            output = segment.forward(mb, received, context=context)
            if not is_last:
                return Outgoing(DOWNSTREAM, Kind.ACTIVATION, mb, output)
            # Every step's global batch is full (the last partial batch of an epoch is dropped).
            loss, grad = softmax_cross_entropy(output, item.y, self.model.batch_size)
            self.step_loss += loss
            self._logit_grads[mb] = grad
            return None
        if action.op is Op.BACKWARD_WEIGHT:
            segment.backward_weight(mb, on_layer_done=self._final_hook(piece))
            return None
        grad_output = self._logit_grads.pop(mb) if is_last else received
        if action.op is Op.BACKWARD:
            grad_input = segment.backward(mb, grad_output, on_layer_done=self._final_hook(piece))
        else:
            grad_input = segment.backward_input(mb, grad_output)
        if is_first:
            return None
        return Outgoing(UPSTREAM, Kind.GRADIENT, mb, grad_input)

    def _final_hook(self, piece: int) -> Callable[[object], None] | None:
        """For a piece's last weight pass of the step (every schedule runs one per micro-batch
        and piece, in ascending order), the hook that reports each of its layers as final."""
        self._weight_passes[piece] += 1
        if self.on_grads_final is None or self._weight_passes[piece] != self.model.microbatches:
            return None
        step, report = self._step, self.on_grads_final
        return lambda layer: report(step, layer.grads())

    def load_state(self, params: dict[str, np.ndarray], optim: dict[str, np.ndarray]) -> None:
        """Restore parameters and optimizer state in place (the segment shares these arrays)."""
        for name in self.names:
            if params[name].shape != self.params[name].shape:
                raise ValueError(f"checkpoint {name} has shape {params[name].shape}, the model "
                                 f"{self.params[name].shape}")
            self.params[name][...] = params[name]
        self.optimizer.load_state_dict(optim)

    def apply_update(self) -> None:
        """The optimizer step, with the step's (all-reduced, when replicated) gradients."""
        self.optimizer.step(self.grads())
