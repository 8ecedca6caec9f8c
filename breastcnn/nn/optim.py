"""Optimizers with state keyed by parameter name (saved in checkpoints, resumed exactly).

``step(params, grads)`` updates ``params`` in place; only names present in
``grads`` are touched (frozen layers have no gradients). ``lr`` is a plain
mutable attribute (schedules set it). ``state_dict()`` returns ndarrays only
(hyper-parameters as 0-d arrays, the class name as a 0-d string array) so it
can go into an ``.npz``; :func:`optimizer_from_state` rebuilds the optimizer.
"""

from __future__ import annotations

import numpy as np

from breastcnn.errors import UserInputError
from breastcnn.nn.parallel import map_chunks

#: element-wise optimizer updates run in slices of this many values (large tensors: on the engine threads)
_ELEMENTS_PER_CHUNK = 1 << 18


class Optimizer:
    hyper: tuple[str, ...] = ("lr",)

    def __init__(self, lr: float):
        self.lr = float(lr)
        self.iterations = 0

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    # slots: name -> dict[param name -> array]
    def _slots(self) -> dict[str, dict[str, np.ndarray]]:
        return {}

    def get_config(self) -> dict:
        return {"class": type(self).__name__, **{h: getattr(self, h) for h in self.hyper}}

    def state_dict(self) -> dict[str, np.ndarray]:
        """{"class", "iterations", hyper-parameters, "{slot}.{param name}": array}."""
        state = {"class": np.array(type(self).__name__), "iterations": np.array(self.iterations, np.int64)}
        for h in self.hyper:
            value = getattr(self, h)
            state[h] = np.array(value, np.bool_ if isinstance(value, bool) else np.float64)
        for slot, arrays in self._slots().items():
            for name, arr in arrays.items():
                state[f"{slot}.{name}"] = arr.copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        cls = str(np.asarray(state.get("class", type(self).__name__)))
        if cls != type(self).__name__:
            raise UserInputError(f"optimizer state is for {cls}, not {type(self).__name__}")
        self.iterations = int(state["iterations"])
        for h in self.hyper:
            if h in state:
                value = np.asarray(state[h])
                setattr(self, h, bool(value) if value.dtype == np.bool_ else float(value))
        slots = self._slots()
        for slot in slots:
            slots[slot].clear()
        for key, arr in state.items():
            slot, _, name = key.partition(".")
            if slot in slots and name:
                slots[slot][name] = np.array(arr, copy=True)


class SGD(Optimizer):
    """SGD with (Nesterov) momentum, Keras formulation: v = m*v - lr*g; p += v (or m*v - lr*g)."""

    hyper = ("lr", "momentum", "nesterov")

    def __init__(self, lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False):
        super().__init__(lr)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.velocity: dict[str, np.ndarray] = {}

    def _slots(self):
        return {"velocity": self.velocity}

    def step(self, params, grads):
        self.iterations += 1
        for name, g in grads.items():
            p = params[name]
            if self.momentum == 0.0:
                p -= (self.lr * g).astype(p.dtype, copy=False)
                continue
            v = self.velocity.get(name)
            if v is None:
                v = self.velocity[name] = np.zeros_like(p)
            v *= self.momentum
            v -= self.lr * g
            if self.nesterov:
                p += self.momentum * v - self.lr * g
            else:
                p += v


class Adam(Optimizer):
    """Adam with bias correction, Keras defaults and formulation.

    m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
    p -= lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + epsilon)
    """

    hyper = ("lr", "beta_1", "beta_2", "epsilon")

    def __init__(self, lr: float = 1e-3, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7):
        super().__init__(lr)
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def _slots(self):
        return {"m": self.m, "v": self.v}

    def step(self, params, grads):
        self.iterations += 1
        t = self.iterations
        alpha = self.lr * np.sqrt(1.0 - self.beta_2**t) / (1.0 - self.beta_1**t)
        b1, b2, eps = self.beta_1, self.beta_2, self.epsilon
        for name, g in grads.items():
            p = params[name]
            m = self.m.get(name)
            if m is None:
                m = self.m[name] = np.zeros_like(p)
                self.v[name] = np.zeros_like(p)
            v = self.v[name]
            flat = [a.reshape(-1) for a in (p, g, m, v)]

            def update(a, b, p=flat[0], g=flat[1], m=flat[2], v=flat[3]):
                # element-wise, in place, one scratch buffer; slices of large tensors run on the engine
                # threads (same values for any thread count: nothing is summed)
                p, g, m, v = p[a:b], g[a:b], m[a:b], v[a:b]
                tmp = np.multiply(g, 1.0 - b1, dtype=p.dtype)
                m *= b1
                m += tmp
                np.square(g, out=tmp)
                tmp *= 1.0 - b2
                v *= b2
                v += tmp
                np.sqrt(v, out=tmp)
                tmp += eps
                np.divide(m, tmp, out=tmp)
                tmp *= alpha
                p -= tmp

            map_chunks(update, p.size, _ELEMENTS_PER_CHUNK)


OPTIMIZERS = {"Adam": Adam, "SGD": SGD}


def optimizer_from_state(state: dict[str, np.ndarray]) -> Optimizer:
    """Rebuild an optimizer (class, hyper-parameters, slots, iterations) from ``state_dict()``."""
    name = str(np.asarray(state.get("class", "")))
    cls = OPTIMIZERS.get(name)
    if cls is None:
        raise UserInputError(f"unknown optimizer class {name!r} in state; known: {', '.join(OPTIMIZERS)}")
    opt = cls()
    opt.load_state_dict(state)
    return opt
