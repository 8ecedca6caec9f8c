"""evaluate/predict for the subtype task, per magnification, and with a stain-normalised model."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from breastcnn.data.images import load_subset
from breastcnn.data.split import create_split, load_split
from breastcnn.data.stain import MacenkoNormaliser, normalise_batch, stain_meta
from breastcnn.data.tasks import SUBTYPE_CLASSES, binary_probabilities
from breastcnn.evaluation import evaluate, evaluate_model, prediction_columns
from breastcnn.inference import predict_paths, predict_proba_uint8
from breastcnn.metrics import classification_metrics, subtype_metrics
from breastcnn.models import create_model, load_model, model_spec, save_model


def _subtype_model(size: int, seed: int = 3, stain: dict | None = None):
    model = create_model("custom", input_shape=(size, size, 3), num_classes=8, seed=seed)
    model.meta.update(classes=list(SUBTYPE_CLASSES), task="subtype")
    if stain is not None:
        model.meta["stain"] = stain
    return model


def test_a_subtype_model_is_scored_on_its_8_classes_and_on_the_derived_binary_call(
    synth_split, synth_image_size, tmp_path
):
    model = load_model(save_model(_subtype_model(synth_image_size), tmp_path / "run" / "model.npz"))
    assert model_spec(model).task == "subtype" and model_spec(model).num_classes == 8
    split = load_split(synth_split)
    metrics, rows = evaluate_model(model, split, "test")
    x, y = load_subset(split, "test", synth_image_size, task="subtype")
    proba = predict_proba_uint8(model, x)
    expected = subtype_metrics(y, proba, SUBTYPE_CLASSES, patients=split.patients("test"))
    assert {k: v for k, v in metrics.items() if k != "subset"} == expected
    assert (
        metrics["binary"]["roc_auc"]
        == classification_metrics(split.labels("test"), binary_probabilities(proba)[:, 1])["roc_auc"]
    )
    assert "per_magnification" not in metrics  # one magnification
    assert [r["true_label"] for r in rows] == [SUBTYPE_CLASSES[i] for i in y]
    assert [r["predicted_label"] for r in rows] == [SUBTYPE_CLASSES[i] for i in proba.argmax(axis=1)]
    assert [r["true_class"] for r in rows] == [r.label for r in split.subset("test")]
    np.testing.assert_allclose([r["probability"] for r in rows], proba[:, 4:].sum(axis=1), rtol=1e-6)
    # the command's outputs: predictions.csv with the subtype columns, metrics.json the same JSON
    result = evaluate(tmp_path / "run" / "model.npz", synth_split, out=tmp_path / "eval")
    header = next(csv.reader(io.StringIO((tmp_path / "eval" / "predictions.csv").read_text())))
    assert header == prediction_columns(model_spec(model)) and header[-8:] == [f"p_{c}" for c in SUBTYPE_CLASSES]
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["confusion_matrix"] == expected["confusion_matrix"] and result.to_json()["task"] == "subtype"


def test_a_multi_magnification_split_adds_per_magnification_metrics(multimag_tree, tmp_path):
    create_split(multimag_tree, "40X,200X", out=tmp_path / "s", seed=0)
    split = load_split(tmp_path / "s")
    model = create_model("custom", input_shape=(64, 64, 3), seed=1)
    metrics, rows = evaluate_model(model, split, "test")
    assert set(metrics["per_magnification"]) == {"40X", "200X"}
    x, y = load_subset(split, "test", 64)
    p = predict_proba_uint8(model, x)[:, 1]
    mags = np.asarray(split.magnifications("test"))
    patients = np.asarray(split.patients("test"))
    for mag in ("40X", "200X"):
        keep = mags == mag
        assert metrics["per_magnification"][mag] == classification_metrics(
            y[keep], p[keep], patients=list(patients[keep])
        )
    assert metrics["n"] == metrics["per_magnification"]["40X"]["n"] + metrics["per_magnification"]["200X"]["n"]
    assert [r["magnification"] for r in rows] == list(mags)
    # the subtype task too
    sub = _subtype_model(64)
    scores, _ = evaluate_model(sub, split, "test")
    assert set(scores["per_magnification"]) == {"40X", "200X"}
    assert all(s["task"] == "subtype" and len(s["confusion_matrix"]) == 8 for s in scores["per_magnification"].values())


def test_a_stain_normalised_model_normalises_in_evaluate_and_predict(
    synth_split, synth_data, synth_image_size, tmp_path
):
    split = load_split(synth_split)
    x_train, _ = load_subset(split, "train", synth_image_size)
    normaliser = MacenkoNormaliser().fit(x_train)
    model = create_model("custom", input_shape=(synth_image_size,) * 2 + (3,), seed=2)
    model.meta["stain"] = stain_meta(normaliser, "training subset")
    path = save_model(model, tmp_path / "m.npz")
    model = load_model(path)
    plain = create_model("custom", input_shape=(synth_image_size,) * 2 + (3,), seed=2)  # same weights, no stain
    x, y = load_subset(split, "test", synth_image_size)
    normalised, _ = normalise_batch(normaliser, x)
    metrics, _ = evaluate_model(model, split, "test")
    expected = classification_metrics(y, predict_proba_uint8(plain, normalised)[:, 1], patients=split.patients("test"))
    assert metrics == {**expected, "subset": "test"}
    assert metrics != {
        **classification_metrics(y, predict_proba_uint8(plain, x)[:, 1], patients=split.patients("test")),
        "subset": "test",
    }
    files = [str(split.root / r.path) for r in split.subset("test")[:3]]
    got = [r.probability for r in predict_paths(model, files)]
    from breastcnn.data.images import decode_image

    raw = np.stack([decode_image(f, synth_image_size) for f in files])
    want = predict_proba_uint8(plain, normalise_batch(normaliser, raw)[0])[:, 1]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_predict_of_a_subtype_model_gives_the_subtype_and_every_probability(synth_split, synth_image_size):
    split = load_split(synth_split)
    model = _subtype_model(synth_image_size)
    files = [str(split.root / r.path) for r in split.subset("test")[:4]]
    results = [r.as_dict() for r in predict_paths(model, files)]
    x, _ = load_subset(split, "test", synth_image_size)
    proba = predict_proba_uint8(model, x[:4])
    for result, p in zip(results, proba, strict=True):
        assert list(result["probabilities"]) == list(SUBTYPE_CLASSES)
        np.testing.assert_allclose(list(result["probabilities"].values()), p, rtol=1e-5)
        assert result["label"] == SUBTYPE_CLASSES[int(np.argmax(p))]
        assert result["probability"] == pytest.approx(float(p[4:].sum()), rel=1e-5)


def test_task_and_stain_survive_export_to_onnx(onnxruntime, synth_split, synth_image_size, tmp_path):
    from breastcnn.models.onnx_export import export_onnx

    split = load_split(synth_split)
    normaliser = MacenkoNormaliser().fit(load_subset(split, "train", synth_image_size)[0])
    model = _subtype_model(synth_image_size, stain=stain_meta(normaliser, "training subset"))
    export_onnx(model, tmp_path / "m.onnx")
    onnx_model = load_model(tmp_path / "m.onnx")
    spec = model_spec(onnx_model)
    assert spec.task == "subtype" and spec.classes == SUBTYPE_CLASSES
    np.testing.assert_allclose(spec.normaliser.stain_matrix, normaliser.stain_matrix)
    x, _ = load_subset(split, "test", synth_image_size)
    np.testing.assert_allclose(predict_proba_uint8(onnx_model, x[:8]), predict_proba_uint8(model, x[:8]), atol=1e-4)
