"""Stateless building blocks of the engine: output shapes, padding, im2col/col2im.

Everything is NHWC. A convolution is computed as one GEMM between the
"columns" matrix (one row per output pixel, ``kh*kw*c_in`` values ordered
like the Keras kernel ``(kh, kw, c_in, c_out)``) and the kernel reshaped to
``(kh*kw*c_in, c_out)``. ``conv2d_reference`` is the slow, obviously correct
loop version the fast path is tested against.
"""

from __future__ import annotations

import functools
import math
from itertools import pairwise

import numpy as np
from numpy.lib.stride_tricks import as_strided

PADDINGS = ("valid", "same")


def conv_output_size(size: int, kernel: int, stride: int, padding: str) -> int:
    """Output length along one axis (Keras/TF convention); 0 when the input is too small."""
    if padding == "same":
        return math.ceil(size / stride)
    if padding == "valid":
        return max((size - kernel) // stride + 1, 0)
    raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) zero padding of TF's "same" mode: the extra pixel goes after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: np.ndarray, kernel: tuple[int, int], stride: int) -> tuple[np.ndarray, tuple]:
    """Zero-pad ``x`` (N, H, W, C) for "same" convolution; returns (padded, ((top, bottom), (left, right)))."""
    ph = same_padding(x.shape[1], kernel[0], stride)
    pw = same_padding(x.shape[2], kernel[1], stride)
    if ph == (0, 0) and pw == (0, 0):
        return x, (ph, pw)
    return np.pad(x, ((0, 0), ph, pw, (0, 0))), (ph, pw)


def window_view(x: np.ndarray, kh: int, kw: int, stride: int) -> np.ndarray:
    """Read-only strided view (N, Ho, Wo, kh, kw, C) of the valid windows of ``x`` (N, H, W, C)."""
    n, h, w, c = x.shape
    ho = (h - kh) // stride + 1
    wo = (w - kw) // stride + 1
    sn, sh, sw, sc = x.strides
    return as_strided(
        x,
        shape=(n, ho, wo, kh, kw, c),
        strides=(sn, sh * stride, sw * stride, sh, sw, sc),
        writeable=False,
    )


def im2col(x: np.ndarray, kh: int, kw: int, stride: int, out: np.ndarray | None = None) -> np.ndarray:
    """Columns matrix of a valid convolution.

    x: (N, H, W, C) -> (N*Ho*Wo, kh*kw*C), rows in (n, i, j) order, columns
    in (dy, dx, c) order (the Keras kernel order). One copy from a strided
    view whose innermost axis is a whole (kw*C)-long kernel row (contiguous in
    ``x`` when C is its last, unit-stride axis), which NumPy copies much
    faster than the 6-D window view. ``out``: optional (N*Ho*Wo, kh*kw*C)
    array to fill (e.g. a reused buffer).
    """
    n, h, w, c = x.shape
    ho = (h - kh) // stride + 1
    wo = (w - kw) // stride + 1
    if out is None:
        out = np.empty((n * ho * wo, kh * kw * c), dtype=x.dtype)
    cols = out.reshape(n, ho, wo, kh, kw * c)
    sn, sh, sw, sc = x.strides
    if sc * c == sw:  # (kw, C) contiguous: copy kernel rows as (kw*C)-long runs
        shape, strides = (n, ho, wo, kh, kw * c), (sn, sh * stride, sw * stride, sh, sc)
        if x.flags.c_contiguous:  # a view straight on the buffer: ~0.5 us instead of as_strided's ~3 (batch 1)
            rows = np.ndarray(shape, x.dtype, x, 0, strides)
        else:
            rows = as_strided(x, shape=shape, strides=strides, writeable=False)
        np.copyto(cols, rows)
    else:
        cols.reshape(n, ho, wo, kh, kw, c)[...] = window_view(x, kh, kw, stride)
    return out


