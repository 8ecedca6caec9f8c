"""breastcnn: breast cancer histopathology classification.

A lightweight CNN written from scratch in NumPy (``breastcnn.nn``), trained on
BreakHis and compared, on the same split and evaluation, with VGG16 and
ResNet50 fine-tuned in TensorFlow/Keras (an optional extra).

Public API (kept stable for scripts)::

    from breastcnn.models import create_model, load_model, save_model
    from breastcnn.evaluation import evaluate
"""

# Imports: the package's own modules are imported at the top of each module (tests/test_imports.py
# fails on a cycle). Only third-party modules that are optional or slow to import stay inside the
# functions that need them: tensorflow/keras, onnx/onnxruntime, dask/distributed, openslide,
# tifffile, scikit-image, histolab and matplotlib (plots build figures on first use).

__version__ = "0.1.0"

CLASSES = ("benign", "malignant")
"""Class names in label order: 0 = benign, 1 = malignant (the positive class)."""

__all__ = ["__version__", "CLASSES"]
