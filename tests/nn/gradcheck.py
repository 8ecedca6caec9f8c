"""Finite-difference helpers (float64 central differences on a few sampled entries)."""

from __future__ import annotations

import numpy as np


def sample_indices(shape, rng, count=25):
    size = int(np.prod(shape))
    flat = rng.choice(size, size=min(count, size), replace=False)
    return [np.unravel_index(i, shape) for i in flat]


def numeric_grad(f, array, indices, eps=1e-6):
    """d f() / d array[idx] for each idx, by central differences (array perturbed in place)."""
    out = []
    for idx in indices:
        old = array[idx]
        array[idx] = old + eps
        plus = f()
        array[idx] = old - eps
        minus = f()
        array[idx] = old
        out.append((plus - minus) / (2 * eps))
    return np.array(out)


def assert_close_grads(analytic, numeric, rtol=1e-5, atol=1e-7, what=""):
    analytic = np.asarray(analytic, np.float64)
    numeric = np.asarray(numeric, np.float64)
    err = np.abs(analytic - numeric)
    tol = atol + rtol * np.maximum(np.abs(analytic), np.abs(numeric))
    assert np.all(err <= tol), f"{what}: max abs error {err.max():.3g}\nanalytic {analytic}\nnumeric {numeric}"


def check_layer(layer, x, rng, training=True, count=25, rtol=1e-5, atol=1e-7, fix=None):
    """Check dL/dx and dL/dparams of ``layer`` for L = sum(forward(x) * R), float64."""
    x = x.astype(np.float64)
    layer.astype(np.float64)
    out = layer.forward(x, training=training)
    proj = rng.normal(size=out.shape)

    def loss():
        if fix is not None:
            fix()
        return float(np.sum(layer.forward(x, training=training, cache=False) * proj))

    if fix is not None:
        fix()
    layer.forward(x, training=training)
    dx = layer.backward(proj)
    idx = sample_indices(x.shape, rng, count)
    assert_close_grads([dx[i] for i in idx], numeric_grad(loss, x, idx), rtol, atol, "dL/dx")
    for key, p in layer.params.items():
        idx = sample_indices(p.shape, rng, count)
        assert_close_grads([layer.grads[key][i] for i in idx], numeric_grad(loss, p, idx), rtol, atol, f"dL/d{key}")
    return dx