def im2col_pooled(x: np.ndarray, kh: int, kw: int, stride: int, pool: int, out: np.ndarray | None = None) -> np.ndarray:
    """Columns of the conv outputs a max pool (size = stride = ``pool``) reads, grouped by pool offset.

    x: (N, H, W, C) -> (pool*pool, N*Hp*Wp, kh*kw*C) with Hp = Ho // pool, Wp = Wo // pool (Ho, Wo: the
    valid conv's output size): block ``q = py*pool + px`` holds the windows of conv outputs
    ``(pool*i + py, pool*j + px)``, rows in (n, i, j) order, columns as :func:`im2col`. A GEMM then gives
    each pool offset as a contiguous block, and the pool is ``pool*pool - 1`` element-wise maxima. One copy
    from a strided view of ``x`` (C-contiguous) with (kw*C)-long runs, like :func:`im2col`.
    """
    n, h, w, c = x.shape
    p = pool
    hp, wp = ((h - kh) // stride + 1) // p, ((w - kw) // stride + 1) // p
    if out is None:
        out = np.empty((p * p, n * hp * wp, kh * kw * c), dtype=x.dtype)
    x = np.ascontiguousarray(x)
    sn, sh, sw, sc = x.strides
    shape = (p, p, n, hp, wp, kh, kw * c)
    strides = (stride * sh, stride * sw, sn, stride * p * sh, stride * p * sw, sh, sc)
    np.copyto(np.reshape(out, shape, copy=False), np.ndarray(shape, x.dtype, x, 0, strides))
    return out


def conv_rows(
    x: np.ndarray, kernel: np.ndarray, stride: int, out: np.ndarray | None = None, size: tuple[int, int] | None = None
) -> np.ndarray:
    """Valid convolution without a columns matrix, for ``stride >= kw`` (windows side by side in a row).

    x: (N, H, W, C), kernel: (kh, kw, C, F) -> (N, Ho, Wo, F). With stride >= kw, the windows' kernel
    rows ``dy`` form a strided (N, Ho, Wo, kw*C) view of ``x`` whose (Wo, kw*C) slices BLAS reads in
    place (row step ``stride*C >= kw*C``): the conv is ``kh`` GEMMs on those views, summed, and the
    im2col copy (``kh*Ho*Wo`` runs of only ``kw*C`` floats: the first layer's largest cost) is gone.
    ``out``: optional contiguous (N, Ho, Wo, F) array to write. ``size`` (Ho, Wo): compute only the first
    Ho x Wo outputs (default: all; ``predict`` skips those no later layer reads).
    """
    n, h, w, c = x.shape
    kh, kw, _, f = kernel.shape
    if stride < kw:
        raise ValueError(f"conv_rows needs stride >= kernel width, got stride {stride} and kernel {kw}")
    full = (h - kh) // stride + 1, (w - kw) // stride + 1
    ho, wo = full if size is None else size
    if not (0 < ho <= full[0] and 0 < wo <= full[1]):
        raise ValueError(f"conv_rows: {ho}x{wo} outputs asked, the input gives {full[0]}x{full[1]}")
    if out is None:
        out = np.empty((n, ho, wo, f), dtype=np.result_type(x.dtype, kernel.dtype))
    x = np.ascontiguousarray(x)  # a no-op for the engine's arrays; BLAS needs unit-stride kernel rows
    sn, sh, sw, sc = x.strides
    shape, strides = (n, ho, wo, kw * c), (sn, sh * stride, sw * stride, sc)
    part = None
    for dy in range(kh):
        rows = np.ndarray(shape, x.dtype, x, dy * sh, strides)  # a view straight on the buffer
        w_dy = kernel[dy].reshape(kw * c, f)
        if dy == 0:
            np.matmul(rows, w_dy, out=out)
        else:
            part = np.matmul(rows, w_dy, out=part)
            out += part
    return out


#: the largest M*N*K of one GEMM call in :func:`matmul_rows`. OpenBLAS (0.3.x, AVX-512 kernels) runs
#: products up to M*N*K = 1e6 with its small-matrix kernel (no packing), faster per row than its packed
#: path on the engine's shapes (figures: README, "Measured figures"); other BLAS libraries just make a
#: few more calls.
GEMM_MNK = 1_000_000


def matmul_rows(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``a @ b`` for a (M, K) and b (K, N), in near-equal blocks of rows of at most ``GEMM_MNK / (K*N)``.

    ``out``: optional (M, N) array to write (each block written in place)."""
    m, k = a.shape
    n = b.shape[1]
    if out is None:
        out = np.empty((m, n), np.result_type(a.dtype, b.dtype))
    parts = -(-m * k * n // GEMM_MNK)
    if parts <= 1:
        return np.matmul(a, b, out=out)
    bounds = [m * i // parts for i in range(parts + 1)]
    for lo, hi in pairwise(bounds):
        np.matmul(a[lo:hi], b, out=out[lo:hi])
    return out


def col2im(cols: np.ndarray, x_shape: tuple, kh: int, kw: int, stride: int) -> np.ndarray:
    """Adjoint of :func:`im2col`: scatter-add columns back to an image.

    cols: (N*Ho*Wo, kh*kw*C) -> (N, H, W, C). Loops over the kh*kw kernel
    offsets with strided slice adds (no ``np.add.at``). Offsets whose pixels do
    not overlap any earlier offset are assigned instead of added.
    """
    n, h, w, c = x_shape
    ho = (h - kh) // stride + 1
    wo = (w - kw) // stride + 1
    patches = cols.reshape(n, ho, wo, kh, kw, c)
    dx = np.zeros(x_shape, dtype=cols.dtype)
    for dy in range(kh):
        for dxo in range(kw):
            target = dx[:, dy : dy + stride * (ho - 1) + 1 : stride, dxo : dxo + stride * (wo - 1) + 1 : stride, :]
            # With stride >= kernel offset spacing, offsets (dy, dx) with dy < stride and
            # dx < stride touch pixels no other such offset touches: plain assignment.
            if dy < stride and dxo < stride:
                target[...] = patches[:, :, :, dy, dxo, :]
            else:
                target += patches[:, :, :, dy, dxo, :]
    return dx


def conv_input_grad(
    grad_out: np.ndarray, kernel: np.ndarray, x_shape: tuple, stride: int, out: np.ndarray | None = None
) -> np.ndarray:
    """dL/dx of a valid convolution: the fused equivalent of ``col2im(grad @ W_mat.T)``.

    grad_out: (N, Ho, Wo, C_out), kernel: (kh, kw, C_in, C_out) -> (N, H, W, C_in).
    Still one loop over the kh*kw kernel offsets, but organised for memory
    speed: one GEMM per offset gives its contribution as a contiguous
    (N, Ho, Wo, C_in) block, and the blocks are added into ``stride**2``
    contiguous "phase planes" (pixels with the same (row % stride, col % stride)),
    so every slice add runs over whole rows (Wo*C_in floats) instead of
    C_in-float runs; the planes are interleaved into NHWC once at the end.
    """
    n, ho, wo, cout = grad_out.shape
    kh, kw, cin, _ = kernel.shape
    _, h, w, _ = x_shape
    s = stride
    g = grad_out.reshape(-1, cout)
    # (kh*kw, Cout, Cin): per-offset transposed kernels; -> (kh*kw, M, Cin), one GEMM (in row blocks) per offset
    kernel_t = np.ascontiguousarray(kernel.reshape(kh * kw, cin, cout).transpose(0, 2, 1))
    blocks = np.empty((kh * kw, g.shape[0], cin), np.result_type(g.dtype, kernel.dtype))
    for offset in range(kh * kw):
        matmul_rows(g, kernel_t[offset], out=blocks[offset])
    hp = (kh - 1) // s + ho  # plane size: enough for the furthest offset
    wp = (kw - 1) // s + wo
    planes = {}
    for dy in range(kh):
        for dxo in range(kw):
            block = blocks[dy * kw + dxo].reshape(n, ho, wo, cin)
            key = (dy % s, dxo % s)
            qy, qx = dy // s, dxo // s
            plane = planes.get(key)
            if plane is None:  # first offset of this phase: assign (no zero fill + add), zero only the rest
                plane = planes[key] = np.empty((n, hp, wp, cin), dtype=blocks.dtype)
                plane[:, :qy] = 0
                plane[:, qy + ho :] = 0
                plane[:, qy : qy + ho, :qx] = 0
                plane[:, qy : qy + ho, qx + wo :] = 0
                plane[:, qy : qy + ho, qx : qx + wo, :] = block
            else:
                plane[:, qy : qy + ho, qx : qx + wo, :] += block
    if s == 1:
        dx = planes[(0, 0)]
        dx = dx if (hp, wp) == (h, w) else _crop_or_pad(dx, h, w)
    elif out is not None and (hp * s, wp * s) == (h, w):  # interleave straight into ``out``
        full = out.reshape(n, hp, s, wp, s, cin)
        for ry in range(s):
            for rx in range(s):
                plane = planes.get((ry, rx))
                if plane is None:  # a phase no kernel offset reaches (stride > kernel)
                    full[:, :, ry, :, rx, :] = 0
                else:
                    full[:, :, ry, :, rx, :] = plane
        return out
    else:
        full = np.zeros((n, hp, s, wp, s, cin), dtype=blocks.dtype)
        for (ry, rx), plane in planes.items():
            full[:, :, ry, :, rx, :] = plane
        dx = _crop_or_pad(full.reshape(n, hp * s, wp * s, cin), h, w)
    if out is None:
        return dx
    out[...] = dx
    return out


def _crop_or_pad(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Crop (or zero-pad) the spatial axes of ``a`` (N, H', W', C) to (h, w); contiguous result."""
    if a.shape[1] == h and a.shape[2] == w:
        return a
    out = np.zeros((a.shape[0], h, w, a.shape[3]), dtype=a.dtype)
    hh, ww = min(h, a.shape[1]), min(w, a.shape[2])
    out[:, :hh, :ww, :] = a[:, :hh, :ww, :]
    return out


def conv2d_reference(
    x: np.ndarray, kernel: np.ndarray, bias=None, stride: int = 1, padding: str = "valid"
) -> np.ndarray:
    """Naive loop convolution (cross-correlation, like Keras) for tests.

    x: (N, H, W, C_in), kernel: (kh, kw, C_in, C_out) -> (N, Ho, Wo, C_out).
    """
    kh, kw, _, cout = kernel.shape
    if padding == "same":
        x, _ = pad_same(x, (kh, kw), stride)
    n, h, w, _ = x.shape
    ho = (h - kh) // stride + 1
    wo = (w - kw) // stride + 1
    out = np.zeros((n, ho, wo, cout), dtype=np.result_type(x, kernel))
    for i in range(ho):
        for j in range(wo):
            patch = x[:, i * stride : i * stride + kh, j * stride : j * stride + kw, :]
            for f in range(cout):
                out[:, i, j, f] = np.sum(patch * kernel[:, :, :, f], axis=(1, 2, 3))
    if bias is not None:
        out += bias
    return out


@functools.lru_cache(maxsize=64)
def _zeros(size: int, dtype: str) -> np.ndarray:
    z = np.zeros(size, dtype)
    z.flags.writeable = False
    return z


def zeros_vector(size: int, dtype) -> np.ndarray:
    """A cached read-only zero vector: ``np.maximum(x, zeros_vector(...))`` is NumPy's fast ReLU
    (against a scalar 0 it takes a broadcast path 2.5x slower); cached so batch-1 inference does not
    allocate it per layer."""
    return _zeros(int(size), np.dtype(dtype).str)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis."""
    z = logits - logits.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def channel_moments(rows: np.ndarray, reps: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Per-channel (count, mean, sum of squared deviations) of a chunk, for :func:`combine_moments`.

    rows: (R, reps*C), the channel vector repeated ``reps`` times along a row (a (N*H, W*C) view of
    NHWC data has reps = W). Two passes over the chunk (it is in cache): the mean, then the centred
    squares, so the result is as exact as a two-pass variance. Returns float64 (C,) vectors.
    """
    c = rows.shape[1] // reps
    count = rows.shape[0] * reps
    sums = np.ones(rows.shape[0], rows.dtype) @ rows  # column sums as a GEMV (fast)
    mean = sums.reshape(reps, c).sum(axis=0, dtype=np.float64) / max(count, 1)
    centred = rows - np.tile(mean.astype(rows.dtype), reps)
    m2 = np.einsum("ij,ij->j", centred, centred).reshape(reps, c).sum(axis=0, dtype=np.float64)
    return count, mean, m2


def combine_moments(parts: list) -> tuple[np.ndarray, np.ndarray]:
    """(mean, biased variance) float64 (C,) of the union of chunks from :func:`channel_moments`.

    Chan et al.'s pairwise update, in list order (deterministic): exact, no E[x^2] - E[x]^2 cancellation.
    """
    count, mean, m2 = parts[0]
    mean, m2 = mean.copy(), m2.copy()
    for n_b, mean_b, m2_b in parts[1:]:
        total = count + n_b
        delta = mean_b - mean
        mean += delta * (n_b / total)
        m2 += m2_b + delta * delta * (count * n_b / total)
        count = total
    return mean, m2 / max(count, 1)
