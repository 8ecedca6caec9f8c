"""Batch chunks over engine threads: chunked paths against references, finite differences, and
bit-identical results for any thread count (fixed chunking, partials summed in chunk order)."""

import threading
from itertools import pairwise

import numpy as np
import pytest

from breastcnn.models import create_model
from breastcnn.nn import BatchNorm, Conv2D, MaxPool2D, ReLU
from breastcnn.nn import functional as F
from breastcnn.nn import inference as I
from breastcnn.nn import layers as L
from breastcnn.nn import parallel as P
from tests.nn.gradcheck import check_layer


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Force many chunks (1 image / a few rows each) so that tiny test arrays take the chunked paths."""
    monkeypatch.setattr(L, "chunk_size", lambda bytes_per_sample, budget=0: 1)
    monkeypatch.setattr(I, "chunk_size", lambda bytes_per_sample, budget=0: 1)  # predict's images


def _built(layer, shape, seed=0):
    layer.build(shape, np.random.default_rng(seed))
    return layer


def test_map_chunks_order_threads_and_errors():
    seen = set()

    def fn(a, b):
        seen.add(threading.get_ident())
        return (a, b)

    with P.engine_threads(2):
        assert P.current_threads() == 2
        # 10 items in chunks of at most 3: four near-equal parts (an even count, for two threads)
        assert P.map_chunks(fn, 10, 3) == [(0, 2), (2, 5), (5, 7), (7, 10)]
        assert P.map_chunks(fn, 32, 5) == [(i, i + 4) for i in range(0, 32, 4)]
    assert P.current_threads() == 1
    assert P.map_chunks(fn, 2, 5) == [(0, 2)]

    def boom(a, b):
        if a == 3:
            raise ValueError("chunk 3 failed")

    with P.engine_threads(2), pytest.raises(ValueError, match="chunk 3 failed"):
        P.map_chunks(boom, 8, 1)
    with P.engine_threads(0):
        assert P.current_threads() == P.resolve_jobs(0)


@pytest.mark.parametrize("n, chunk", [(1, 1), (2, 1), (7, 3), (32, 3), (32, 5), (33, 4), (5, 100)])
def test_chunk_ranges_cover_everything_in_even_balanced_parts(n, chunk):
    ranges = P.chunk_ranges(n, chunk)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(b == c for (_, b), (c, _) in pairwise(ranges))  # contiguous, in order
    sizes = [b - a for a, b in ranges]
    assert max(sizes) <= chunk and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert len(ranges) % 2 == 0 or len(ranges) == n


def test_chunk_size_depends_on_shape_only():
    assert P.chunk_size(1 << 20) == 4
    assert P.chunk_size(1 << 30) == 1
    with P.engine_threads(2):
        assert P.chunk_size(1 << 20) == 4


@pytest.mark.parametrize("k,s", [(3, 4), (4, 4), (3, 2), (2, 3)])
def test_im2col_into_a_buffer_matches_reference(k, s):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 17, 18, 3))
    w = rng.normal(size=(k, k, 3, 4))
    buf = np.full(
        (3 * F.conv_output_size(17, k, s, "valid") * F.conv_output_size(18, k, s, "valid"), k * k * 3), np.nan
    )
    cols = F.im2col(x, k, k, s, out=buf)
    assert cols is buf
    ref = F.conv2d_reference(x, w, None, s)
    np.testing.assert_allclose((cols @ w.reshape(-1, 4)).reshape(ref.shape), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "shape,k,s", [((2, 13, 12, 3), 3, 4), ((2, 16, 16, 3), 4, 4), ((2, 11, 10, 3), 3, 2), ((2, 12, 13, 3), 2, 3)]
)
def test_conv_input_grad_into_out_equals_col2im(shape, k, s):
    # stride > kernel leaves some phases untouched: they must come back as zeros, not garbage
    rng = np.random.default_rng(3)
    n, h, w, c = shape
    g = rng.normal(size=(n, (h - k) // s + 1, (w - k) // s + 1, 5))
    kernel = rng.normal(size=(k, k, c, 5))
    expected = F.col2im(g.reshape(-1, 5) @ kernel.reshape(-1, 5).T, shape, k, k, s)
    out = np.full(shape, np.nan)
    assert F.conv_input_grad(g, kernel, shape, s, out=out) is out
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kernel,strides,padding", [(3, 4, "valid"), (4, 4, "valid"), (3, 2, "valid"), (3, 1, "same")])
def test_chunked_conv2d_gradients(tiny_chunks, threads, kernel, strides, padding):
    rng = np.random.default_rng(kernel * 10 + strides)
    layer = _built(Conv2D(4, kernel, strides, padding), (13, 12, 3))
    layer.params["b"] = rng.normal(size=4).astype(np.float32)
    with P.engine_threads(threads):
        check_layer(layer, rng.normal(size=(3, 13, 12, 3)), rng)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("training", [True, False])
def test_chunked_batchnorm_relu_maxpool_gradients(tiny_chunks, threads, training):
    rng = np.random.default_rng(4)
    bn = _built(BatchNorm(), (6, 8, 5))
    bn.params["gamma"] = rng.uniform(0.5, 1.5, 5).astype(np.float32)
    bn.params["beta"] = rng.normal(size=5).astype(np.float32)
    bn.state["moving_variance"] = rng.uniform(0.5, 2, 5).astype(np.float32)
    with P.engine_threads(threads):
        # 3*6*8*5 = 720 values: tiled over W, one row per chunk
        check_layer(bn, 3 + 2 * rng.normal(size=(3, 6, 8, 5)), rng, training=training)
        check_layer(_built(MaxPool2D(2), (7, 8, 3)), rng.normal(size=(3, 7, 8, 3)), rng)


def test_chunked_relu_on_large_input_matches_plain(tiny_chunks):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 64, 64, 4)).astype(np.float32)  # above the small-array shortcut
    g = rng.normal(size=x.shape).astype(np.float32)
    relu = ReLU()
    with P.engine_threads(2):
        out = relu.forward(x)
        dx = relu.backward(g)
    np.testing.assert_array_equal(out, np.maximum(x, 0))
    np.testing.assert_array_equal(dx, g * (x > 0))


def test_batchnorm_large_input_matches_two_pass_reference():
    rng = np.random.default_rng(6)
    x = (20 + 3 * rng.normal(size=(4, 20, 24, 8))).astype(np.float32)  # large enough to take the tiled path
    bn = _built(BatchNorm(), (20, 24, 8))
    out = bn.forward(x, training=True)
    flat = x.reshape(-1, 8).astype(np.float64)
    ref = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + bn.epsilon)
    np.testing.assert_allclose(out.reshape(-1, 8), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.state["moving_mean"], 0.1 * flat.mean(0), rtol=1e-5)


def _train(threads, steps=2):
    model = create_model("custom", input_shape=(64, 64, 3), seed=5)
    model.compile(l2=0.01)
    model.threads = threads
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        x = rng.normal(0, 30, size=(6, 64, 64, 3)).astype(np.float32)
        losses.append(model.train_on_batch(x, rng.integers(0, 2, size=6)))
    return model.get_weights(), losses


@pytest.mark.parametrize("chunked", [False, True])
def test_training_is_bit_identical_for_any_thread_count(monkeypatch, chunked):
    if chunked:
        monkeypatch.setattr(L, "chunk_size", lambda bytes_per_sample, budget=0: 2)
    w1, l1 = _train(1)
    w2, l2 = _train(2)
    w1b, _ = _train(1)
    assert l1 == l2
    for key in w1:
        np.testing.assert_array_equal(w1[key], w2[key], err_msg=key)
        np.testing.assert_array_equal(w1[key], w1b[key], err_msg=key)


def _gradients(threads):
    model = create_model("custom", input_shape=(64, 64, 3), seed=5)
    model.compile(l2=0.01)
    model.threads = threads
    rng = np.random.default_rng(0)
    x = rng.normal(0, 30, size=(6, 64, 64, 3)).astype(np.float32)
    loss = model.compute_gradients(x, rng.integers(0, 2, size=6))
    return loss, {k: v.copy() for k, v in model.gradients().items()}


def test_chunked_gradients_match_unchunked(monkeypatch):
    # only the summation order differs (float32 round-off); the conv biases before a BN have
    # gradients that are 0 up to round-off, hence the tolerance relative to each array's scale
    loss_plain, g_plain = _gradients(1)
    monkeypatch.setattr(L, "chunk_size", lambda bytes_per_sample, budget=0: 1)
    monkeypatch.setattr(I, "chunk_size", lambda bytes_per_sample, budget=0: 1)  # predict's images
    loss_chunk, g_chunk = _gradients(2)
    assert loss_chunk == pytest.approx(loss_plain, rel=1e-5)
    for key, ref in g_plain.items():
        scale = max(float(np.abs(ref).max()), 1e-2)
        np.testing.assert_allclose(g_chunk[key], ref, rtol=1e-3, atol=1e-4 * scale, err_msg=key)


def test_predict_with_engine_threads_matches_one_thread():
    model = create_model("custom", input_shape=(64, 64, 3), seed=1)
    x = np.random.default_rng(2).normal(0, 30, size=(9, 64, 64, 3)).astype(np.float32)
    model.threads = 1
    p1 = model.predict(x, batch_size=9)
    model.threads = 2
    np.testing.assert_array_equal(model.predict(x, batch_size=9), p1)


def test_conv_batch_in_one_chunk_is_split_in_two_deterministically():
    # third conv of the custom model at batch 32: the batch fits one cache chunk but is cut in two
    conv = _built(Conv2D(64, 3, strides=2), (13, 13, 32))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 13, 13, 32)).astype(np.float32)
    g = rng.normal(size=(32, 6, 6, 64)).astype(np.float32)
    assert conv._chunk(x.shape, np.float32) == 16
    assert conv._chunk((4, 13, 13, 32), np.float32) >= 4  # small batch: one chunk
    results = []
    for threads in (1, 2, 1):
        with P.engine_threads(threads):
            out = conv.forward(x, training=True)
            dx = conv.backward(g)
        results.append((out, dx, conv.grads["W"].copy(), conv.grads["b"].copy()))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(
        results[0][0], F.conv2d_reference(x, conv.params["W"], conv.params["b"], 2), rtol=1e-4, atol=1e-4
    )
    with P.engine_threads(2):  # float64: twice the bytes, still split; finite differences
        conv64 = _built(Conv2D(64, 3, strides=2), (13, 13, 32))
        assert conv64._chunk((20, 13, 13, 32), np.float64) == 10
        check_layer(conv64, x[:20], rng, count=10)


def test_blas_threads_limits_and_restores():
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    if not blas():
        pytest.skip("no BLAS library visible to threadpoolctl")
    with threadpool_limits(2, user_api="blas"):
        with P.blas_threads(1):
            assert blas() == [1] * len(blas())
            with P.blas_threads(1):  # already there: nothing to change or restore
                assert set(blas()) == {1}
            assert set(blas()) == {1}
            with P.blas_threads(None):
                assert set(blas()) == {1}
        assert set(blas()) == {2}
        with pytest.raises(RuntimeError):  # restored on errors too
            with P.blas_threads(1):
                raise RuntimeError("boom")
        assert set(blas()) == {2}


def test_batch_one_inference_skips_chunking_but_matches_batches():
    model = create_model("custom", input_shape=(64, 64, 3), seed=0)
    x = np.random.default_rng(0).normal(size=(3, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x, batch_size=1), model.predict(x, batch_size=3), rtol=1e-5, atol=1e-7)


# -- thread settings: an instance setting of each model, observed through the engine's own bookkeeping --------------


def test_observe_chunks_records_the_threads_map_chunks_ran_on():
    with P.observe_chunks() as log:
        P.map_chunks(lambda a, b: None, 3, 5)  # one chunk: no bookkeeping, nothing to record
        assert (log.calls, log.max_threads) == (0, 0)
        with P.engine_threads(1):
            P.map_chunks(lambda a, b: None, 8, 2)
        assert (log.calls, log.max_threads) == (1, 1)
        with P.engine_threads(2):
            P.map_chunks(lambda a, b: None, 8, 2)
            P.map_chunks(lambda a, b: None, 8, 8)
        assert (log.calls, log.max_threads) == (2, 2)
    P.map_chunks(lambda a, b: None, 8, 2)  # outside the block: not recorded
    assert log.calls == 2


def test_threads_are_a_setting_of_each_model(tiny_chunks):
    from breastcnn.nn import Sequential

    assert "threads" not in vars(Sequential) and "blas_threads" not in vars(Sequential)
    one = create_model("custom", input_shape=(64, 64, 3), seed=0)
    two = create_model("custom", input_shape=(64, 64, 3), seed=0)
    assert one.threads is None  # default: all available cores
    assert one.thread_settings() == {"engine": P.available_cores(), "blas": 1}
    one.threads, two.threads = 1, 2
    assert one.thread_settings()["engine"] == 1 and two.thread_settings()["engine"] == 2
    assert P.current_threads() == 1  # the caller's own setting is untouched
    x = np.random.default_rng(0).normal(0, 30, size=(4, 64, 64, 3)).astype(np.float32)
    y = np.array([0, 1, 0, 1])
    for model, expected in ((one, 1), (two, 2)):
        with P.observe_chunks() as log:
            model.predict(x, batch_size=4)
            model.train_on_batch(x, y)
        assert log.calls > 0 and log.max_threads == expected
    with two.using_threads(1), P.observe_chunks() as log:
        two.predict(x, batch_size=4)
    assert log.max_threads == 1 and two.threads == 2  # restored after the block
    with P.observe_chunks() as log:
        two.predict(x, batch_size=2, jobs=2)  # joblib shards: one engine thread each
    assert log.calls > 0 and log.max_threads == 1
    np.testing.assert_array_equal(one.predict(x), two.predict(x))  # the setting never changes the values


def test_available_cores_is_the_default_everywhere():
    assert P.resolve_jobs(None) == P.resolve_jobs(0) == P.resolve_jobs(-1) == P.available_cores() >= 1
    assert P.resolve_jobs(3) == 3
