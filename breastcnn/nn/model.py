"""``Sequential``: a stack of layers with training, inference and introspection.

Parameter names are ``layers.{i}.{key}`` (``i`` = position in ``layers``);
they key the optimizer state and the ``.npz`` file.

Backward conventions (used by training, Grad-CAM and gradient tests):

- ``backward(grad, start=None, stop=0, need_input_grad=True)``: ``grad`` is
  dL/d(output of layer ``start``) (default: the logits layer, i.e. the last
  layer that is not a final Softmax); propagates through layers
  ``start, start-1, ..., stop`` filling their ``grads`` and returns
  dL/d(input of layer ``stop``) (= dL/d(output of layer ``stop-1``)), or None
  when ``need_input_grad`` is false (the first GEMM + col2im is then skipped:
  training never needs dL/d(image)).
- ``forward(x, return_activations=True)`` returns ``(output, activations)``
  with ``activations[i]`` the output of layer ``i`` (the caches needed by
  ``backward`` are kept, so Grad-CAM is one forward and one backward).

The layer list is compiled into steps (``nn/steps.py``: Conv2D + BatchNorm (+ ReLU),
BatchNorm (+ ReLU), single layers) for each range of layers a pass runs; the plans
are kept and compiled again when the layer list or ``fuse`` changes.

Threads: ``predict``, ``compute_gradients``, ``train_step`` and ``train_on_batch`` run with this
model's ``threads`` engine threads (None: all available cores) and ``blas_threads``
BLAS threads (1; None: the process setting); ``forward``/``backward`` run with the
caller's ``engine_threads`` setting.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from breastcnn.errors import UserInputError
from breastcnn.nn.inference import PredictPlan
from breastcnn.nn.layers import Layer, Softmax
from breastcnn.nn.losses import WeightedSoftmaxCrossEntropy
from breastcnn.nn.optim import Adam
from breastcnn.nn.parallel import (
    blas_thread_count,
    blas_threads,
    current_threads,
    engine_threads,
    map_batches,
    resolve_jobs,
)
from breastcnn.nn.steps import Step, compile_steps, run_backward, run_forward

_DEFAULT_NAMES = {
    "ReLU": "relu",
    "LeakyReLU": "leaky_relu",
    "BatchNorm": "batch_norm",
    "MaxPool2D": "max_pool2d",
    "GlobalAveragePooling2D": "global_average_pooling2d",
}


def _snake(name: str) -> str:
    return _DEFAULT_NAMES.get(name) or re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower().replace("2_d", "2d")


@dataclass(frozen=True)
class StepResult:
    """What one training step computed (:meth:`Sequential.train_step`).

    ``loss``: the compiled loss plus ``l2_penalty`` (what the gradient follows);
    ``logits`` ``(N, C)``: the forward pass's logits (training mode), for batch
    scores without a second forward pass (read them before the model's next pass:
    the engine may reuse the array).
    """

    loss: float
    l2_penalty: float
    logits: np.ndarray


class Sequential:
    """A linear stack of layers, NHWC float32.

    ``Sequential(layers, input_shape=None, seed=0, meta=None, threads=None)``: when
    ``input_shape`` (without batch) is given the model is built at once with
    ``np.random.default_rng(seed)``. ``meta`` is a free dict the engine never reads (the
    models layer reads it as a ``ModelSpec`` and saves it with the weights:
    ``breastcnn.models.save_model``; the engine does no I/O).

    Settings of this model (instance attributes):

    - ``threads``: engine threads that run each layer's batch chunks (``nn/parallel.py``
      ``map_chunks``, one BLAS thread each) in predict / compute_gradients / train_on_batch;
      None (default) or <= 0: all available cores. Results are bit-identical for any value.
    - ``blas_threads``: the BLAS thread limit there (default 1: parallelism comes from the
      engine threads, and OpenBLAS threads spin-wait, which costs most on a busy machine;
      ``benchmarks/bench_engine.py --blas2`` measures it); None: the process setting.
    - ``fuse``: run the layer patterns of ``nn/steps.py`` as fused steps (default True); False
      runs every layer on its own (same values up to float rounding).
    """

    framework = "numpy"

    def __init__(
        self,
        layers: list[Layer],
        input_shape: tuple | None = None,
        seed: int = 0,
        meta: dict | None = None,
        threads: int | None = None,
    ):
        self.layers: list[Layer] = list(layers)
        self.meta: dict = dict(meta or {})
        self.input_shape: tuple | None = None
        self.output_shape: tuple | None = None
        self.optimizer = None
        self.loss = None
        self.l2 = 0.0
        self.threads: int | None = threads
        self.blas_threads: int | None = 1
        self._fuse = True
        self._plans: dict[tuple, list[Step]] = {}
        self._planned_layers: list[Layer] = []
        self._name_layers()
        if input_shape is not None:
            self.build(input_shape, np.random.default_rng(seed))

    def _name_layers(self) -> None:
        taken = {layer.name for layer in self.layers if layer.name}
        counts: dict[str, int] = {}
        for layer in self.layers:
            if layer.name:
                continue
            base = _snake(type(layer).__name__)
            while True:
                counts[base] = counts.get(base, 0) + 1
                candidate = f"{base}_{counts[base]}"
                if candidate not in taken:
                    break
            layer.name = candidate
            taken.add(candidate)
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise UserInputError(f"layer names must be unique, got {names}")

    def build(self, input_shape: tuple, rng: np.random.Generator) -> tuple:
        """Create every layer's parameters; raises ShapeError if the input is too small."""
        shape = tuple(int(d) for d in input_shape)
        self.input_shape = shape
        for layer in self.layers:
            shape = layer.build(shape, rng)
        self.output_shape = shape
        self._plans = {}  # shapes may have changed
        for stop in {len(self.layers), self.logits_index + 1}:  # compile the plans of forward and logits now
            self._steps(0, stop)
        return shape

    @property
    def built(self) -> bool:
        return self.output_shape is not None

    @property
    def dtype(self):
        for layer in self.layers:
            for p in layer.params.values():
                return p.dtype
        return np.dtype(np.float32)

    def astype(self, dtype) -> Sequential:
        """Cast all parameters and buffers in place (float64 for gradient checks)."""
        for layer in self.layers:
            layer.astype(dtype)
        return self

    # -- forward / backward ---------------------------------------------------
    @property
    def logits_index(self) -> int:
        """Index of the layer whose output is the logits (the last layer before a final Softmax)."""
        n = len(self.layers)
        return n - 2 if n and isinstance(self.layers[-1], Softmax) else n - 1

    def _check_input(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise UserInputError(
                f"input batch must have shape (N, {', '.join(map(str, self.input_shape))}), got {x.shape}"
            )
        dtype = self.dtype
        return x if x.dtype == dtype else x.astype(dtype)

    # -- steps ------------------------------------------------------------------
    @property
    def fuse(self) -> bool:
        """Whether passes run the fused steps of ``nn/steps.py`` (False: every layer on its own)."""
        return self._fuse

    @fuse.setter
    def fuse(self, value: bool) -> None:
        self._fuse = bool(value)

    @property
    def steps(self) -> list[Step]:
        """The steps a full forward pass runs (e.g. ``[ConvBNReLU(conv2d_1, batch_norm_1, relu_1), ...]``)."""
        return self._steps(0, len(self.layers))

    def _steps(self, start: int, stop: int, fuse: bool | None = None) -> list[Step]:
        """The compiled steps of layers ``start..stop-1``, kept per range; all plans are dropped when the
        layer list changes (compared by identity: cheap enough to check on every pass)."""
        if self._planned_layers != self.layers:
            self._plans = {}
            self._planned_layers = list(self.layers)
        fuse = self._fuse if fuse is None else fuse
        key = (start, stop, fuse)
        steps = self._plans.get(key)
        if steps is None:
            steps = self._plans[key] = compile_steps(self.layers[start:stop], start, fuse)
        return steps

    def forward(self, x, training: bool = False, return_activations: bool = False):
        """(N, *input_shape) -> output (probabilities when the last layer is Softmax).

        With ``return_activations=True`` returns ``(output, [output of layer i for each i])``.
        """
        x = self._check_input(x)
        n = len(self.layers)
        if return_activations:  # every layer's output: the layers run one by one
            acts: list[np.ndarray] = []
            out = run_forward(self._steps(0, n, fuse=False), x, training, True, acts)
            return out, acts
        return run_forward(self._steps(0, n), x, training, True)

    def logits(self, x, training: bool = False) -> np.ndarray:
        """Output of the logits layer (before a final Softmax)."""
        return run_forward(self._steps(0, self.logits_index + 1), self._check_input(x), training, True)

    def activations(self, x, training: bool = False) -> list[np.ndarray]:
        """Outputs of every layer for ``x`` in one forward pass (caches kept for ``backward``)."""
        return self.forward(x, training=training, return_activations=True)[1]

    def backward(self, grad, start: int | None = None, stop: int = 0, need_input_grad: bool = True):
        """Back-propagate dL/d(output of layer ``start``) down to the input of layer ``stop``.

        Uses the caches of the last forward pass. Returns dL/d(input of layer
        ``stop``), or None when ``need_input_grad`` is false.
        """
        start = self.logits_index if start is None else int(start)
        if not 0 <= stop <= start < len(self.layers):
            raise ValueError(f"need 0 <= stop <= start < {len(self.layers)}, got start={start}, stop={stop}")
        return run_backward(self._steps(stop, start + 1), grad, need_input_grad)

    def predict_plan(self) -> PredictPlan:
        """The plan ``predict`` runs (``nn/inference.py``), compiled from ``steps`` and kept with them."""
        steps = self.steps  # drops every kept plan when the layer list changed
        plan = self._plans.get("predict")
        if plan is None:
            plan = self._plans["predict"] = PredictPlan(steps, self.input_shape)
        return plan

    def predict(self, x, batch_size: int = 64, jobs: int = 1) -> np.ndarray:
        """Inference-mode probabilities, float32 (N, num_classes), without caches (thread-safe).

        Runs :meth:`predict_plan` (``fuse`` False: every layer's own cache-free forward). ``jobs`` > 1
        shards batches over joblib threads with one engine and one BLAS thread each; otherwise each batch
        runs on ``self.threads`` engine threads."""
        x = self._check_input(x)
        if batch_size < 1:
            raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
        if self._fuse:
            plan = self.predict_plan()
            prepared = plan.prepare(self.dtype)
            run = lambda xb: plan.run(xb, prepared)  # noqa: E731
        else:
            steps = self._steps(0, len(self.layers))
            run = lambda xb: run_forward(steps, xb, False, False)  # noqa: E731
        engine = resolve_jobs(self.threads) if jobs == 1 else None
        with blas_threads(self.blas_threads), engine_threads(engine):
            out = map_batches(run, x, batch_size, jobs)
        if x.shape[0] == 0:
            return np.empty((0, *self.output_shape), np.float32)
        return out.astype(np.float32, copy=False)

    @contextlib.contextmanager
    def using_threads(self, threads: int | None) -> Iterator[Sequential]:
        """``self.threads = threads`` inside the block, restored after it (None: unchanged)."""
        previous = self.threads
        if threads is not None:
            self.threads = threads
        try:
            yield self
        finally:
            self.threads = previous

    def thread_settings(self) -> dict[str, int]:
        """``{"engine": n, "blas": m}``: the engine and BLAS threads in force inside predict (``jobs=1``),
        compute_gradients and train_on_batch, read from the engine and threadpoolctl within their limits."""
        with blas_threads(self.blas_threads), engine_threads(resolve_jobs(self.threads)):
            return {"engine": current_threads(), "blas": blas_thread_count()}

    # -- training -------------------------------------------------------------
    def compile(self, optimizer=None, loss=None, l2: float = 0.0) -> Sequential:
        """Set optimizer (default Adam(1e-3)), loss (default WeightedSoftmaxCrossEntropy()) and L2 factor."""
        self.optimizer = optimizer if optimizer is not None else Adam(1e-3)
        self.loss = loss if loss is not None else WeightedSoftmaxCrossEntropy()
        if l2 < 0:
            raise UserInputError(f"l2 must be >= 0, got {l2}")
        self.l2 = float(l2)
        return self

    def l2_penalty(self) -> float:
        """l2 * sum(W**2) over the regularized kernels (Conv2D/Dense) of trainable layers."""
        if not self.l2:
            return 0.0
        total = 0.0
        for layer in self.layers:
            if layer.trainable:
                for key in layer.regularized:
                    w = layer.params[key]
                    total += float(np.dot(w.ravel(), w.ravel()))
        return self.l2 * total

    def compute_gradients(self, x, y, class_weights=None, training: bool = True) -> float:
        """Forward + loss + backward (gradients include the L2 term); returns the loss (incl. L2)."""
        return self._forward_backward(x, y, class_weights, training).loss

    def _forward_backward(self, x, y, class_weights, training: bool) -> StepResult:
        if self.loss is None:
            self.compile()
        # Everything inside the BLAS limit, the L2 penalty's dot products too: a BLAS call made with the
        # process default (all cores) wakes OpenBLAS's own threads, which then spin and take cores from
        # the engine threads for the next step.
        with blas_threads(self.blas_threads), engine_threads(resolve_jobs(self.threads)):
            logits = self.logits(x, training=training)
            loss, grad_logits = self.loss(logits, y, class_weights)
            self.backward(grad_logits, need_input_grad=False)
            penalty = 0.0
            if self.l2:
                for layer in self.layers:
                    if layer.trainable:
                        for key in layer.regularized:
                            layer.grads[key] += (2.0 * self.l2) * layer.params[key]
                penalty = self.l2_penalty()
                loss += penalty
        return StepResult(loss=float(loss), l2_penalty=float(penalty), logits=logits)

    def train_step(self, x, y, class_weights=None) -> StepResult:
        """One optimizer step on (x (N, *input_shape) float32, y (N,) int): its loss, L2 penalty and logits."""
        if self.optimizer is None:
            self.compile()
        result = self._forward_backward(x, y, class_weights, training=True)
        with blas_threads(self.blas_threads), engine_threads(resolve_jobs(self.threads)):
            self.optimizer.step(self.parameters(), self.gradients())
        return result

    def train_on_batch(self, x, y, class_weights=None) -> float:
        """One optimizer step on (x (N, *input_shape) float32, y (N,) int); returns the loss incl. L2."""
        return self.train_step(x, y, class_weights).loss

    # -- parameters -----------------------------------------------------------
    def parameters(self) -> dict[str, np.ndarray]:
        """Trainable arrays (the live arrays, updated in place by the optimizer)."""
        return {
            f"layers.{i}.{k}": v
            for i, layer in enumerate(self.layers)
            if layer.trainable
            for k, v in layer.params.items()
        }

    def gradients(self) -> dict[str, np.ndarray]:
        """Gradients from the last backward, same keys as ``parameters()``."""
        return {
            f"layers.{i}.{k}": v
            for i, layer in enumerate(self.layers)
            if layer.trainable
            for k, v in layer.grads.items()
        }

    def buffers(self) -> dict[str, np.ndarray]:
        """Non-trainable state (BatchNorm moving statistics)."""
        return {f"layers.{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.state.items()}

    def get_weights(self) -> dict[str, np.ndarray]:
        """All parameters (frozen ones included) and buffers, copied."""
        out = {}
        for i, layer in enumerate(self.layers):
            for store in (layer.params, layer.state):
                for k, v in store.items():
                    out[f"layers.{i}.{k}"] = v.copy()
        return out

    def set_weights(self, weights: dict) -> None:
        """Copy arrays into the model; every key must exist with the same shape."""
        expected = {}
        for i, layer in enumerate(self.layers):
            for store in (layer.params, layer.state):
                for k in store:
                    expected[f"layers.{i}.{k}"] = (store, k)
        missing = sorted(set(expected) - set(weights))
        unknown = sorted(set(weights) - set(expected))
        if missing or unknown:
            raise UserInputError(f"set_weights: missing keys {missing}, unexpected keys {unknown}")
        for key, (store, k) in expected.items():
            value = np.asarray(weights[key])
            if value.shape != store[k].shape:
                raise UserInputError(f"set_weights: {key} has shape {value.shape}, expected {store[k].shape}")
            store[k] = value.astype(store[k].dtype, copy=True)

    def count_params(self) -> dict[str, int]:
        """{"trainable", "non_trainable"} like Keras (a frozen layer's params count as non-trainable)."""
        trainable = non_trainable = 0
        for layer in self.layers:
            n_params = sum(int(v.size) for v in layer.params.values())
            n_state = sum(int(v.size) for v in layer.state.values())
            if layer.trainable:
                trainable += n_params
            else:
                non_trainable += n_params
            non_trainable += n_state
        return {"trainable": trainable, "non_trainable": non_trainable}

    def summary(self) -> str:
        """Keras-like table: layer (type), output shape, parameters; totals at the bottom."""
        rows = [("Layer (type)", "Output Shape", "Param #")]
        for layer in self.layers:
            n = sum(int(v.size) for v in layer.params.values()) + sum(int(v.size) for v in layer.state.values())
            shape = "(None, " + ", ".join(map(str, layer.output_shape or ())) + ")"
            frozen = "" if layer.trainable else " [frozen]"
            rows.append((f"{layer.name} ({type(layer).__name__}){frozen}", shape, f"{n:,}"))
        widths = [max(len(r[c]) for r in rows) for c in range(3)]
        line = "-" * (sum(widths) + 6)
        fmt = lambda r: f"{r[0]:<{widths[0]}}   {r[1]:<{widths[1]}}   {r[2]:>{widths[2]}}"  # noqa: E731
        counts = self.count_params()
        total = counts["trainable"] + counts["non_trainable"]
        body = [
            fmt(rows[0]),
            line,
            *map(fmt, rows[1:]),
            line,
            f"Input shape: (None, {', '.join(map(str, self.input_shape or ()))})",
            f"Total params: {total:,}",
            f"Trainable params: {counts['trainable']:,}",
            f"Non-trainable params: {counts['non_trainable']:,}",
        ]
        return "\n".join(body)

    def freeze(self, upto: int) -> None:
        """Freeze layers ``0..upto-1`` (no parameter updates; frozen BN uses moving statistics)."""
        for i, layer in enumerate(self.layers):
            layer.trainable = i >= upto
            if not layer.trainable:
                layer.grads = {}

    def get_config(self) -> dict:
        return {
            "input_shape": list(self.input_shape or ()),
            "layers": [layer.get_config() for layer in self.layers],
            "meta": self.meta,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.layers)} layers, input_shape={self.input_shape}, meta={self.meta})"


__all__ = ["Sequential"]
