"""Layers of the NumPy engine, NHWC, forward and backward side by side.

Every layer follows the same small protocol (see docs/internals.md):

- ``build(input_shape, rng) -> output_shape`` creates the parameters (shapes
  without the batch axis);
- ``forward(x, training=False, cache=True)`` computes the output and, when
  ``cache`` is true, keeps what ``backward`` needs (one cache per call; with
  ``cache=False`` the call does not touch the layer, so threads can share it);
- ``backward(grad_out, need_input_grad=True)`` fills ``grads`` (unless the layer
  is frozen) and returns dL/dx, or ``None`` when ``need_input_grad`` is false;
- ``get_config()`` returns the JSON-able constructor arguments plus ``class`` and ``name``.

Layers with ``chunk_hooks`` (Conv2D with valid padding, MaxPool2D with pool == stride) also take
``before(a, b)`` and ``after(array, a, b)`` hooks in ``forward`` and ``backward``: ``before`` writes
images ``a:b`` of the input (a deferred pass of the layer before, see ``parallel.Pending``) just
before the layer's chunk reads them, ``after`` sees each chunk of the result once written. This is
how ``nn/steps.py`` runs a BatchNorm inside its neighbours' chunks; the layers know nothing of it.

Computation follows the input dtype (float32 in use, float64 in gradient
checks: cast a layer with :meth:`Layer.astype`). Weights are laid out like
Keras, so exporting to Keras is copying arrays.
"""

from __future__ import annotations

import numpy as np

from breastcnn.errors import UserInputError
from breastcnn.nn import functional as F
from breastcnn.nn.parallel import ChunkResults, Pending, chunk_size, map_chunks, ordered_sum


class Layer:
    """Base class. ``params``/``grads`` share keys; ``state`` holds non-trainable buffers."""

    #: parameter keys that the L2 penalty of ``Sequential.compile(l2=...)`` applies to
    regularized: tuple[str, ...] = ()
    #: whether forward/backward take ``before``/``after`` chunk hooks (see the module docstring)
    chunk_hooks: bool = False

    def __init__(self, name: str | None = None, trainable: bool = True):
        self.name = name
        self.trainable = bool(trainable)
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.state: dict[str, np.ndarray] = {}
        self.input_shape: tuple | None = None
        self.output_shape: tuple | None = None
        self._cache = None

    # -- protocol -------------------------------------------------------------
    def build(self, input_shape: tuple, rng: np.random.Generator) -> tuple:
        self.input_shape = tuple(int(d) for d in input_shape)
        self.output_shape = self.compute_output_shape(self.input_shape)
        return self.output_shape

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        """Output shape (without batch) for ``input_shape``; raises ShapeError if impossible."""
        return tuple(input_shape)

    def forward(self, x: np.ndarray, training: bool = False, cache: bool = True) -> np.ndarray:
        raise NotImplementedError

    def backward(self, grad_out: np.ndarray, need_input_grad: bool = True):
        raise NotImplementedError

    def get_config(self) -> dict:
        return {"class": type(self).__name__, "name": self.name, "trainable": self.trainable}

    # -- helpers --------------------------------------------------------------
    def astype(self, dtype) -> Layer:
        """Cast parameters and buffers in place (float64 for gradient checks)."""
        for store in (self.params, self.state):
            for key, value in store.items():
                store[key] = value.astype(dtype)
        self.grads = {}
        return self

    def _need_cache(self):
        if self._cache is None:
            raise RuntimeError(f"{self.name or type(self).__name__}: backward() called without a cached forward()")
        return self._cache

    def _set_grad(self, key: str, value: np.ndarray) -> None:
        if self.trainable:
            self.grads[key] = value

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "class")
        return f"{type(self).__name__}({args})"


class ShapeError(UserInputError):
    """An input is too small (or has the wrong rank) for a layer."""


def _check_rank(layer: Layer, input_shape: tuple, rank: int, what: str) -> None:
    if len(input_shape) != rank:
        raise ShapeError(f"{type(layer).__name__} expects {what} input (without batch), got shape {tuple(input_shape)}")


def _init_kernel(rng: np.random.Generator, shape: tuple, fan_in: int, fan_out: int, method: str) -> np.ndarray:
    if method == "he_normal":  # Keras: truncated normal, std sqrt(2/fan_in); plain normal here
        w = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)
    elif method == "glorot_uniform":
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        w = rng.uniform(-limit, limit, size=shape)
    else:
        raise ValueError(f"kernel_initializer must be 'he_normal' or 'glorot_uniform', got {method!r}")
    return w.astype(np.float32)


def _as_pair(value, what: str) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{what} must be an int or a square pair, got {value!r}")
        value = value[0]
    value = int(value)
    if value < 1:
        raise ValueError(f"{what} must be >= 1, got {value}")
    return value, value


