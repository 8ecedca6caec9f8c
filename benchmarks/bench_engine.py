"""NumPy engine vs Keras on the report's custom CNN, in one process.

Prints medians after warm-up, with thread counts:
- train step (forward + backward + Adam, L2 on) at batch 32 on 224x224x3:
  NumPy ``train_on_batch`` vs Keras compiled ``tf.function`` train step (not fit);
- batch-1 inference: NumPy ``predict`` vs Keras compiled ``tf.function`` call (not predict);
- large-batch prediction with and without joblib sharding (``predict(jobs=N)``);
- per-layer forward/backward times of the NumPy train step (``--profile``).

Usage: python benchmarks/bench_engine.py [--repeats 20] [--no-keras] [--profile]
Timings on a shared machine are noisy: compare the ratios from the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from breastcnn.models import create_model
from breastcnn.nn import Adam
from breastcnn.nn.parallel import blas_thread_count, resolve_jobs

BATCH = 32
SHAPE = (224, 224, 3)
L2 = 0.1


def interleaved_ms(fns: dict, repeats: int, warmup: int = 3) -> dict:
    """Median ms of each callable, timed alternately (fair under a fluctuating machine load)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 50.0, size=(n, *SHAPE)).astype(np.float32)  # caffe-preprocessed scale
    y = (np.arange(n) % 2).astype(np.int64)
    return x, y


def profile_layers(model, x, y, repeats: int) -> list[tuple[str, float, float]]:
    """Median forward / backward ms per layer within a training step."""
    fwd = {i: [] for i in range(len(model.layers))}
    bwd = {i: [] for i in range(len(model.layers))}
    last = model.logits_index
    for r in range(repeats + 2):
        h = x
        for i, layer in enumerate(model.layers[: last + 1]):
            t = time.perf_counter()
            h = layer.forward(h, training=True)
            fwd[i].append(time.perf_counter() - t)
        _, g = model.loss(h, y)
        for i in range(last, -1, -1):
            t = time.perf_counter()
            g = model.layers[i].backward(g, need_input_grad=i > 0)
            bwd[i].append(time.perf_counter() - t)
    rows = []
    for i, layer in enumerate(model.layers[: last + 1]):
        rows.append((layer.name, statistics.median(fwd[i][2:]) * 1e3, statistics.median(bwd[i][2:]) * 1e3))
    return rows


def keras_side(model, x, y, x1, repeats: int) -> dict:
    """Compiled Keras train step and batch-1 inference callables for the same model and weights."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from breastcnn.models.convert import to_keras

    kmodel = to_keras(model, l2=L2)
    optimizer = keras.optimizers.Adam(1e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    xt, yt, x1t = tf.constant(x), tf.constant(y), tf.constant(x1)

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            probs = kmodel(xb, training=True)
            loss = loss_fn(yb, probs) + tf.add_n(kmodel.losses)
        grads = tape.gradient(loss, kmodel.trainable_variables)
        optimizer.apply_gradients(zip(grads, kmodel.trainable_variables))
        return loss

    @tf.function
    def infer(xb):
        return kmodel(xb, training=False)

    return {
        "train": lambda: float(train_step(xt, yt)),
        "infer1": lambda: infer(x1t).numpy(),
        "threads": f"intra_op={tf.config.threading.get_intra_op_parallelism_threads() or 'default(all cores)'}, "
                   f"inter_op={tf.config.threading.get_inter_op_parallelism_threads() or 'default'}",
        "versions": f"tensorflow {tf.__version__}, keras {keras.__version__}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-keras", action="store_true")
    parser.add_argument("--profile", action="store_true", help="per-layer NumPy times")
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="Sequential.blas_threads for the NumPy model (0: process default, all cores)")
    parser.add_argument("--predict-batch", type=int, default=256, help="images for the sharding comparison")
    args = parser.parse_args()
    args.blas_threads = args.blas_threads or None
    run(args)


def run(args) -> None:

    x, y = data(BATCH)
    x1 = x[:1].copy()
    model = create_model("custom", input_shape=SHAPE, seed=0)
    model.compile(optimizer=Adam(1e-3), l2=L2)
    print(f"cores: {os.cpu_count()}, NumPy {np.__version__}, BLAS threads (threadpoolctl): {blas_thread_count()}")

    model.blas_threads = args.blas_threads  # None: the process default (all cores)
    print(f"numpy model.blas_threads = {model.blas_threads} (None = process default)")
    np_train_fn = lambda: model.train_on_batch(x, y)  # noqa: E731
    np_infer_fn = lambda: model.predict(x1, batch_size=1)  # noqa: E731
    k = None if args.no_keras else keras_side(model, x, y, x1, args.repeats)
    if k is None:
        np_train = median_ms(np_train_fn, args.repeats)
        np_infer = median_ms(np_infer_fn, args.repeats * 10, warmup=20)
    else:  # numpy and keras alternate, so that both see the same load
        train = interleaved_ms({"numpy": np_train_fn, "keras": k["train"]}, args.repeats)
        infer = interleaved_ms({"numpy": np_infer_fn, "keras": k["infer1"]}, args.repeats * 10, warmup=20)
        np_train, np_infer = train["numpy"], infer["numpy"]
    print(f"numpy train step  (batch {BATCH}, 224x224x3): {np_train:8.2f} ms")
    print(f"numpy inference   (batch 1):                {np_infer:8.3f} ms")
    if k is not None:
        print(f"keras ({k['versions']}; {k['threads']})")
        print(f"keras train step  (compiled tf.function):   {train['keras']:8.2f} ms")
        print(f"keras inference   (compiled tf.function):   {infer['keras']:8.3f} ms")
        print(f"ratio train numpy/keras: {np_train / train['keras']:.2f} (target <= 1.0)")
        print(f"ratio infer numpy/keras: {np_infer / infer['keras']:.2f} (target <= 0.5)")

    if args.profile:
        print("per-layer median ms within a train step (forward / backward):")
        for name, f, b in profile_layers(model, x, y, max(args.repeats // 2, 3)):
            print(f"  {name:<16} {f:7.2f} {b:7.2f}")

    # joblib sharding vs plain BLAS threading on a large prediction batch
    xb, _ = data(args.predict_batch, seed=1)
    jobs = resolve_jobs(-1)
    reps = max(args.repeats // 4, 3)
    threads = model.blas_threads or blas_thread_count()
    plain = median_ms(lambda: model.predict(xb, batch_size=64, jobs=1), reps, warmup=1)
    sharded = median_ms(lambda: model.predict(xb, batch_size=64, jobs=jobs), reps, warmup=1)
    print(f"predict {args.predict_batch} images, batch 64: jobs=1 with BLAS {threads} thread(s) {plain:.1f} ms; "
          f"jobs={jobs} (joblib threads, BLAS 1 thread each) {sharded:.1f} ms; sharded/plain = {sharded / plain:.2f}")

if __name__ == "__main__":
    main()
