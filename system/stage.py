"""The compute of one pipeline stage, free of pipes and processes.

A :class:`Stage` holds its own segment of layers, its optimizer and the state of the micro-batches
in flight. It executes one schedule :class:`~system.schedule.Action` at a time and *says* what to
send (an :class:`Outgoing`) instead of touching pipes; the worker process (``system.worker``)
moves the frames. This keeps the math testable in one process and the plumbing thin.

Where a stage's inputs come from:

* ``F`` on the first stage reads samples from the workload; on the others, the activation frame
  of the previous stage;
* ``B``/``I`` on the last stage uses the logit gradient it computed in its own ``F``; on the
  others, the gradient frame of the next stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from system.data.loader import MicroBatch
from system.nn import init_parameters, make_optimizer, softmax_cross_entropy
from system.nn.layers import build_segment
from system.protocol import Kind
from system.schedule import Action, Op

UPSTREAM, DOWNSTREAM = "upstream", "downstream"


@dataclass(frozen=True)
class Outgoing:
    direction: str  # DOWNSTREAM (to the next stage) or UPSTREAM (to the previous one)
    kind: Kind
    microbatch: int
    array: np.ndarray


class Stage:
    def __init__(
        self, *, config, index: int, num_stages: int, first_layer: int, stop_layer: int,
        source: Callable[[int, int], MicroBatch] | None, replica: int = 0,
    ) -> None:
        self.config = config
        self.index = index
        self.num_stages = num_stages
        self.replica = replica
        self.is_first = index == 0
        self.is_last = index == num_stages - 1
        if (self.is_first or self.is_last) and source is None:
            raise ValueError("the first and last stages need a source of micro-batches")
        # source(step, micro-batch) -> MicroBatch: the loader's get() in a worker process.
        self.source = source
        sizes = list(config.layers)
        all_params = init_parameters(sizes, config.seed, np.dtype(config.dtype), first_layer,
                                     stop_layer)
        self.params = all_params
        self.segment = build_segment(all_params, first_layer, stop_layer, config.num_layers)
        self.optimizer = make_optimizer(config.optimizer, self.params, config.lr)
        self.names = list(self.params)
        self._step = 0
        self._logit_grads: dict[int, np.ndarray] = {}
        self.step_loss = 0.0
        self._weight_passes = 0
        # Called with a layer's parameter names once its gradient for the step is final (the
        # last micro-batch's weight pass has gone through it); the worker starts reducing it.
        self.on_grads_final: Callable[[list[str]], None] | None = None

    # -- one step ----------------------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        """Prepare step ``step`` (from 1): a zeroed set of gradient arrays (the previous step's
        set is left intact for the digest thread), this replica's micro-batches."""
        self.segment.swap_grad_buffers()
        self.segment.zero_grads()
        self.step_loss = 0.0
        self._logit_grads.clear()
        self._weight_passes = 0
        self._step = step

    def needs_input(self, action: Action) -> str | None:
        """Which neighbour's frame ``action`` consumes, or None if it needs none."""
        if action.op is Op.FORWARD:
            return None if self.is_first else UPSTREAM
        if action.op in (Op.BACKWARD, Op.BACKWARD_INPUT):
            return None if self.is_last else DOWNSTREAM
        return None

    def execute(self, action: Action, received: np.ndarray | None) -> Outgoing | None:
        mb = action.microbatch
        if action.op is Op.FORWARD:
            item = self.source(self._step, mb) if self.is_first or self.is_last else None
            if self.is_first:
                received = item.x
            output = self.segment.forward(mb, received)
            if not self.is_last:
                return Outgoing(DOWNSTREAM, Kind.ACTIVATION, mb, output)
            # Every step's global batch is full (the last partial batch of an epoch is dropped).
            loss, grad = softmax_cross_entropy(output, item.y, self.config.batch_size)
            self.step_loss += loss
            self._logit_grads[mb] = grad
            return None
        if action.op is Op.BACKWARD_WEIGHT:
            self.segment.backward_weight(mb, on_layer_done=self._final_hook())
            return None
        grad_output = self._logit_grads.pop(mb) if self.is_last else received
        if action.op is Op.BACKWARD:
            grad_input = self.segment.backward(mb, grad_output, on_layer_done=self._final_hook())
        else:
            grad_input = self.segment.backward_input(mb, grad_output)
        if self.is_first:
            return None
        return Outgoing(UPSTREAM, Kind.GRADIENT, mb, grad_input)

    def _final_hook(self) -> Callable[[object], None] | None:
        """For the step's last weight pass (every schedule runs one per micro-batch, in
        ascending order), the hook that reports each layer as final."""
        self._weight_passes += 1
        if self.on_grads_final is None or self._weight_passes != self.config.microbatches:
            return None
        return lambda layer: self.on_grads_final(list(layer.grads()))

    def load_state(self, params: dict[str, np.ndarray], optim: dict[str, np.ndarray]) -> None:
        """Restore parameters and optimizer state in place (the segment shares these arrays)."""
        for name in self.names:
            if params[name].shape != self.params[name].shape:
                raise ValueError(f"checkpoint {name} has shape {params[name].shape}, the model "
                                 f"{self.params[name].shape}")
            self.params[name][...] = params[name]
        self.optimizer.load_state_dict(optim)

    def apply_update(self, grads: dict[str, np.ndarray] | None = None) -> None:
        """The optimizer step, with the (all-reduced, when replicated) gradients."""
        self.optimizer.step(grads if grads is not None else self.segment.grads())