#: a conv layer whose batch fits one chunk is still cut in two when its working set is at least this
#: big (below it, the chunk bookkeeping costs more than a second thread saves)
_SPLIT_BYTES = 1 << 20


class Conv2D(Layer):
    """2-D convolution (cross-correlation, like Keras), NHWC.

    W: (kh, kw, c_in, filters), b: (filters,). x: (N, H, W, c_in) -> (N, Ho, Wo, filters).
    Forward is im2col + one GEMM; backward is two GEMMs (dW, dcols) + col2im.
    """

    regularized = ("W",)

    def __init__(
        self,
        filters: int,
        kernel_size=3,
        strides=1,
        padding: str = "valid",
        use_bias: bool = True,
        kernel_initializer: str = "glorot_uniform",
        name=None,
        trainable=True,
    ):
        super().__init__(name, trainable)
        self.filters = int(filters)
        self.kernel_size = _as_pair(kernel_size, "kernel_size")[0]
        self.strides = _as_pair(strides, "strides")[0]
        if padding not in F.PADDINGS:
            raise ValueError(f"padding must be one of {F.PADDINGS}, got {padding!r}")
        self.padding = padding
        self.use_bias = bool(use_bias)
        self.kernel_initializer = kernel_initializer

    def compute_output_shape(self, input_shape):
        _check_rank(self, input_shape, 3, "(H, W, C)")
        h, w, _ = input_shape
        k, s = self.kernel_size, self.strides
        ho, wo = F.conv_output_size(h, k, s, self.padding), F.conv_output_size(w, k, s, self.padding)
        if ho < 1 or wo < 1:
            raise ShapeError(
                f"{self.name or 'Conv2D'}: input {h}x{w} is smaller than its {k}x{k} kernel (valid padding)"
            )
        return (ho, wo, self.filters)

    def build(self, input_shape, rng):
        out = super().build(input_shape, rng)
        k, cin = self.kernel_size, self.input_shape[2]
        self.params["W"] = _init_kernel(
            rng, (k, k, cin, self.filters), k * k * cin, k * k * self.filters, self.kernel_initializer
        )
        if self.use_bias:
            self.params["b"] = np.zeros(self.filters, np.float32)
        return out

    def _chunk(self, x_shape, dtype) -> int:
        """Images per chunk: input + columns + output of a chunk stay in cache (shape-dependent only)."""
        _, h, w, cin = x_shape
        k, s = self.kernel_size, self.strides
        ho, wo = (h - k) // s + 1, (w - k) // s + 1
        per_image = (h * w * cin + ho * wo * (k * k * cin + 2 * self.filters)) * np.dtype(dtype).itemsize
        chunk = chunk_size(per_image)
        n = x_shape[0]
        if n <= chunk and n * per_image >= _SPLIT_BYTES:
            # the whole batch fits one chunk (small late layers, e.g. the third conv): still cut it in
            # two so that two engine threads share it (fixed by the shapes: deterministic)
            chunk = -(-n // 2)
        return chunk

    @property
    def chunk_hooks(self) -> bool:
        """Whether forward/backward take ``before``/``after`` chunk hooks: valid padding (the chunks read
        the caller's arrays directly; "same" padding copies the input first)."""
        return self.padding == "valid"

    def forward(self, x, training=False, cache=True, before=None, after=None):
        """x (N, H, W, C_in) -> (N, Ho, Wo, filters).

        before(a, b): writes images ``a:b`` of ``x`` before this layer's chunk reads them (valid padding).
        after(out, a, b): called on each chunk of the output once written, while it is in cache (any
        padding; e.g. the batch moments for the BatchNorm after this layer)."""
        bias = self.params["b"] if self.use_bias else None
        return self._conv(x, self.params["W"], bias, cache=cache, before=before, after=after)

    def _conv(self, x, kernel, bias, cache: bool, before=None, after=None):
        """x (N, H, W, C_in) conv ``kernel`` (kh, kw, C_in, F) + ``bias`` (F,) or None."""
        k, s = self.kernel_size, self.strides
        pads = None
        if self.padding == "same":
            if before is not None:
                raise ValueError(f"{self.name}: a before hook needs valid padding")
            x, pads = F.pad_same(x, (k, k), s)
        n, h, w, _ = x.shape
        ho, wo = (h - k) // s + 1, (w - k) // s + 1
        w_mat = kernel.reshape(-1, self.filters)
        # bias tiled over a whole output image: the add then runs as one long inner loop per image
        # (a single image: over one output row, cheaper to build than it saves)
        per = wo if n == 1 else ho * wo
        bias = None if bias is None else np.tile(bias, per)
        out = np.empty((n, ho, wo, self.filters), dtype=np.result_type(x.dtype, w_mat.dtype))
        pixels = ho * wo
        # Keep the columns for backward only when they are smaller than the input (stride > kernel,
        # e.g. the first layer): otherwise backward rebuilds each chunk's columns from x while in cache.
        keep_cols = cache and self.trainable and pixels * w_mat.shape[0] <= h * w * x.shape[3]
        all_cols = np.empty((n * pixels, w_mat.shape[0]), x.dtype) if keep_cols else None

        def chunk(a, b):  # im2col + the one GEMM on a cache-sized chunk of images, written in place
            if before is not None:
                before(a, b)
            rows = out[a:b].reshape(-1, self.filters)
            cols = F.im2col(x[a:b], k, k, s, out=None if all_cols is None else all_cols[a * pixels : b * pixels])
            F.matmul_rows(cols, w_mat, out=rows)
            images = out[a:b].reshape(-1, per * self.filters)
            if bias is not None:
                images += bias
            if after is not None:
                after(out, a, b)

        if n == 1:
            chunk(0, 1)
        else:
            map_chunks(chunk, n, self._chunk(x.shape, out.dtype))
        if cache:
            self._cache = (x, all_cols, pads)
        return out

    def backward(self, grad_out, need_input_grad=True, before=None, after=None):
        """grad_out (N, Ho, Wo, filters) -> dL/dx (N, H, W, C_in), or None when not ``need_input_grad``.

        before(a, b): writes images ``a:b`` of ``grad_out`` (a deferred BatchNorm input gradient) before
        this chunk reads them. after(dx, a, b): called on each chunk of the input gradient right after it
        is written (valid padding; dx is then computed even when ``need_input_grad`` is false)."""
        x, all_cols, pads = self._need_cache()
        k, s, f = self.kernel_size, self.strides, self.filters
        n = x.shape[0]
        dtype = np.result_type(grad_out.dtype, self.params["W"].dtype)
        if after is not None and pads is not None:
            raise ValueError(f"{self.name}: an after hook on the input gradient needs valid padding")
        need_input_grad = need_input_grad or after is not None
        dx = np.empty(x.shape, dtype=dtype) if need_input_grad else None

        def chunk(a, b):  # (dW, db) partials of the chunk; dx rows written in place
            if before is not None:
                before(a, b)
            g = grad_out[a:b].reshape(-1, f)
            parts = None
            if self.trainable:
                pixels = g.shape[0] // (b - a)
                cols = F.im2col(x[a:b], k, k, s) if all_cols is None else all_cols[a * pixels : b * pixels]
                parts = (cols.T @ g, np.ones(g.shape[0], g.dtype) @ g if self.use_bias else None)
            if dx is not None:
                # = col2im(g @ W_mat.T), organised so that memory traffic stays in long runs
                F.conv_input_grad(grad_out[a:b], self.params["W"], x[a:b].shape, s, out=dx[a:b])
                if after is not None:
                    after(dx, a, b)
            return parts

        results = map_chunks(chunk, n, self._chunk(x.shape, dtype))
        if self.trainable:  # chunk partials summed in chunk order: same result for any thread count
            self.grads["W"] = ordered_sum([p[0] for p in results]).reshape(self.params["W"].shape)
            if self.use_bias:  # GEMV sums: faster than g.sum(axis=0)
                self.grads["b"] = ordered_sum([p[1] for p in results])
        if dx is None:
            return None
        if pads is not None:
            (top, bottom), (left, right) = pads
            dx = dx[:, top : x.shape[1] - bottom, left : x.shape[2] - right, :]
        return dx

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "padding": self.padding,
            "use_bias": self.use_bias,
            "kernel_initializer": self.kernel_initializer,
        }


