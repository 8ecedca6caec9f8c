"""Real data: scikit-learn's 8x8 handwritten digits, a small conv net from our layers."""

import time

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from breastcnn.nn import Adam, BatchNorm, Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential, Softmax, blas_threads


@pytest.mark.slow  # trains to 90% (0.9 s)
def test_small_convnet_learns_digits():
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]  # (1797, 8, 8, 1)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    model = Sequential(
        [
            Conv2D(16, 3, padding="same", kernel_initializer="he_normal"),
            BatchNorm(),
            ReLU(),
            Conv2D(32, 3, padding="same", kernel_initializer="he_normal"),
            BatchNorm(),
            ReLU(),
            MaxPool2D(2),
            Flatten(),
            Dense(64, kernel_initializer="he_normal"),
            ReLU(),
            Dense(10),
            Softmax(),
        ],
        input_shape=(8, 8, 1),
        seed=0,
    )
    model.compile(optimizer=Adam(3e-3))
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    with blas_threads(1):  # tiny GEMMs: BLAS threads only add overhead (and spin on a busy CI machine)
        for _ in range(8):
            order = rng.permutation(len(x_train))
            for s in range(0, len(order), 32):
                idx = order[s : s + 32]
                model.train_on_batch(x_train[idx], y_train[idx])
    elapsed = time.perf_counter() - start
    accuracy = float(np.mean(model.predict(x_test).argmax(1) == y_test))
    assert accuracy >= 0.97, accuracy
    assert elapsed < 60
