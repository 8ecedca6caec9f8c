"""Loss functions computed from logits.

``WeightedSoftmaxCrossEntropy`` fuses softmax and cross-entropy (stable
log-sum-exp) and applies per-class weights both to the loss and to its
gradient (the report's code computed class weights but never used them).
"""

from __future__ import annotations

import numpy as np

from breastcnn.errors import UserInputError


def class_weight_vector(class_weights, num_classes: int) -> np.ndarray | None:
    """Normalise ``{class: weight}``, a sequence, or None to a float64 vector (or None)."""
    if class_weights is None:
        return None
    if isinstance(class_weights, dict):
        w = np.ones(num_classes, np.float64)
        for k, v in class_weights.items():
            k = int(k)
            if not 0 <= k < num_classes:
                raise UserInputError(f"class_weights: class {k} out of range 0..{num_classes - 1}")
            w[k] = float(v)
    else:
        w = np.asarray(class_weights, dtype=np.float64).reshape(-1)
        if w.shape != (num_classes,):
            raise UserInputError(f"class_weights must have {num_classes} entries, got {w.shape[0]}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise UserInputError(f"class_weights must be finite and >= 0, got {w.tolist()}")
    return w


class WeightedSoftmaxCrossEntropy:
    """mean_i( w[y_i] * CE(softmax(logits_i), y_i) ) and its gradient w.r.t. the logits.

    Keras ``class_weight`` convention: weighted sum over the batch divided by N.
    ``loss, grad = loss_fn(logits (N, K), y (N,) int[, class_weights])``;
    grad has the dtype of ``logits``.
    """

    def __init__(self, class_weights=None):
        self.class_weights = class_weights

    def __call__(self, logits: np.ndarray, y: np.ndarray, class_weights=None):
        n, k = logits.shape
        y = np.asarray(y).reshape(-1)
        if y.shape[0] != n:
            raise UserInputError(f"labels: expected {n} labels for {n} logits rows, got {y.shape[0]}")
        if not np.issubdtype(y.dtype, np.integer):
            raise UserInputError(f"labels must be integers, got dtype {y.dtype}")
        if n and (y.min() < 0 or y.max() >= k):
            raise UserInputError(f"labels must be in 0..{k - 1}, got values in {y.min()}..{y.max()}")
        w = class_weight_vector(self.class_weights if class_weights is None else class_weights, k)
        z = logits.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(z).sum(axis=1))
        rows = np.arange(n)
        ce = log_norm - z[rows, y]  # (N,)
        probs = np.exp(z - log_norm[:, None])  # softmax
        probs[rows, y] -= 1.0  # dCE/dlogits = p - onehot
        sample_w = np.ones(n) if w is None else w[y]
        loss = float(np.sum(sample_w * ce) / max(n, 1))
        grad = probs * (sample_w / max(n, 1))[:, None]
        return loss, grad.astype(logits.dtype)

    def get_config(self) -> dict:
        cw = self.class_weights
        if isinstance(cw, np.ndarray):
            cw = cw.tolist()
        return {"class": type(self).__name__, "class_weights": cw}
