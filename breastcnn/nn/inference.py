"""The predict plan: a model's layers compiled for inference without caches (``Sequential.predict``).

Training and the cached passes run the steps of ``nn/steps.py``; ``predict`` needs none of their caches,
batch statistics or chunk hooks, so it gets its own plan, compiled from the same fused steps:

- :class:`ConvOp`: Conv2D (+ BatchNorm folded into its weights) (+ ReLU) (+ a MaxPool2D with pool ==
  stride after them). Stride >= kernel width (the custom model's first conv): ``F.conv_rows``, one GEMM
  per kernel row on strided views of the input, no im2col copy. Otherwise im2col + one GEMM; with a pool,
  the columns are grouped by pool offset (``F.im2col_pooled``), so the GEMM gives the ``p*p`` offsets as
  contiguous blocks, the pool is ``p*p - 1`` maxima over them, and only the conv outputs the pool reads
  are computed. Bias and ReLU come last, on the (pooled) output, in place: ``max_i(a_i) + b =
  max_i(a_i + b)`` and ReLU commutes with max, exactly in floating point too. Before a valid conv, an op
  computes only the outputs that conv reads (:meth:`ConvOp.crop`) and leaves its bias to it
  (``hands_bias``: ReLU as ``max(y, -b)``, and the next conv adds ``sum(W * b)`` to its bias: without
  padding, a constant shift of its input is a constant shift of its output).
- :class:`DenseOp`: (Flatten +) Dense (+ ReLU in place).
- :class:`LayerOp`: any other single layer (its cache-free forward); :class:`StepOp`: any other step
  (a BatchNorm + ReLU), as in a cache-free forward pass.

The weights an op derives (BatchNorm folded in float64, kernels reshaped, bias tiled over an image) are
prepared once and kept with a byte copy of the arrays they came from (:meth:`PredictPlan.prepare`): every
``predict`` compares those bytes and prepares again on any difference, so a training step,
``set_weights``, ``astype``, a replaced array or an in-place write into a parameter are all seen.

The ops on images (rank-3 samples: convs, pools, BatchNorm on feature maps) run depth first on chunks of
images (:func:`~breastcnn.nn.parallel.map_chunks`, one engine thread per chunk: a chunk's feature maps stay
in cache from one layer to the next); the ops on flat features (Dense, Softmax) then run once on the whole
batch (one read of the dense weights per batch). Chunks depend on the shapes only: the same results for any
number of engine threads.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np

from breastcnn.nn import functional as F
from breastcnn.nn.layers import BatchNorm, Conv2D, Dense, Flatten, Layer, MaxPool2D, ReLU
from breastcnn.nn.parallel import Pending, chunk_size, engine_threads, map_chunks
from breastcnn.nn.steps import ConvBNReLU, Single, Step, _is_plain


def fold_batchnorm(conv: Conv2D, bn: BatchNorm | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(kernel (kh, kw, C, F), bias (F,) or None), float64, of ``conv`` with ``bn``'s inference affine folded
    in: ``W * s`` and ``(b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``."""
    kernel = conv.params["W"].astype(np.float64)
    bias = conv.params["b"].astype(np.float64) if conv.use_bias else None
    if bn is None:
        return kernel, bias
    scale = bn.params["gamma"].astype(np.float64) / np.sqrt(bn.state["moving_variance"].astype(np.float64) + bn.epsilon)
    shift = bn.params["beta"] - bn.state["moving_mean"].astype(np.float64) * scale
    if bias is not None:
        shift = shift + bias * scale
    return kernel * scale, shift


class Op:
    """One unit of the predict plan: ``run(x, prepared) -> y`` on a batch (or a chunk of one)."""

    #: the layers this op runs
    layers: tuple[Layer, ...] = ()
    #: shape of one sample of its output
    output_shape: tuple = ()

    def sources(self) -> list[tuple[Layer, str, str]]:
        """``(layer, "params" | "state", key)`` of the arrays :meth:`prepare` derives its weights from (their
        bytes are compared before each predict)."""
        return []

    def settings(self) -> list[tuple[Layer, str]]:
        """``(layer, attribute)`` of the scalars :meth:`prepare` reads besides those arrays (a BatchNorm's
        epsilon)."""
        return []

    def prepare(self, dtype, shift=None):
        """``(derived weights for run or None, shift of the output or None)``.

        shift: a per-channel constant (float64) that the op before left out of this op's input (its bias:
        only a ConvOp after a ConvOp with ``hands_bias`` set is given one)."""
        return None, None

    def run(self, x: np.ndarray, prepared) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        names = ", ".join(layer.name or type(layer).__name__ for layer in self.layers)
        return f"{type(self).__name__}({names})"


