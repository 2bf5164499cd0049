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
        # One scratch array as large as the largest parameter, for ``lr * g``: a fresh
        # temporary of a large layer's size every step costs more than the update's arithmetic
        # (the allocator hands back new pages). The same operations, so the same bits.
        largest = max(params.values(), key=lambda p: p.size, default=None)
        self._scratch = (np.empty(largest.size, dtype=largest.dtype) if largest is not None
                         else None)

    def _scaled(self, array: np.ndarray) -> np.ndarray:
        """``self.lr * array`` (rounded to the array's dtype) in the scratch array."""
        if self._scratch is None or array.dtype != self._scratch.dtype:
            return self.lr * array
        out = self._scratch[:array.size].reshape(array.shape)
        return np.multiply(array, self.lr, out=out)

    def step(self, grads: dict[str, np.ndarray]) -> None:
        self.step_count += 1
        for name, param in self.params.items():
            self._update(name, param, grads[name])

    def _update(self, name: str, param: np.ndarray, grad: np.ndarray) -> None:
        param -= self._scaled(grad)

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
        param -= self._scaled(velocity)


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