class BatchNorm(Layer):
    """Batch normalisation over the channel axis (last), Keras semantics.

    Training: normalise with the batch mean and biased variance and update the
    moving statistics (``moving = momentum*moving + (1-momentum)*batch``).
    Inference, or a frozen layer (Keras: ``trainable=False`` BN runs in
    inference mode): use the moving statistics.
    gamma, beta, moving_mean, moving_variance: (C,).
    """

    def __init__(self, momentum: float = 0.9, epsilon: float = 1e-3, name=None, trainable=True):
        super().__init__(name, trainable)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)

    def build(self, input_shape, rng):
        out = super().build(input_shape, rng)
        c = self.input_shape[-1]
        self.params["gamma"] = np.ones(c, np.float32)
        self.params["beta"] = np.zeros(c, np.float32)
        self.state["moving_mean"] = np.zeros(c, np.float32)
        self.state["moving_variance"] = np.ones(c, np.float32)
        return out

    @staticmethod
    def _view(x: np.ndarray) -> tuple[np.ndarray, int]:
        """x as a 2-D (rows, W*C) array and the repeat W, for the reductions (column sums as GEMVs over
        many rows): per-channel vectors are tiled W times so that every operation runs over long rows."""
        reps = x.shape[-2] if x.ndim >= 3 and x.size >= 4096 else 1  # tiny: tiling costs more than it saves
        return x.reshape(-1, reps * x.shape[-1]), reps

    @staticmethod
    def _image_view(x: np.ndarray) -> tuple[np.ndarray, int]:
        """x as (N, features) and the repeat features/C, for the element-wise passes: with vectors tiled
        over a whole image, NumPy runs one long inner loop per image (faster than one per W*C row)."""
        flat = x.reshape(x.shape[0], -1)
        return flat, flat.shape[1] // x.shape[-1]

    @staticmethod
    def _per_chunk(flat: np.ndarray) -> int:
        # entries of the leading axis per chunk: the few arrays of that shape a pass touches stay in cache
        return chunk_size(4 * flat.shape[1] * flat.itemsize)

    def inference_affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, shift) (C,) of inference mode: ``y = x * scale + shift`` with the moving statistics."""
        scale = self.params["gamma"] / np.sqrt(self.state["moving_variance"] + self.epsilon)
        return scale, self.params["beta"] - self.state["moving_mean"] * scale

    def uses_batch_statistics(self, training: bool) -> bool:
        """Whether a forward pass normalises with the batch's statistics (training, and not frozen)."""
        return bool(training and self.trainable)

    def forward(self, x, training=False, cache=True):
        return self.forward_deferred(x, training, cache).complete()

    def forward_deferred(self, x, training=False, cache=True, moments=None, relu: bool = False) -> Pending:
        """``forward`` with the output left for its consumer to write, chunk by chunk.

        Returns a :class:`~breastcnn.nn.parallel.Pending` whose ``fill(a, b)`` normalises images ``a:b``
        into it, then takes max(., 0) when ``relu`` (a ReLU after this layer, fused into the same pass).
        The batch statistics, the moving averages and this layer's cache are done at once.
        moments: the batch (mean, variance) (C,) when the layer before already computed them (a conv's
        ``after`` hook); otherwise two passes over ``x`` compute them.
        """
        batch_stats = self.uses_batch_statistics(training)
        if batch_stats:
            if moments is None:  # per-chunk moments combined exactly (Chan): as exact as a two-pass variance
                rows, reps = self._view(x)
                moments = F.combine_moments(
                    map_chunks(lambda a, b: F.channel_moments(rows[a:b], reps), rows.shape[0], self._per_chunk(rows))
                )
            mean, var = moments
            mom = self.momentum
            for key, value in (("moving_mean", mean), ("moving_variance", var)):
                self.state[key] = (mom * self.state[key] + (1 - mom) * value).astype(self.state[key].dtype)
            mean, var = mean.astype(x.dtype), var.astype(x.dtype)
        else:
            mean = self.state["moving_mean"].astype(x.dtype)
            var = self.state["moving_variance"].astype(x.dtype)
        inv_std = (1.0 / np.sqrt(var + self.epsilon)).astype(x.dtype)
        scale = (self.params["gamma"] * inv_std).astype(x.dtype)
        shift = (self.params["beta"] - mean * scale).astype(x.dtype)
        flat, reps = self._image_view(x)  # (N, features)
        scale_t, shift_t = np.tile(scale, reps), np.tile(shift, reps)
        zeros = F.zeros_vector(scale_t.size, x.dtype) if relu else None
        out = np.empty_like(flat)

        def normalise(a, b):  # x * scale + shift (then max(., 0)) of images a:b, in place in the output
            o = out[a:b]
            np.multiply(flat[a:b], scale_t, out=o)
            o += shift_t
            if zeros is not None:
                np.maximum(o, zeros, out=o)

        if cache:  # the input (not x - mean): backward recomputes the centring chunk by chunk
            self._cache = (x, mean, inv_std, batch_stats)
        return Pending(out.reshape(x.shape), normalise, self._per_chunk(flat))

    def backward(self, grad_out, need_input_grad=True):
        dx = self.backward_deferred(grad_out, need_input_grad)
        return None if dx is None else dx.complete()

    def grad_sums_hook(self, relu_out=None) -> ChunkResults:
        """A chunk hook for the layer whose backward writes this layer's output gradient (in chunks of images).

        ``hook(g, a, b)`` masks images ``a:b`` of ``g`` (N, ...) in place by ``relu_out > 0`` (the backward
        of a ReLU after this layer, whose output is ``relu_out``; None: no ReLU) and keeps their partial
        sums (sum g, sum g * (x - mean)) while the chunk is in cache; hand the hook to
        ``backward_deferred(sums=...)``.
        """
        x, mean, _, _ = self._need_cache()
        rows, reps = self._view(x)
        per = rows.shape[0] // x.shape[0]  # rows per image
        mean_t = np.tile(mean, reps)
        relu_rows = None if relu_out is None else relu_out.reshape(rows.shape)

        def sums(g, a, b):
            gc = g.reshape(rows.shape)[a * per : b * per]
            if relu_rows is not None:
                np.multiply(gc, relu_rows[a * per : b * per] > 0, out=gc)
            return self._grad_sums(gc, rows[a * per : b * per], mean_t)

        return ChunkResults(sums)

    @staticmethod
    def _grad_sums(g, x, mean_t):
        """(sum over rows of g, of g * (x - mean)), tiled (W*C,); column sums as GEMVs (faster than axis-0)."""
        return np.ones(g.shape[0], g.dtype) @ g, np.einsum("ij,ij->j", g, x - mean_t)

    def backward_deferred(self, grad_out, need_input_grad=True, relu_out=None, sums: ChunkResults | None = None):
        """``backward`` with the input gradient left for the layer below to write, chunk by chunk.

        Fills ``grads`` now and returns a :class:`~breastcnn.nn.parallel.Pending` whose ``fill(a, b)``
        writes images ``a:b`` of dL/dx (None when not ``need_input_grad``).
        relu_out: the output of a ReLU after this layer, ``grad_out`` then being that ReLU's output
        gradient (its backward runs in the same pass: same values as ``backward(relu.backward(g))``).
        sums: the :meth:`grad_sums_hook` that the layer above already ran over every chunk of
        ``grad_out`` (masked in place by then); skips the pass that computes the sums.
        """
        x, mean, inv_std, batch_stats = self._need_cache()
        n, c = x.shape[0], x.shape[-1]
        g_img, reps_img = self._image_view(grad_out)
        x_img, _ = self._image_view(x)
        chunk = self._per_chunk(g_img)
        if sums is not None:  # masked in place by the hook: dx overwrites the masked gradient
            dx, src = g_img, g_img
            parts = sums.ordered()
        else:
            dx = np.empty_like(g_img)
            src = dx if relu_out is not None else g_img  # the ReLU-masked gradient goes into dx first
            hook = self.grad_sums_hook(None)
            relu_img = None if relu_out is None else relu_out.reshape(g_img.shape)

            def chunk_sums(a, b):
                if relu_img is not None:
                    np.multiply(g_img[a:b], relu_img[a:b] > 0, out=dx[a:b])
                hook(src, a, b)

            map_chunks(chunk_sums, n, chunk)
            parts = hook.ordered()
        reps_row = parts[0][0].shape[0] // c
        fold = lambda v: v.reshape(reps_row, c).sum(axis=0)  # noqa: E731  (W*C,) -> (C,), fixed order
        dbeta = fold(ordered_sum([p[0] for p in parts]))
        dgamma = fold(ordered_sum([p[1] for p in parts])) * inv_std  # sum(g * x_hat)
        self._set_grad("gamma", dgamma)
        self._set_grad("beta", dbeta)
        if not need_input_grad:
            return None
        scale = self.params["gamma"] * inv_std
        scale_t = np.tile(scale, reps_img).astype(g_img.dtype)
        if batch_stats:
            # dx = scale * (g - mean(g) - x_hat * mean(g * x_hat)) = g*scale - (x*a + (b - mean*a))
            m = x.size // c
            a_vec = scale * inv_std * dgamma / m
            a_t = np.tile(a_vec, reps_img).astype(g_img.dtype)
            c_t = np.tile(scale * dbeta / m - mean * a_vec, reps_img).astype(g_img.dtype)

            def input_grad(a, b):
                correction = x_img[a:b] * a_t
                correction += c_t
                d = dx[a:b]
                np.multiply(src[a:b], scale_t, out=d)
                d -= correction
        else:

            def input_grad(a, b):
                np.multiply(src[a:b], scale_t, out=dx[a:b])

        return Pending(dx.reshape(grad_out.shape), input_grad, chunk)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "epsilon": self.epsilon}