class ConvOp(Op):
    """Conv2D (+ BatchNorm folded) (+ ReLU) (+ MaxPool2D, pool == stride), see the module docstring.

    x: (N, H, W, C) -> (N, Ho, Wo, F), or (N, Ho // p, Wo // p, F) with a pool of size p."""

    def __init__(
        self, conv: Conv2D, bn: BatchNorm | None = None, relu: ReLU | None = None, pool: MaxPool2D | None = None
    ):
        self.conv, self.bn, self.relu, self.pool = conv, bn, relu, pool
        self.layers = tuple(layer for layer in (conv, bn, relu, pool) if layer is not None)
        k, s = conv.kernel_size, conv.strides
        self.rows = s >= k and pool is None  # windows side by side: F.conv_rows, no columns matrix
        self.output_shape = self.layers[-1].output_shape
        #: conv outputs computed (rows, columns): all, or the part a pool or the next op reads
        ho, wo = conv.output_shape[:2]
        p = 1 if pool is None else pool.pool_size
        self.size = (ho // p * p, wo // p * p)
        #: whether the op leaves its bias to the next conv (set by PredictPlan when a valid conv follows)
        self.hands_bias = False

    def extent(self) -> tuple[int, int]:
        """(rows, columns) of its (padded) input that the conv outputs in ``size`` read."""
        k, s = self.conv.kernel_size, self.conv.strides
        return (self.size[0] - 1) * s + k, (self.size[1] - 1) * s + k

    def reads(self) -> tuple[int, int] | None:
        """(rows, columns) of its input the op reads (valid padding), None: all of it ("same" padding)."""
        return self.extent() if self.conv.padding == "valid" else None

    def crop(self, rows: int, cols: int) -> None:
        """Compute only the first ``rows`` x ``cols`` outputs (after the pool, if any): what the next op reads."""
        p = 1 if self.pool is None else self.pool.pool_size
        hp, wp = min(rows, self.output_shape[0]), min(cols, self.output_shape[1])
        self.size = (hp * p, wp * p)
        self.output_shape = (hp, wp, self.output_shape[2])

    def sources(self):
        refs = [(self.conv, "params", "W")] + ([(self.conv, "params", "b")] if self.conv.use_bias else [])
        if self.bn is not None:
            refs += [
                (self.bn, "params", "gamma"),
                (self.bn, "params", "beta"),
                (self.bn, "state", "moving_mean"),
                (self.bn, "state", "moving_variance"),
            ]
        return refs

    def settings(self):
        return [] if self.bn is None else [(self.bn, "epsilon")]

    def prepare(self, dtype, shift=None):
        """((kernel: (kh, kw, C, F) for conv_rows, (kh*kw*C, F) for im2col; bias tiled over one output image
        or None; lower bound tiled likewise (the ReLU) or None), the bias handed to the next conv or None)."""
        kernel, bias = fold_batchnorm(self.conv, self.bn)
        if shift is not None:  # a constant input shift is a constant output shift (valid padding)
            moved = np.einsum("hwcf,c->f", kernel, shift)
            bias = moved if bias is None else bias + moved
        if not self.rows:
            kernel = kernel.reshape(-1, self.conv.filters)
        pixels = int(np.prod(self.output_shape[:2]))
        relu = self.relu is not None
        if self.hands_bias and bias is not None:  # max(y, -b) here, + b in the next conv's bias
            tiled = None, np.tile(-bias, pixels).astype(dtype) if relu else None
            return (np.ascontiguousarray(kernel, dtype), *tiled), bias
        tiled = (
            None if bias is None else np.tile(bias, pixels).astype(dtype),
            F.zeros_vector(pixels * self.conv.filters, dtype) if relu else None,
        )
        return (np.ascontiguousarray(kernel, dtype), *tiled), None

    def run(self, x, prepared):
        kernel, bias, lower = prepared
        conv = self.conv
        k, s = conv.kernel_size, conv.strides
        if conv.padding == "same":
            x = F.pad_same(x, (k, k), s)[0]
        n = x.shape[0]
        if self.rows:
            out = F.conv_rows(x, kernel, s, size=self.size)
        else:
            rows, cols = self.extent()
            x = x[:, :rows, :cols]  # the whole input, unless a later conv reads only part of the output
            if self.pool is None:
                out = np.empty((n, *self.output_shape), kernel.dtype)
                F.matmul_rows(F.im2col(x, k, k, s), kernel, out=out.reshape(-1, conv.filters))
            else:
                out = self._conv_pool(x, kernel)
        images = out.reshape(n, -1)
        if bias is not None:
            images += bias
        if lower is not None:
            np.maximum(images, lower, out=images)
        return out

    def _conv_pool(self, x, kernel):
        """Conv outputs the pool reads, max-pooled (before bias and ReLU): (N, Hp, Wp, F)."""
        k, s, p = self.conv.kernel_size, self.conv.strides, self.pool.pool_size
        hp, wp, f = self.output_shape
        n = x.shape[0]
        cols = F.im2col_pooled(x, k, k, s, p)  # (p*p, N*Hp*Wp, K): the windows of each pool offset
        blocks = F.matmul_rows(cols.reshape(-1, kernel.shape[0]), kernel).reshape(p * p, n, hp, wp, f)
        pooled = blocks[0]
        for q in range(1, p * p):
            np.maximum(pooled, blocks[q], out=pooled)
        return pooled


class DenseOp(Op):
    """(Flatten +) Dense (+ ReLU, in place on the Dense output)."""

    def __init__(self, dense: Dense, relu: ReLU | None = None, flatten: Flatten | None = None):
        self.dense, self.relu, self.flatten = dense, relu, flatten
        self.layers = tuple(layer for layer in (flatten, dense, relu) if layer is not None)
        self.output_shape = dense.output_shape

    def run(self, x, prepared):
        if self.flatten is not None:
            x = x.reshape(x.shape[0], -1)
        out = self.dense.forward(x, training=False, cache=False)
        if self.relu is not None:
            np.maximum(out, F.zeros_vector(out.shape[1], out.dtype), out=out)
        return out


class LayerOp(Op):
    """Any other single layer: its own cache-free inference forward."""

    def __init__(self, layer: Layer):
        self.layer = layer
        self.layers = (layer,)
        self.output_shape = layer.output_shape

    def run(self, x, prepared):
        return self.layer.forward(x, training=False, cache=False)


class StepOp(Op):
    """Any other step of ``nn/steps.py`` (a BatchNorm + ReLU), run as in a cache-free inference forward pass."""

    def __init__(self, step: Step):
        self.step = step
        self.layers = step.layers
        self.output_shape = step.layers[-1].output_shape

    def run(self, x, prepared):
        return self.step.forward(Pending(x), False, False).complete()

    def __repr__(self) -> str:
        return f"StepOp({self.step!r})"


def _single(step: Step, cls: type) -> Layer | None:
    """The layer of a ``Single`` step when it is a plain ``cls`` (its class keeps ``cls``'s forward)."""
    if type(step) is Single and _is_plain(step.layer, cls):
        return step.layer
    return None


def compile_ops(steps: list[Step]) -> list[Op]:
    """The predict ops for the fused ``steps`` of a whole model (first match wins): ConvBNReLU or a lone
    Conv2D (+ a ReLU step) (+ a MaxPool2D step with pool == stride); (Flatten +) Dense (+ ReLU); any other
    single layer; any other step."""
    ops: list[Op] = []
    i, n = 0, len(steps)

    def at(k: int, cls: type):
        return _single(steps[k], cls) if k < n else None

    while i < n:
        step = steps[i]
        if type(step) is ConvBNReLU or at(i, Conv2D) is not None:
            if type(step) is ConvBNReLU:
                conv, bn, relu = step.conv, step.norm.bn, step.norm.relu
            else:
                conv, bn, relu = step.layer, None, at(i + 1, ReLU)
                i += relu is not None
            pool = at(i + 1, MaxPool2D)
            if pool is not None and pool.pool_size != pool.strides:
                pool = None
            ops.append(ConvOp(conv, bn, relu, pool))
            i += 1 + (pool is not None)
        elif at(i, Dense) is not None or (at(i, Flatten) is not None and at(i + 1, Dense) is not None):
            flatten = at(i, Flatten)
            i += flatten is not None
            relu = at(i + 1, ReLU)
            ops.append(DenseOp(steps[i].layer, relu, flatten))
            i += 1 + (relu is not None)
        elif type(step) is Single:
            ops.append(LayerOp(step.layer))
            i += 1
        else:
            ops.append(StepOp(step))
            i += 1
    return ops


#: working set per chunk of images in the depth-first part: 4 images of the custom model at 224 px. Measured
#: on the 2-core machine (batches 2-64 at 64 and 224 px, 1 and 2 threads), 1 MiB (one image per chunk) was
#: 20-45% slower from batch 8 on: per chunk, each op pays its call overheads and runs smaller GEMMs.
_CHUNK_BYTES = 4 << 20


class PredictPlan:
    """A model's layers compiled for ``predict``: ``run(x, prepare())`` == the inference forward pass.

    ``ops``: the ops in order; ``image_ops``: how many of them take images (rank-3 samples, up to the first
    Dense) and run depth first in chunks of images; the rest run on the whole batch.
    """

    def __init__(self, steps: list[Step], input_shape: tuple):
        self.ops = compile_ops(steps)
        for op, after in reversed(list(pairwise(self.ops))):
            if isinstance(op, ConvOp) and isinstance(after, ConvOp) and after.reads() is not None:
                op.crop(*after.reads())  # skip outputs no later conv reads
                op.hands_bias = True  # the next conv sees no padding: it can add this op's bias
        self.image_ops = 0
        while (
            self.image_ops < len(self.ops)
            and not isinstance(self.ops[self.image_ops], DenseOp)
            and len(self.ops[self.image_ops].layers[0].input_shape) == 3
        ):
            self.image_ops += 1
        per_image = 0
        shape = tuple(input_shape)
        for op in self.ops[: self.image_ops]:  # largest input + output of an image op, in float32 bytes
            per_image = max(per_image, 4 * (int(np.prod(shape)) + 2 * int(np.prod(op.output_shape))))
            shape = op.output_shape
        self.chunk = chunk_size(per_image, _CHUNK_BYTES)
        self._sources = [ref for op in self.ops for ref in op.sources()]
        self._settings = [ref for op in self.ops for ref in op.settings()]
        self._prepared: tuple | None = None  # ((source bytes, settings, dtype), prepared weights per op)

    def prepare(self, dtype) -> list:
        """The ops' derived weights for the layers' current values (kept; prepared again when the bytes of
        any source array, a setting or the dtype differ from the last time)."""
        key = (
            [getattr(layer, store)[name].tobytes() for layer, store, name in self._sources],
            [getattr(layer, name) for layer, name in self._settings],
            dtype,
        )
        kept = self._prepared
        if kept is not None and kept[0] == key:
            return kept[1]
        prepared, shift = [], None
        for op in self.ops:
            weights, shift = op.prepare(dtype, shift)
            prepared.append(weights)
        self._prepared = (key, prepared)
        return prepared

    def run(self, x: np.ndarray, prepared: list) -> np.ndarray:
        """Inference output for a batch ``x`` (N, *input_shape), with ``prepared = self.prepare(dtype)``."""
        k = self.image_ops
        if k:
            x = self._run_images(x, prepared)
        for op, weights in zip(self.ops[k:], prepared[k:], strict=True):
            x = op.run(x, weights)
        return x

    def _run_images(self, x, prepared):
        ops, weights = self.ops[: self.image_ops], prepared[: self.image_ops]

        def chunk(a, b):
            h = x[a:b]
            for op, w in zip(ops, weights, strict=True):
                h = op.run(h, w)
            return h

        n = x.shape[0]
        size = self.chunk
        if n <= size:
            # one chunk: a batch this small is done before a second thread has woken up (measured: cutting
            # 2-4 images at 224 px, or 4-32 at 64 px, in two for two threads was slower than one thread)
            return chunk(0, n)
        out = np.empty((n, *ops[-1].output_shape), x.dtype)

        def write(a, b):
            with engine_threads(1):  # layers inside a chunk do not cut it again
                out[a:b] = chunk(a, b)

        map_chunks(write, n, size)
        return out

    def __repr__(self) -> str:
        return f"PredictPlan({self.ops!r}, image_ops={self.image_ops})"


__all__ = ["PredictPlan", "ConvOp", "DenseOp", "LayerOp", "StepOp", "Op", "compile_ops", "fold_batchnorm"]
