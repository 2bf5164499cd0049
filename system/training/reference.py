"""The single-process reference trainer: the oracle every distributed run must match bitwise.

Gradient order (the documented contract the pipeline and the replicas follow):
for each replica ``r`` in ascending order, that replica's gradient is the sum over its micro-batches
``m = 0 .. M-1`` accumulated in ascending order (``acc += x_m.T @ dy_m``, starting from zeros);
the step's gradient is then ``((g_0 + g_1) + g_2) + ...`` in replica order. The loss is summed in
the same order. Each micro-batch's loss and logit gradient are divided by the global batch size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipetrain.config import TrainConfig
from pipetrain.data.loader import prepare_microbatch
from pipetrain.data.workload import Workload
from pipetrain.nn import (
    Segment,
    build_segment,
    init_parameters,
    make_optimizer,
    softmax_cross_entropy,
)
from pipetrain.nn.digest import DIGEST, grad_digest
from pipetrain.pipeline.stage import ModelSpec
from pipetrain.run.metrics import EpochLosses
from pipetrain.run.observers import observe
from pipetrain.run.rundir import RunDir, save_params
from pipetrain.runtime.proctitle import set_title
from pipetrain.status import ExitCode, RunState
from pipetrain.training.evaluate import held_out, load_workload


def train_step(
    segment: Segment, workload: Workload, config: TrainConfig, step: int,
    model: ModelSpec | None = None,
) -> tuple[float, dict[str, np.ndarray]]:
    """One step's loss and summed gradients, in the documented order."""
    model = model or config.model_spec()
    loss = 0.0
    total: dict[str, np.ndarray] | None = None
    for replica in range(config.replicas):
        segment.zero_grads()
        replica_loss = 0.0
        for microbatch in range(config.microbatches):
            item = prepare_microbatch(
                workload, step, microbatch, replica=replica, replicas=config.replicas,
                microbatches=config.microbatches, need_x=True, need_y=True,
                augment=config.augmentation, seed=config.seed, dtype=np.dtype(config.dtype),
            )
            logits = segment.forward(microbatch, item.x,
                                     context=model.context(step, replica, microbatch))
            mb_loss, grad_logits = softmax_cross_entropy(logits, item.y, config.batch_size)
            replica_loss += mb_loss
            segment.backward(microbatch, grad_logits)
        loss += replica_loss
        if total is None:
            total = {name: grad.copy() for name, grad in segment.grads().items()}
        else:
            for name, grad in segment.grads().items():
                total[name] += grad
    assert total is not None
    return loss, total


def run_reference(config: TrainConfig, run_dir: Path, *, quiet: bool = False,
                  tensorboard: bool = False, workload: Workload | None = None) -> int:
    if workload is None:
        workload = load_workload(config)
    model = config.model_spec()
    names = model.parameter_names()
    params = init_parameters(model.resolved, config.seed, np.dtype(config.dtype))
    segment = build_segment(model.resolved, params, 0, model.num_layers)
    optimizer = make_optimizer(config.optimizer, params, config.lr)
    epoch_losses = EpochLosses(workload.steps_per_epoch)
    with RunDir(run_dir) as run:
        set_title(f"pipetrain: reference {run_dir}")
        observe(run, quiet=quiet, tensorboard=tensorboard)
        run.update_state(
            command="reference", state=RunState.RUNNING, config=config.to_json(),
            config_digest=config.math_digest(), grad_digest_hash=DIGEST, step=0, epoch=0,
            total_steps=workload.total_steps,
        )
        save_params(run.path / "initial.npz", params)
        run.emit("run_start", command="reference", total_steps=workload.total_steps,
                 config=config.to_json())
        step = 0
        loss = float("nan")
        for epoch in range(config.epochs):
            for _ in range(workload.steps_per_epoch):
                step += 1
                loss, grads = train_step(segment, workload, config, step, model)
                digest = grad_digest(grads, names)
                optimizer.step(grads)
                run.emit("step", epoch=epoch, step=step, loss=loss, grad_digest=digest)
                epoch_losses.add(step, loss)
            run.emit("epoch_end", epoch=epoch, step=step, loss=loss,
                     mean_loss=epoch_losses.mean(epoch))
            scores = held_out(segment, workload)
            run.emit("evaluate", epoch=epoch, step=step, **scores)
            run.update_state(step=step, epoch=epoch + 1, last_loss=loss,
                             accuracy=scores.get("accuracy"), eval_loss=scores["loss"])
        save_params(run.path / "final.npz", params)
        run.emit("run_end", status=RunState.DONE, step=step)
        run.update_state(state=RunState.DONE)
    return ExitCode.OK