#: arrays with fewer elements skip chunking and tiling (their per-call overhead would dominate)
_SMALL = 1 << 15


def _elementwise_chunk(flat: np.ndarray) -> int:
    """Samples per chunk for an element-wise layer on ``flat`` (N, features)."""
    return chunk_size(2 * flat.shape[1] * flat.itemsize)


class ReLU(Layer):
    """max(x, 0), element-wise."""

    def forward(self, x, training=False, cache=True):
        flat_x = x.reshape(x.shape[0], -1)
        zeros = F.zeros_vector(flat_x.shape[1], x.dtype)
        if x.size < _SMALL:  # not worth the chunk machinery
            out = np.maximum(flat_x, zeros).reshape(x.shape)
            if cache:
                self._cache = out
            return out
        out = np.empty_like(x)
        flat_out = out.reshape(x.shape[0], -1)
        map_chunks(
            lambda a, b: np.maximum(flat_x[a:b], zeros, out=flat_out[a:b]), x.shape[0], _elementwise_chunk(flat_x)
        )
        if cache:
            self._cache = out
        return out

    def cache_output(self, out):
        """Keep ``out`` (= max(x, 0) of this layer's input, computed by a fused step) for ``backward``."""
        self._cache = out

    def cached_output(self):
        """This layer's output in the last cached forward (its backward mask)."""
        return self._need_cache()

    def backward(self, grad_out, need_input_grad=True):
        out = self._need_cache()
        if not need_input_grad:
            return None
        if grad_out.size < _SMALL:
            return grad_out * (out > 0)
        dx = np.empty_like(grad_out)
        flat_g, flat_out, flat_dx = (a.reshape(a.shape[0], -1) for a in (grad_out, out, dx))
        map_chunks(
            lambda a, b: np.multiply(flat_g[a:b], flat_out[a:b] > 0, out=flat_dx[a:b]),
            dx.shape[0],
            _elementwise_chunk(flat_g),
        )
        return dx


