"""breastcnn.inference: path collection, streaming prediction, evaluation through the classifier interface."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from breastcnn.errors import UserInputError
from breastcnn.evaluation import evaluate_model
from breastcnn.inference import collect_images, predict_paths, predict_uint8


class MeanRedClassifier:
    """A stand-in for any framework's model: P(malignant) = mean of the (minmax) red channel.

    Implements only the classifier interface (``framework``, ``meta``,
    ``predict``), like the Keras wrapper does; it records the batch sizes it got.
    """

    framework = "keras"

    def __init__(self, image_size=16):
        self.meta = {"image_size": image_size, "preprocess": "minmax", "classes": ["benign", "malignant"]}
        self.batches = []

    def predict(self, x, batch_size=64):
        assert x.dtype == np.float32 and x.shape[1:] == (16, 16, 3)
        self.batches.append(len(x))
        p = x[..., 0].mean(axis=(1, 2))
        return np.stack([1 - p, p], axis=1).astype(np.float32)

    def count_params(self):
        return {"trainable": 0, "non_trainable": 0}


def write_image(path, red: int, size=(20, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), (red, 0, 0), np.uint8)).save(path)
    return path


@pytest.fixture
def image_tree(tmp_path):
    write_image(tmp_path / "imgs" / "a.png", 255)
    write_image(tmp_path / "imgs" / "sub" / "b.PNG", 0)
    write_image(tmp_path / "imgs" / "sub" / "c.jpg", 200)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return tmp_path / "imgs"


def test_collect_images_folders_globs_files_and_missing(image_tree, tmp_path):
    paths, problems = collect_images([image_tree])
    names = sorted(p.split("/")[-1] for p in paths)
    assert names == ["a.png", "b.PNG", "broken.png", "c.jpg"]  # recursive, case-insensitive, no .txt
    paths, problems = collect_images([str(image_tree / "*.png"), str(image_tree / "a.png"), tmp_path / "missing.png"])
    assert [p.split("/")[-1] for p in paths] == ["a.png", "broken.png"]  # duplicates dropped
    assert len(problems) == 1 and "missing.png" in problems[0].error
    _, problems = collect_images([str(tmp_path / "*.tif")])
    assert "no file matches" in problems[0].error


def test_predict_paths_streams_in_order_and_reports_unreadable(image_tree):
    model = MeanRedClassifier()
    paths, _ = collect_images([image_tree])
    paths = paths * 5  # 20 inputs, chunks of batch_size * 4 * jobs = 8
    seen = []
    results = list(predict_paths(model, paths, threshold=0.5, batch_size=2, jobs=1, progress=seen.append))
    assert [r.path for r in results] == paths
    assert sum(seen) == len(paths) and len(seen) == 3
    by_name = {r.path.split("/")[-1]: r for r in results}
    assert by_name["a.png"].probability == pytest.approx(1.0) and by_name["a.png"].label == "malignant"
    assert by_name["b.PNG"].probability == pytest.approx(0.0) and by_name["b.PNG"].label == "benign"
    assert by_name["c.jpg"].label == "malignant"
    broken = by_name["broken.png"]
    assert broken.label is None and "broken.png" in broken.error
    assert max(model.batches) <= 8  # one model call per chunk: memory bounded by the chunk
    parallel = list(predict_paths(model, paths, batch_size=2, jobs=2))
    assert [(r.path, r.probability, r.error) for r in parallel] == [(r.path, r.probability, r.error) for r in results]


def test_predict_paths_threshold_is_checked():
    with pytest.raises(UserInputError, match="--threshold"):
        list(predict_paths(MeanRedClassifier(), [], threshold=2.0))


def test_model_without_input_metadata_is_a_clear_error():
    model = MeanRedClassifier()
    model.meta = {}
    with pytest.raises(UserInputError, match="image_size"):
        predict_uint8(model, np.zeros((1, 16, 16, 3), np.uint8))


def test_evaluate_model_any_classifier_rows_match_metrics(synth_split):
    from breastcnn.data.split import load_split

    split = load_split(synth_split)
    model = MeanRedClassifier()
    metrics, rows = evaluate_model(model, split, "test", threshold=0.5)
    test_rows = split.subset("test")
    assert metrics["n"] == len(rows) == len(test_rows)
    assert [r["path"] for r in rows] == [r.path for r in test_rows]
    assert [r["true_label"] for r in rows] == [r.label for r in test_rows]
    assert {r["patient"] for r in rows} == {r.patient for r in test_rows}
    correct = sum(r["true_label"] == r["predicted_label"] for r in rows)
    assert metrics["accuracy"] == pytest.approx(correct / len(rows))
    tp = sum(r["true_label"] == r["predicted_label"] == "malignant" for r in rows)
    assert metrics["confusion_matrix"][1][1] == tp
    assert metrics["patient_accuracy"] is not None and metrics["subset"] == "test"
    with pytest.raises(UserInputError, match="subset"):
        evaluate_model(model, split, "holdout")
