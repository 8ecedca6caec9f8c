"""breastcnn: breast cancer histopathology classification.

A lightweight CNN written from scratch in NumPy (``breastcnn.nn``), trained on
BreakHis and compared, on the same split and evaluation, with VGG16 and
ResNet50 fine-tuned in TensorFlow/Keras (an optional extra).

Public API (kept stable for scripts)::

    from breastcnn.models import create_model, load_model, save_model
    from breastcnn.evaluation import evaluate
"""

__version__ = "0.1.0"

CLASSES = ("benign", "malignant")
"""Class names in label order: 0 = benign, 1 = malignant (the positive class)."""

__all__ = ["__version__", "CLASSES"]