class LeakyReLU(Layer):
    """x if x > 0 else negative_slope * x."""

    def __init__(self, negative_slope: float = 0.01, name=None, trainable=True):
        super().__init__(name, trainable)
        self.negative_slope = float(negative_slope)

    def forward(self, x, training=False, cache=True):
        positive = x > 0
        out = np.where(positive, x, x * np.asarray(self.negative_slope, x.dtype))
        if cache:
            self._cache = positive
        return out

    def backward(self, grad_out, need_input_grad=True):
        positive = self._need_cache()
        if not need_input_grad:
            return None
        return np.where(positive, grad_out, grad_out * np.asarray(self.negative_slope, grad_out.dtype))

    def get_config(self):
        return {**super().get_config(), "negative_slope": self.negative_slope}


class MaxPool2D(Layer):
    """Max pooling, valid padding (Keras default). x: (N, H, W, C) -> (N, Ho, Wo, C).

    The gradient of each window goes to its first maximum (row-major), like TF.
    """

    def __init__(self, pool_size=2, strides=None, name=None, trainable=True):
        super().__init__(name, trainable)
        self.pool_size = _as_pair(pool_size, "pool_size")[0]
        self.strides = self.pool_size if strides is None else _as_pair(strides, "strides")[0]

    def compute_output_shape(self, input_shape):
        _check_rank(self, input_shape, 3, "(H, W, C)")
        h, w, c = input_shape
        p, s = self.pool_size, self.strides
        ho, wo = F.conv_output_size(h, p, s, "valid"), F.conv_output_size(w, p, s, "valid")
        if ho < 1 or wo < 1:
            raise ShapeError(f"{self.name or 'MaxPool2D'}: input {h}x{w} is smaller than its {p}x{p} pool")
        return (ho, wo, c)

    def _windows(self, shape):
        """Slices (one per pool offset) selecting that offset of every window."""
        _, h, w, _ = shape
        p, s = self.pool_size, self.strides
        ho, wo = (h - p) // s + 1, (w - p) // s + 1
        for dy in range(p):
            for dx in range(p):
                yield (slice(None), slice(dy, dy + s * (ho - 1) + 1, s), slice(dx, dx + s * (wo - 1) + 1, s))

    @property
    def chunk_hooks(self) -> bool:
        """Whether forward/backward take ``before``/``after`` chunk hooks (see Conv2D): pool == stride."""
        return self.pool_size == self.strides

    def forward(self, x, training=False, cache=True, before=None, after=None):
        """before(a, b): writes images ``a:b`` of ``x`` before this chunk reads them; after(out, a, b): called
        on each output chunk once written. Hooks need pool == stride."""
        n, h, w, c = x.shape
        p, s = self.pool_size, self.strides
        ho, wo = (h - p) // s + 1, (w - p) // s + 1
        if (before is not None or after is not None) and p != s:
            raise ValueError(f"{self.name}: chunk hooks need pool_size == strides")
        if p == s:  # non-overlapping windows: crop and reshape, in batch chunks (engine threads)
            out = np.empty((n, ho, wo, c), dtype=x.dtype)

            def chunk(a, b):
                if before is not None:
                    before(a, b)
                # one np.maximum per window offset over strided views (much faster than .max(axis=(2, 4)))
                windows = x[a:b, : ho * p, : wo * p, :].reshape(b - a, ho, p, wo, p, c)
                o = out[a:b]
                o[...] = windows[:, :, 0, :, 0, :]
                for dy in range(p):
                    for dx in range(p):
                        if dy or dx:
                            np.maximum(o, windows[:, :, dy, :, dx, :], out=o)
                if after is not None:
                    after(out, a, b)

            map_chunks(chunk, n, chunk_size(3 * h * w * c * x.itemsize))
        else:
            out = None
            for sl in self._windows(x.shape):
                out = x[sl].copy() if out is None else np.maximum(out, x[sl], out=out)
        if cache:
            self._cache = (x, out)
        return out

    def backward(self, grad_out, need_input_grad=True, before=None, after=None):
        """before(a, b): writes images ``a:b`` of ``grad_out`` before this chunk reads them.
        after(dx, a, b): called on each chunk of the input gradient right after it is written (dx is
        then computed even when ``need_input_grad`` is false). Hooks need pool == stride."""
        x, out = self._need_cache()
        if (before is not None or after is not None) and not self.chunk_hooks:
            raise ValueError(f"{self.name}: chunk hooks need pool_size == strides")
        if not need_input_grad and after is None:
            return None
        if self.pool_size == self.strides:
            dx = np.empty(x.shape, dtype=grad_out.dtype)

            def chunk(a, b):
                if before is not None:
                    before(a, b)
                self._backward_disjoint(x[a:b], out[a:b], grad_out[a:b], dx[a:b])
                if after is not None:
                    after(dx, a, b)

            map_chunks(chunk, x.shape[0], chunk_size(4 * x[0].size * x.itemsize))
            return dx
        dx = np.zeros_like(x, dtype=grad_out.dtype)
        unrouted = np.ones(out.shape, dtype=bool)
        for sl in self._windows(x.shape):
            hit = x[sl] == out
            hit &= unrouted
            unrouted &= ~hit
            dx[sl] += np.where(hit, grad_out, 0)
        return dx

    def _backward_disjoint(self, x, out, grad_out, dx):
        """pool == stride: one broadcast compare over the (N, Ho, p, Wo, p, C) view, ties broken in order;
        the gradient is written straight into ``dx`` (N, H, W, C) (rows/columns no window covers get 0)."""
        n, h, w, c = x.shape
        p = self.pool_size
        ho, wo = out.shape[1], out.shape[2]
        windows = x[:, : ho * p, : wo * p, :].reshape(n, ho, p, wo, p, c)
        hit = windows == out[:, :, None, :, None, :]
        seen = None
        for dy in range(p):  # keep only the first maximum of each window (TF routes to one element)
            for dx_ in range(p):
                cell = hit[:, :, dy, :, dx_, :]
                if seen is None:
                    seen = cell.copy()
                else:
                    cell &= ~seen
                    seen |= cell
        np.multiply(hit, grad_out[:, :, None, :, None, :], out=dx[:, : ho * p, : wo * p, :].reshape(n, ho, p, wo, p, c))
        dx[:, ho * p :, :, :] = 0
        dx[:, : ho * p, wo * p :, :] = 0

    def get_config(self):
        return {**super().get_config(), "pool_size": self.pool_size, "strides": self.strides}


