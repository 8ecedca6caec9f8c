"""VGG16 / ResNet50 figures: parameters, .keras file size and one train step time.

    python benchmarks/bench_keras.py [--size 224] [--batches 8,64] [--steps 5] [--warmup 2]
        [--trainable-layers 20] [--models vgg16,resnet50] [--threads N]

Weights are random (``weights="none"``: no machine of ours downloads the
ImageNet files); timing does not depend on the values. A train step is one
``train_on_batch`` (forward, backward, Adam update) on a random batch at the
report's settings (last 20 layers trainable, Adam 1e-4, class weights);
reported as the median over ``--steps`` after ``--warmup`` untimed steps
(the first includes graph tracing). Thread pools are printed: TensorFlow uses
every visible core unless ``--threads`` is given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from breastcnn.models.spec import DEFAULT_IMAGE_SIZE


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--batches", default="8,64", help="comma-separated batch sizes to time")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--trainable-layers", type=int, default=20)
    parser.add_argument("--models", default="vgg16,resnet50")
    parser.add_argument("--threads", type=int, default=0, help="TF intra-op threads (0: TensorFlow's default)")
    args = parser.parse_args(argv)

    from breastcnn.models.keras_models import BUILDERS, require_keras

    keras = require_keras()
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    gpus = tf.config.list_physical_devices("GPU")
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}; cores visible {affinity}; "
        f"intra-op threads {tf.config.threading.get_intra_op_parallelism_threads() or f'auto ({affinity})'}, "
        f"inter-op {tf.config.threading.get_inter_op_parallelism_threads() or 'auto'}; "
        f"devices: {', '.join(d.name for d in gpus) or 'CPU only'}"
    )
    print(
        f"input {args.size}x{args.size}x3, weights none, last {args.trainable_layers} layers trainable, "
        f"Adam 1e-4; median of {args.steps} steps after {args.warmup} warm-up\n"
    )

    batches = [int(b) for b in args.batches.split(",") if b]
    rng = np.random.default_rng(0)
    for name in [m for m in args.models.split(",") if m]:
        clf = BUILDERS[name](
            input_shape=(args.size, args.size, 3),
            num_classes=2,
            seed=0,
            weights="none",
            trainable_layers=args.trainable_layers,
        )
        params = clf.count_params()
        total = params["trainable"] + params["non_trainable"]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.keras"
            clf.save(path)
            size_kb = path.stat().st_size / 1024
        print(
            f"{name}: params total {total:,} / trainable {params['trainable']:,} "
            f"(non-trainable {params['non_trainable']:,}); model.keras {size_kb:,.0f} KB "
            f"(weights only, no optimizer state)"
        )
        model = clf.model
        model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
        for batch in batches:
            x = rng.normal(0, 60, size=(batch, args.size, args.size, 3)).astype(np.float32)
            y = rng.integers(0, 2, size=batch)
            weights = {0: 1.6, 1: 0.7}
            try:
                for _ in range(args.warmup):
                    model.train_on_batch(x, y, class_weight=weights)
                times = []
                for _ in range(args.steps):
                    start = time.perf_counter()
                    model.train_on_batch(x, y, class_weight=weights)
                    times.append(time.perf_counter() - start)
            except (tf.errors.ResourceExhaustedError, MemoryError) as exc:
                print(f"  batch {batch}: out of memory ({type(exc).__name__})")
                continue
            med = statistics.median(times)
            print(
                f"  batch {batch:3d}: train step median {med:.3f} s (min {min(times):.3f}, max {max(times):.3f}); "
                f"{batch / med:.1f} images/s"
            )
            sys.stdout.flush()
        del model, clf
        keras.backend.clear_session()
    return 0


if __name__ == "__main__":
    sys.exit(main())
