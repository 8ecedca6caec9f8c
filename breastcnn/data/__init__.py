"""Data: BreakHis parsing, splits and manifests, image decoding/cache, augmentation, synthetic data.

from breastcnn.data import load_split, load_subset, preprocess, Augmenter
split = load_split("splits/200X")
x, y = load_subset(split, "train", image_size=224, jobs=2)   # uint8 NHWC, int64
y8 = split.labels("train", task="subtype")                   # the same images' 8-class labels
xb = preprocess(Augmenter()(x[:32], rng), "caffe")           # float32 model input
"""

from breastcnn.data.augment import Augmenter, class_weights, oversample_indices
from breastcnn.data.breakhis import MAGNIFICATIONS, SUBTYPES, Record, ScanResult, scan
from breastcnn.data.images import decode_image, deprocess, load_subset, preprocess
from breastcnn.data.split import (
    DEFAULT_SPLIT_DIR,
    DEFAULT_STRATIFY,
    MANIFEST_COLUMNS,
    Row,
    Split,
    create_split,
    fold_dirs,
    load_split,
)
from breastcnn.data.tasks import SUBTYPE_CLASSES, TASK_CLASSES, TASKS

__all__ = [
    "Augmenter",
    "class_weights",
    "oversample_indices",
    "MAGNIFICATIONS",
    "SUBTYPES",
    "Record",
    "ScanResult",
    "scan",
    "decode_image",
    "deprocess",
    "load_subset",
    "preprocess",
    "DEFAULT_SPLIT_DIR",
    "DEFAULT_STRATIFY",
    "MANIFEST_COLUMNS",
    "Row",
    "Split",
    "create_split",
    "fold_dirs",
    "load_split",
    "SUBTYPE_CLASSES",
    "TASK_CLASSES",
    "TASKS",
]