class GlobalAveragePooling2D(Layer):
    """Mean over H and W. x: (N, H, W, C) -> (N, C)."""

    def compute_output_shape(self, input_shape):
        _check_rank(self, input_shape, 3, "(H, W, C)")
        return (input_shape[2],)

    def forward(self, x, training=False, cache=True):
        if cache:
            self._cache = x.shape
        return x.mean(axis=(1, 2))

    def backward(self, grad_out, need_input_grad=True):
        shape = self._need_cache()
        if not need_input_grad:
            return None
        g = grad_out / (shape[1] * shape[2])
        return np.broadcast_to(g[:, None, None, :], shape).copy()


class Flatten(Layer):
    """(N, ...) -> (N, prod(...)), C order (same as Keras on NHWC)."""

    def compute_output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)

    def forward(self, x, training=False, cache=True):
        if cache:
            self._cache = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, grad_out, need_input_grad=True):
        shape = self._need_cache()
        if not need_input_grad:
            return None
        return grad_out.reshape(shape)


#: a Dense layer whose batch * weights is at least this splits its GEMMs over two engine threads
_DENSE_SPLIT = 1 << 22


class Dense(Layer):
    """Fully connected. W: (in, units), b: (units,). x: (N, in) -> (N, units)."""

    regularized = ("W",)

    def __init__(
        self, units: int, use_bias: bool = True, kernel_initializer: str = "glorot_uniform", name=None, trainable=True
    ):
        super().__init__(name, trainable)
        self.units = int(units)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = kernel_initializer

    def compute_output_shape(self, input_shape):
        _check_rank(self, input_shape, 1, "flat (features,)")
        return (self.units,)

    def build(self, input_shape, rng):
        out = super().build(input_shape, rng)
        fan_in = self.input_shape[0]
        self.params["W"] = _init_kernel(rng, (fan_in, self.units), fan_in, self.units, self.kernel_initializer)
        if self.use_bias:
            self.params["b"] = np.zeros(self.units, np.float32)
        return out

    def forward(self, x, training=False, cache=True):
        w = self.params["W"]
        if x.shape[0] * w.size >= _DENSE_SPLIT:
            # a large layer (the custom model's 2304 -> 128 at batch 32) in two column halves, one per
            # engine thread
            out = np.empty((x.shape[0], self.units), np.result_type(x.dtype, w.dtype))
            bounds = [0, self.units // 2, self.units]

            def part(i, _):
                a, b = bounds[i], bounds[i + 1]
                np.matmul(x, w[:, a:b], out=out[:, a:b])

            map_chunks(part, 2, 1)
        else:
            out = x @ w
        if self.use_bias:
            out += self.params["b"]
        if cache:
            self._cache = x
        return out

    def backward(self, grad_out, need_input_grad=True):
        x = self._need_cache()
        tasks = []
        if self.trainable:

            def weight_grads():
                self.grads["W"] = x.T @ grad_out
                if self.use_bias:
                    self.grads["b"] = np.ones(grad_out.shape[0], grad_out.dtype) @ grad_out

            tasks.append(weight_grads)
        dx = []
        if need_input_grad:
            tasks.append(lambda: dx.append(grad_out @ self.params["W"].T))
        # the two GEMMs are independent: on a large layer, one per engine thread
        if len(tasks) == 2 and x.shape[0] * self.params["W"].size >= _DENSE_SPLIT:
            map_chunks(lambda i, _: tasks[i](), 2, 1)
        else:
            for task in tasks:
                task()
        return dx[0] if dx else None

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "use_bias": self.use_bias,
            "kernel_initializer": self.kernel_initializer,
        }


