"""Stage's on_grads_final: each layer reported once a step, when its gradient is final."""

from __future__ import annotations

import numpy as np
import pytest

from pipetrain.data.loader import MicroBatch
from pipetrain.nn import InputSpec, shorthand
from pipetrain.pipeline.schedule import Op
from pipetrain.pipeline.schedule import build as build_schedule
from pipetrain.pipeline.stage import ModelSpec, Stage


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb"])
def test_each_layer_is_reported_once_per_step_after_its_last_weight_pass(schedule):
    model = ModelSpec(layers=shorthand((6, 8, 5, 3)), data=InputSpec((6,), False, 0, 3), seed=0,
                      dtype="float64", optimizer="momentum", lr=0.05, batch_size=12,
                      microbatches=3)
    rng = np.random.default_rng(0)

    def source(step, microbatch):
        return MicroBatch(step, microbatch, np.arange(4), rng.random((4, 6)),
                          rng.integers(0, 3, 4))

    reports: list[tuple[list[str], dict[str, np.ndarray]]] = []
    steps: list[int] = []

    def on_grads_final(step, grads):
        steps.append(step)
        reports.append((list(grads), {n: g.copy() for n, g in grads.items()}))

    stage = Stage(model=model, index=0, num_stages=1, first_layer=0,
                  stop_layer=3, source=source, on_grads_final=on_grads_final)
    for step in (1, 2):
        reports.clear()
        steps.clear()
        stage.begin_step(step)
        for action in build_schedule(schedule, 1, 3)[0]:
            before = len(reports)
            stage.execute(action, None)
            if len(reports) > before:  # only the step's last weight pass reports
                assert action.microbatch == 2
                assert action.op in (Op.BACKWARD, Op.BACKWARD_WEIGHT)
        assert [names for names, _ in reports] == [
            ["layers.2.weight", "layers.2.bias"], ["layers.1.weight", "layers.1.bias"],
            ["layers.0.weight", "layers.0.bias"]]
        assert steps == [step] * 3
        final = stage.segment.grads()
        for _, grads in reports:
            for name, value in grads.items():
                assert np.array_equal(value, final[name]) and value.any(), name
        stage.apply_update()
