"""NumPy engine vs Keras on the report's custom CNN, in one process.

Prints medians after warm-up, with thread counts:
- train step (forward + backward + Adam, L2 on) at batch 32 on 224x224x3:
  NumPy ``train_on_batch`` vs Keras compiled ``tf.function`` train step (not fit),
  for the NumPy thread settings given by ``--threads`` (engine threads, BLAS at
  ``--blas-threads``), all timed alternately with Keras in the same loop;
- batch-1 inference: NumPy ``predict`` vs Keras compiled ``tf.function`` call (not predict);
- large-batch prediction with and without joblib sharding (``predict(jobs=N)``);
- per-step forward/backward times of the NumPy train step (``--profile``; steps = fused layers);
- NumPy ``predict`` vs ONNX Runtime on the same weights (``--onnx``, the ``breastcnn[onnx]`` extra) at
  batch 1 and batch 32, ONNX Runtime intra-op threads = engine threads, for each ``--threads`` value.

Usage: python benchmarks/bench_engine.py [--repeats 20] [--no-keras] [--profile] [--threads 0,1]
       [--blas-threads 1] [--blas2] [--onnx]
Timings on a shared machine are noisy: compare the ratios from the same run.
``--blas2`` adds threads=1 with 2 OpenBLAS threads as a separate (not interleaved)
measurement: spinning OpenBLAS threads would slow whatever runs right after them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from breastcnn.models import create_model
from breastcnn.models.spec import DEFAULT_INPUT_SHAPE
from breastcnn.nn import Adam
from breastcnn.nn.parallel import blas_thread_count, resolve_jobs

BATCH = 32
SHAPE = DEFAULT_INPUT_SHAPE
L2 = 0.1


def interleaved_ms(fns: dict, repeats: int, warmup: int = 3, block: int = 1, settle: int = 0) -> dict:
    """Median ms of each callable, timed in alternation (fair under a fluctuating machine load).

    Every round runs each callable (order shuffled per round, fixed seed) for ``settle`` untimed
    calls and then ``block`` timed ones. ``settle`` keeps one contestant from paying for the
    other: TensorFlow's Eigen threads keep spinning for a while after a Keras call, and on two
    cores whatever runs right then gets about half the machine (NumPy's train step measured
    +10-40% and its batch-1 inference +60-90% when timed right after a Keras call).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    order = list(fns)
    rng = np.random.default_rng(0)
    for _ in range(max(repeats // block, 1)):
        for name in rng.permutation(order):
            fn = fns[name]
            for _ in range(settle):
                fn()
            for _ in range(block):
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


def profile_steps(model, x, y, repeats: int) -> list[tuple[str, float, float]]:
    """Median forward / backward ms per step (``model.steps``: fused layers) within real ``train_on_batch`` steps.

    Each step's forward and backward are timed where Sequential calls them. Work a step leaves pending
    (a BatchNorm's normalisation, its input gradient) runs in the next step's chunks and counts there.
    """
    steps = model._steps(0, model.logits_index + 1)  # the plan that compute_gradients runs
    times = {(k, d): [] for k in range(len(steps)) for d in ("forward", "backward")}
    for k, step in enumerate(steps):
        for direction in ("forward", "backward"):
            original = getattr(step, direction)

            def timed(*args, _f=original, _key=(k, direction), **kwargs):
                start = time.perf_counter()
                result = _f(*args, **kwargs)
                times[_key].append(time.perf_counter() - start)
                return result

            setattr(step, direction, timed)
    try:
        for _ in range(repeats + 2):
            model.train_on_batch(x, y)
    finally:
        for step in steps:
            del step.forward, step.backward  # back to the class methods

    def median_ms(k: int, direction: str) -> float:  # the first two steps warm up
        return statistics.median(times[(k, direction)][2:]) * 1e3

    return [(repr(step), median_ms(k, "forward"), median_ms(k, "backward")) for k, step in enumerate(steps)]


def keras_side(model, x, y, x1, repeats: int, keras_threads: int = 0) -> dict:
    """Compiled Keras train step and batch-1 inference callables for the same model and weights."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from breastcnn.models.convert import to_keras

    if keras_threads:  # before TensorFlow runs anything
        tf.config.threading.set_intra_op_parallelism_threads(keras_threads)
        tf.config.threading.set_inter_op_parallelism_threads(keras_threads)

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
        optimizer.apply_gradients(zip(grads, kmodel.trainable_variables, strict=True))
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
    parser.add_argument("--profile", action="store_true", help="per-step NumPy times (train step)")
    parser.add_argument(
        "--threads",
        default="0,1",
        help="comma-separated Sequential.threads values to compare (0: all cores); the first "
        "one is used for the inference, profile and prediction figures",
    )
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=1,
        help="Sequential.blas_threads for the NumPy model (0: process default, all cores)",
    )
    parser.add_argument(
        "--blas2", action="store_true", help="also time threads=1 with 2 BLAS threads (separately, after the rest)"
    )
    parser.add_argument(
        "--settle",
        type=int,
        default=1,
        help="untimed calls before each timed block (train: blocks of 2 steps, inference: 10 "
        "calls after 5x as many untimed); 0: alternate call by call, every call timed",
    )
    parser.add_argument(
        "--keras-threads",
        type=int,
        default=0,
        help="TensorFlow intra/inter-op threads (0: its default, all cores); with --threads 1 "
        "this compares the two engines per core",
    )
    parser.add_argument("--predict-batch", type=int, default=256, help="images for the sharding comparison")
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also time ONNX Runtime on the same weights (batch 1 and 32, per --threads value)",
    )
    args = parser.parse_args()
    args.blas_threads = args.blas_threads or None
    args.threads = [int(t) for t in args.threads.split(",")]
    run(args)


def _label(threads: int, blas) -> str:
    return f"numpy threads={resolve_jobs(threads)} blas={blas or blas_thread_count()}"


def run(args) -> None:
    x, y = data(BATCH)
    x1 = x[:1].copy()
    model = create_model("custom", input_shape=SHAPE, seed=0)
    model.compile(optimizer=Adam(1e-3), l2=L2)
    print(f"cores: {os.cpu_count()}, NumPy {np.__version__}, BLAS threads (threadpoolctl): {blas_thread_count()}")
    model.blas_threads = args.blas_threads  # None: the process default (all cores)

    def train_fn(threads, blas):
        def step():
            model.threads, model.blas_threads = threads, blas
            return model.train_on_batch(x, y)

        return step

    np_fns = {_label(t, args.blas_threads): train_fn(t, args.blas_threads) for t in args.threads}
    main_label = next(iter(np_fns))
    model.threads = args.threads[0]
    np_infer_fn = lambda: model.predict(x1, batch_size=1)  # noqa: E731
    k = None if args.no_keras else keras_side(model, x, y, x1, args.repeats, args.keras_threads)
    # numpy settings and keras alternate, so that all see the same load
    settle = args.settle
    train = interleaved_ms(
        {**np_fns, **({} if k is None else {"keras": k["train"]})},
        args.repeats,
        block=2 if settle else 1,
        settle=settle,
    )
    model.threads = args.threads[0]
    infer = interleaved_ms(
        {"numpy": np_infer_fn, **({} if k is None else {"keras": k["infer1"]})},
        args.repeats * 10,
        warmup=20,
        block=10 if settle else 1,
        settle=5 * settle,
    )
    if args.blas2:  # after the rest: spinning OpenBLAS threads would slow the next timed call
        train[_label(1, 2) + " (timed alone)"] = median_ms(train_fn(1, 2), args.repeats)
        model.threads, model.blas_threads = args.threads[0], args.blas_threads
    if k is not None:
        print(f"keras ({k['versions']}; {k['threads']})")
    print(f"train step, batch {BATCH}, 224x224x3, median ms after warm-up:")
    for name, ms in train.items():
        ratio = f"   ratio numpy/keras {ms / train['keras']:.2f} (target <= 1.0)" if k and name != "keras" else ""
        print(f"  {name:<44} {ms:8.2f}{ratio}")
    print(f"batch-1 inference ({main_label}), median ms:")
    print(f"  numpy {infer['numpy']:8.3f}")
    if k is not None:
        print(
            f"  keras {infer['keras']:8.3f}   ratio numpy/keras {infer['numpy'] / infer['keras']:.2f} (target <= 0.5)"
        )

    if args.profile:
        print(f"per-step median ms within a train step (forward / backward), {main_label}:")
        for name, f, b in profile_steps(model, x, y, max(args.repeats // 2, 3)):
            print(f"  {name:<48} {f:7.2f} {b:7.2f}")

    # joblib sharding vs engine threads on a large prediction batch
    xb, _ = data(args.predict_batch, seed=1)
    jobs = resolve_jobs(-1)
    reps = max(args.repeats // 4, 3)
    plain = median_ms(lambda: model.predict(xb, batch_size=64, jobs=1), reps, warmup=1)
    sharded = median_ms(lambda: model.predict(xb, batch_size=64, jobs=jobs), reps, warmup=1)
    print(
        f"predict {args.predict_batch} images, batch 64: jobs=1 ({main_label}) {plain:.1f} ms; "
        f"jobs={jobs} (joblib threads, 1 engine + 1 BLAS thread each) {sharded:.1f} ms; "
        f"sharded/plain = {sharded / plain:.2f}"
    )
    if args.onnx:
        onnx_vs_numpy(model, x, x1, args)


def onnx_vs_numpy(model, x, x1, args) -> None:
    """NumPy ``predict`` vs ONNX Runtime (the same weights, exported with BatchNorm folded), timed alternately,
    at batch 1 and batch ``BATCH``, for each ``--threads`` value (ONNX Runtime intra-op threads = engine threads,
    NumPy BLAS at ``--blas-threads``)."""
    import tempfile
    from pathlib import Path

    import onnxruntime

    from breastcnn.models.onnx_export import export_onnx
    from breastcnn.models.onnx_runtime import load_onnx_model

    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, Path(tmp) / "custom.onnx")
        ort_model = load_onnx_model(Path(tmp) / "custom.onnx")  # the session keeps the bytes
    settle = args.settle
    print(
        f"NumPy predict vs ONNX Runtime {onnxruntime.__version__} (same weights), median ms "
        f"(targets numpy/onnx <= 1.5 at batch 1, <= 1.2 at batch {BATCH}):"
    )
    for threads in args.threads:
        n = resolve_jobs(threads)
        model.threads, model.blas_threads = n, args.blas_threads
        ort_model.set_threads(n, 1)
        b1 = interleaved_ms(
            {"numpy": lambda: model.predict(x1, batch_size=1), "onnx": lambda: ort_model.predict(x1, batch_size=1)},
            args.repeats * 10,
            warmup=20,
            block=10 if settle else 1,
            settle=5 * settle,
        )
        bn = interleaved_ms(
            {
                "numpy": lambda: model.predict(x, batch_size=BATCH),
                "onnx": lambda: ort_model.predict(x, batch_size=BATCH),
            },
            args.repeats,
            block=2 if settle else 1,
            settle=settle,
        )
        for label, t in ((1, b1), (BATCH, bn)):
            print(
                f"  {n} thread(s), batch {label:>2}: numpy {t['numpy']:8.3f}  onnx {t['onnx']:8.3f}  "
                f"ratio numpy/onnx {t['numpy'] / t['onnx']:.2f}"
            )


if __name__ == "__main__":
    main()