class Dropout(Layer):
    """Inverted dropout: in training, zero a fraction ``rate`` and scale the rest by 1/(1-rate).

    The mask comes from ``self.rng`` (a Generator derived from the build rng);
    tests may replace it to fix the mask.
    """

    def __init__(self, rate: float, name=None, trainable=True):
        super().__init__(name, trainable)
        self.rate = float(rate)
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"Dropout rate must be in [0, 1), got {rate!r}")
        self.rng = np.random.default_rng(0)

    def build(self, input_shape, rng):
        self.rng = np.random.default_rng(rng.integers(2**63))
        return super().build(input_shape, rng)

    def forward(self, x, training=False, cache=True):
        if not training or self.rate == 0.0:
            if cache:
                self._cache = None, x.dtype
            return x
        keep = self.rng.random(x.shape, dtype=np.float32) >= self.rate
        mask = keep.astype(x.dtype) * np.asarray(1.0 / (1.0 - self.rate), x.dtype)
        if cache:
            self._cache = mask, x.dtype
        return x * mask

    def backward(self, grad_out, need_input_grad=True):
        mask, _ = self._need_cache()
        if not need_input_grad:
            return None
        return grad_out if mask is None else grad_out * mask

    def get_config(self):
        return {**super().get_config(), "rate": self.rate}


