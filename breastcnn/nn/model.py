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
"""

from __future__ import annotations

import re

import numpy as np

from breastcnn.errors import UserInputError
from breastcnn.nn.layers import BatchNorm, Conv2D, Layer, ReLU, Softmax
from breastcnn.nn.losses import WeightedSoftmaxCrossEntropy
from breastcnn.nn.optim import Adam
from breastcnn.nn.parallel import blas_threads, engine_threads, map_batches



_DEFAULT_NAMES = {"ReLU": "relu", "LeakyReLU": "leaky_relu", "BatchNorm": "batch_norm", "MaxPool2D": "max_pool2d",
                  "GlobalAveragePooling2D": "global_average_pooling2d"}


def _snake(name: str) -> str:
    return _DEFAULT_NAMES.get(name) or re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower().replace("2_d", "2d")


class Sequential:
    """A linear stack of layers, NHWC float32.

    ``Sequential(layers, input_shape=None, seed=0, meta=None)``: when
    ``input_shape`` (without batch) is given the model is built at once with
    ``np.random.default_rng(seed)``.
    """

    framework = "numpy"
    #: BLAS threads used by predict / compute_gradients / train_on_batch (None: leave the process setting).
    #: Default 1: OpenBLAS threads spin-wait, so on a busy 2-core machine a train step with 2 BLAS threads
    #: was 1.4-2x slower than with 1 (and batch-1 inference ~10x), and even on an idle machine it lost to
    #: engine threads (benchmarks/bench_engine.py). Parallelism comes from ``threads`` instead.
    blas_threads: int | None = 1
    #: Engine threads that run each layer's batch chunks (nn/parallel.py ``map_chunks``, BLAS at 1 thread
    #: each), used by predict / compute_gradients / train_on_batch. Default 0 = all cores. None: leave the
    #: caller's ``engine_threads`` setting. Results are bit-identical for any value (fixed chunking).
    threads: int | None = 0
    #: Run BatchNorm (+ ReLU) inside the chunks of the layers around it (batch moments computed by the conv
    #: before it, normalisation and input gradient by the layer after/below it, ReLU fused) and fold
    #: Conv2D + BatchNorm in inference. False: every layer runs on its own (same values up to float rounding).
    fuse: bool = True

    def __init__(self, layers: list[Layer], input_shape: tuple | None = None, seed: int = 0,
                 meta: dict | None = None):
        self.layers: list[Layer] = list(layers)
        self.meta: dict = dict(meta or {})
        self.input_shape: tuple | None = None
        self.output_shape: tuple | None = None
        self.optimizer = None
        self.loss = None
        self.l2 = 0.0
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

    def astype(self, dtype) -> "Sequential":
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

    def _fused_relu(self, i: int):
        """The ReLU at ``i + 1`` when layer ``i`` is a BatchNorm directly followed by a plain ReLU, else None.

        Such a pair runs fused (one chunk pass instead of two, forward and backward) with the same
        values and caches as the separate layers; the layers themselves stay separate."""
        layers = self.layers
        if self.fuse and i + 1 < len(layers) and type(layers[i]) is BatchNorm and type(layers[i + 1]) is ReLU:
            return layers[i + 1]
        return None

    def _conv_bn(self, i: int, stop: int):
        """The BatchNorm at ``i + 1`` when layer ``i`` is a Conv2D directly followed by one (both before ``stop``):
        folded into the conv in inference; in training the conv computes its batch moments."""
        layers = self.layers
        if self.fuse and i + 1 < stop and type(layers[i]) is Conv2D and type(layers[i + 1]) is BatchNorm:
            return layers[i + 1]
        return None

    def _hooked(self, i: int, stop: int, step: int) -> bool:
        """Whether layer ``i`` exists within the pass (``step`` +1: forward up to ``stop``, -1: backward down to
        ``stop``) and takes chunk hooks (Conv2D with valid padding, MaxPool2D with pool == stride)."""
        inside = i < stop if step > 0 else i >= stop
        return self.fuse and inside and getattr(self.layers[i], "chunk_hooks", False)

    def _run(self, x, training: bool, stop: int, cache: bool, activations: list | None = None):
        """Forward through layers ``0..stop-1``.

        With ``fuse`` (and no activations wanted), a BatchNorm (+ ReLU) works inside its neighbours'
        chunks: the conv before it computes the batch moments while its output chunk is in cache, and
        the normalisation runs as the prologue of each chunk of the layer after it. Inference without
        caches folds Conv2D + BatchNorm (+ ReLU) into one conv.
        """
        layers = self.layers
        fold = not training and not cache and activations is None   # inference without caches (predict)
        chain = self.fuse and activations is None
        prologue = None      # deferred normalisation of layer i's input, run by layer i chunk by chunk
        moments = None       # batch moments of layer i's input, computed by the conv before it
        i = 0
        while i < stop:
            layer = layers[i]
            bn = self._conv_bn(i, stop) if fold else None
            if bn is not None:   # Conv2D + BatchNorm (+ ReLU) as one conv with folded weights
                relu = i + 2 < stop and type(layers[i + 2]) is ReLU
                x = layer.forward_folded(x, bn, relu=relu, prologue=prologue)
                prologue = None
                i += 3 if relu else 2
                continue
            if chain and type(layer) is BatchNorm:
                relu = self._fused_relu(i) if i + 1 < stop else None
                nxt = i + (1 if relu is None else 2)
                defer = self._hooked(nxt, stop, +1)
                x = layer.forward_relu(x, relu, training=training, cache=cache, moments=moments, defer=defer)
                if defer:
                    x, prologue = x
                moments = None
                i = nxt
                continue
            hooks = {} if prologue is None else {"prologue": prologue}
            prologue = None
            bn = self._conv_bn(i, stop) if chain and training else None
            if bn is not None and bn.trainable:   # the next BatchNorm normalises with batch statistics
                x, moments = layer.forward(x, training=training, cache=cache, moments=True, **hooks)
            else:
                x = layer.forward(x, training=training, cache=cache, **hooks)
            if activations is not None:
                activations.append(x)
            i += 1
        return x

    def forward(self, x, training: bool = False, return_activations: bool = False):
        """(N, *input_shape) -> output (probabilities when the last layer is Softmax).

        With ``return_activations=True`` returns ``(output, [output of layer i for each i])``.
        """
        x = self._check_input(x)
        if return_activations:
            acts: list[np.ndarray] = []
            out = self._run(x, training, len(self.layers), True, acts)
            return out, acts
        return self._run(x, training, len(self.layers), True)

    def logits(self, x, training: bool = False) -> np.ndarray:
        """Output of the logits layer (before a final Softmax)."""
        return self._run(self._check_input(x), training, self.logits_index + 1, True)

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
        layers = self.layers
        prologue = None      # deferred BatchNorm input gradient, completed by layer i chunk by chunk
        i = start
        while i >= stop:
            layer = layers[i]
            if i - 1 >= stop and self._fused_relu(i - 1) is not None:   # ReLU then its BatchNorm, fused
                grad, prologue, i = self._bn_backward(i - 1, layer, grad, None, stop, need_input_grad)
                continue
            if self.fuse and type(layer) is BatchNorm:
                grad, prologue, i = self._bn_backward(i, None, grad, None, stop, need_input_grad)
                continue
            hooks = {} if prologue is None else {"prologue": prologue}
            prologue = None
            below = self._bn_below(i, stop)
            if below is not None:   # the BatchNorm (+ ReLU) below sums its gradient inside this layer's chunks
                b, relu = below
                grad, sums = layer.backward(grad, True, epilogue=layers[b].grad_sums_epilogue(relu), **hooks)
                grad, prologue, i = self._bn_backward(b, relu, grad, sums, stop, need_input_grad)
                continue
            grad = layer.backward(grad, need_input_grad=need_input_grad or i != stop, **hooks)
            i -= 1
        return grad

    def _bn_below(self, i: int, stop: int):
        """(index, ReLU or None) of a BatchNorm (+ ReLU) directly below layer ``i`` (within ``stop``) when layer
        ``i`` takes chunk hooks, else None."""
        if not self._hooked(i, stop, -1):
            return None
        if i - 2 >= stop and self._fused_relu(i - 2) is not None:
            return i - 2, self.layers[i - 1]
        if i - 1 >= stop and type(self.layers[i - 1]) is BatchNorm:
            return i - 1, None
        return None

    def _bn_backward(self, b: int, relu, grad, sums, stop: int, need_input_grad: bool):
        """Backward of the BatchNorm at ``b`` (and its ``relu``); returns (grad, prologue, next index).

        The input gradient is left to the layer below (``prologue``) when that layer takes chunk hooks."""
        need = need_input_grad or b != stop
        defer = need and self._hooked(b - 1, stop, -1)
        out = self.layers[b].backward_relu(grad, relu, need_input_grad=need, sums=sums, defer=defer)
        grad, prologue = out if defer else (out, None)
        return grad, prologue, b - 1

    def predict(self, x, batch_size: int = 64, jobs: int = 1) -> np.ndarray:
        """Inference-mode probabilities, float32 (N, num_classes); ``jobs`` > 1 shards batches over threads."""
        x = self._check_input(x)
        if batch_size < 1:
            raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
        n_layers = len(self.layers)
        with blas_threads(self.blas_threads), engine_threads(self.threads if jobs == 1 else None):
            out = map_batches(lambda xb: self._run(xb, False, n_layers, False), x, batch_size, jobs)
        if x.shape[0] == 0:
            return np.empty((0, *self.output_shape), np.float32)
        return out.astype(np.float32, copy=False)

    # -- training -------------------------------------------------------------
    def compile(self, optimizer=None, loss=None, l2: float = 0.0) -> "Sequential":
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
        if self.loss is None:
            self.compile()
        # Everything inside the BLAS limit, the L2 penalty's dot products too: a BLAS call made with the
        # process default (all cores) wakes OpenBLAS's own threads, which then spin and take cores from
        # the engine threads for the next step.
        with blas_threads(self.blas_threads), engine_threads(self.threads):
            logits = self.logits(x, training=training)
            loss, grad_logits = self.loss(logits, y, class_weights)
            self.backward(grad_logits, need_input_grad=False)
            if self.l2:
                for layer in self.layers:
                    if layer.trainable:
                        for key in layer.regularized:
                            layer.grads[key] += (2.0 * self.l2) * layer.params[key]
                loss += self.l2_penalty()
        return loss

    def train_on_batch(self, x, y, class_weights=None) -> float:
        """One optimizer step on (x (N, *input_shape) float32, y (N,) int); returns the loss incl. L2."""
        if self.optimizer is None:
            self.compile()
        loss = self.compute_gradients(x, y, class_weights)
        with blas_threads(self.blas_threads), engine_threads(self.threads):
            self.optimizer.step(self.parameters(), self.gradients())
        return loss

    # -- parameters -----------------------------------------------------------
    def parameters(self) -> dict[str, np.ndarray]:
        """Trainable arrays (the live arrays, updated in place by the optimizer)."""
        return {f"layers.{i}.{k}": v for i, layer in enumerate(self.layers) if layer.trainable
                for k, v in layer.params.items()}

    def gradients(self) -> dict[str, np.ndarray]:
        """Gradients from the last backward, same keys as ``parameters()``."""
        return {f"layers.{i}.{k}": v for i, layer in enumerate(self.layers) if layer.trainable
                for k, v in layer.grads.items()}

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
        body = [fmt(rows[0]), line, *map(fmt, rows[1:]), line,
                f"Input shape: (None, {', '.join(map(str, self.input_shape or ()))})",
                f"Total params: {total:,}", f"Trainable params: {counts['trainable']:,}",
                f"Non-trainable params: {counts['non_trainable']:,}"]
        return "\n".join(body)

    def freeze(self, upto: int) -> None:
        """Freeze layers ``0..upto-1`` (no parameter updates; frozen BN uses moving statistics)."""
        for i, layer in enumerate(self.layers):
            layer.trainable = i >= upto
            if not layer.trainable:
                layer.grads = {}

    def get_config(self) -> dict:
        return {"input_shape": list(self.input_shape or ()), "layers": [layer.get_config() for layer in self.layers],
                "meta": self.meta}

    def save(self, path, optimizer=None, extra=None) -> None:
        """Write an ``.npz`` (see ``breastcnn.models.io.save_model``)."""
        from breastcnn.models.io import save_model

        save_model(self, path, optimizer=optimizer, extra=extra)

    def __repr__(self) -> str:
        return f"Sequential({len(self.layers)} layers, input_shape={self.input_shape}, meta={self.meta})"


__all__ = ["Sequential"]
