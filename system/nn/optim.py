"""Optimizers that update parameters in place, one parameter at a time, in a fixed order.

State (momentum buffers, Adam moments, the step count) is a flat dict of arrays named
``{parameter}.{slot}`` so that it can be checkpointed with ``np.savez`` and no pickle.
"""

from __future__ import annotations

import numpy as np

MOMENTUM = 0.9
ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.9, 0.999, 1e-8


class Optimizer:
    name = "sgd"
    slots: tuple[str, ...] = ()

    def __init__(self, params: dict[str, np.ndarray], lr: float) -> None:
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        self.params = params
        self.lr = lr
        self.step_count = 0
        self.state = {
            f"{name}.{slot}": np.zeros_like(value)
            for name, value in params.items()
            for slot in self.slots
        }

    def step(self, grads: dict[str, np.ndarray]) -> None:
        self.step_count += 1
        for name, param in self.params.items():
            self._update(name, param, grads[name])

    def _update(self, name: str, param: np.ndarray, grad: np.ndarray) -> None:
        param -= self.lr * grad

    def state_dict(self) -> dict[str, np.ndarray]:
        state = dict(self.state)
        state["step_count"] = np.array(self.step_count, dtype=np.int64)
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for key, value in self.state.items():
            if key not in state or state[key].shape != value.shape:
                raise ValueError(f"optimizer state {key!r} missing or of the wrong shape")
            value[...] = state[key]
        self.step_count = int(state["step_count"])


class Momentum(Optimizer):
    name = "momentum"
    slots = ("velocity",)

    def _update(self, name: str, param: np.ndarray, grad: np.ndarray) -> None:
        velocity = self.state[f"{name}.velocity"]
        velocity *= MOMENTUM
        velocity += grad
        param -= self.lr * velocity


class Adam(Optimizer):
    name = "adam"
    slots = ("m", "v")

    def _update(self, name: str, param: np.ndarray, grad: np.ndarray) -> None:
        m, v = self.state[f"{name}.m"], self.state[f"{name}.v"]
        m *= ADAM_BETA1
        m += (1 - ADAM_BETA1) * grad
        v *= ADAM_BETA2
        v += (1 - ADAM_BETA2) * (grad * grad)
        m_hat_scale = 1.0 / (1 - ADAM_BETA1**self.step_count)
        v_hat_scale = 1.0 / (1 - ADAM_BETA2**self.step_count)
        param -= self.lr * (m * m_hat_scale) / (np.sqrt(v * v_hat_scale) + ADAM_EPS)


OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": Optimizer, "momentum": Momentum, "adam": Adam}


def make_optimizer(name: str, params: dict[str, np.ndarray], lr: float) -> Optimizer:
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        choices = ", ".join(OPTIMIZERS)
        raise ValueError(f"unknown optimizer {name!r} (choose from {choices})") from None
    return cls(params, lr)