class Softmax(Layer):
    """Softmax over the last axis (probabilities)."""

    def forward(self, x, training=False, cache=True):
        out = F.softmax(x)
        if cache:
            self._cache = out
        return out

    def backward(self, grad_out, need_input_grad=True):
        y = self._need_cache()
        if not need_input_grad:
            return None
        return y * (grad_out - np.sum(grad_out * y, axis=-1, keepdims=True))


#: The only classes a model file may name (io.py builds nothing else).
LAYER_CLASSES: dict[str, type[Layer]] = {
    cls.__name__: cls
    for cls in (Conv2D, BatchNorm, ReLU, LeakyReLU, MaxPool2D, GlobalAveragePooling2D, Flatten, Dense, Dropout, Softmax)
}


def layer_from_config(config: dict) -> Layer:
    """Build a layer from ``get_config()`` output; only classes in LAYER_CLASSES."""
    if not isinstance(config, dict) or "class" not in config:
        raise UserInputError(f"layer config must be a dict with a 'class' key, got {config!r}")
    kwargs = dict(config)
    cls_name = kwargs.pop("class")
    cls = LAYER_CLASSES.get(cls_name)
    if cls is None:
        raise UserInputError(f"unknown layer class {cls_name!r}; supported: {', '.join(sorted(LAYER_CLASSES))}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"bad config for layer {cls_name}: {exc}") from None
