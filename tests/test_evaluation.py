"""breastcnn.evaluation: the evaluate use case as a library (no CLI), with a progress callback."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from breastcnn.data.split import DEFAULT_SPLIT_DIR, fold_dirs, load_split
from breastcnn.errors import BreastCNNWarning, UserInputError
from breastcnn.evaluation import (
    OUTPUT_NAMES,
    PREDICTION_COLUMNS,
    evaluate,
    evaluate_model,
    plan_evaluation,
    run_evaluation,
    trained_split,
)
from breastcnn.models import create_model, load_model, save_model


@pytest.fixture
def model_file(tmp_path, synth_image_size) -> Path:
    """An untrained custom model at the session split's image size (scores need not be good here)."""
    return save_model(
        create_model("custom", input_shape=(synth_image_size,) * 2 + (3,), seed=1), tmp_path / "run" / "model.npz"
    )


def test_evaluate_without_the_cli_writes_outputs_and_reports_progress(model_file, synth_split, tmp_path):
    seen = []
    result = evaluate(model=model_file, split=synth_split, out=tmp_path / "report", progress=seen.append)
    n = len(load_split(synth_split).subset("test"))
    assert sum(seen) == n and seen  # images decoded (cache built) or scored (cache hit): the total either way
    metrics = result.to_json()
    assert metrics["model"] == str(model_file) and metrics["split"] == str(synth_split) and metrics["n"] == n
    out_dir, files = result.written[0]
    assert out_dir == tmp_path / "report" and [f.name for f in files] == list(OUTPUT_NAMES)
    assert json.loads((out_dir / "metrics.json").read_text()) == metrics
    rows = list(csv.DictReader(io.StringIO((out_dir / "predictions.csv").read_text())))
    assert tuple(rows[0]) == PREDICTION_COLUMNS and len(rows) == n
    # the same scores as evaluate_model on the loaded model
    direct, _ = evaluate_model(load_model(model_file), load_split(synth_split))
    assert {k: direct[k] for k in ("accuracy", "confusion_matrix", "roc_auc")} == {
        k: metrics[k] for k in ("accuracy", "confusion_matrix", "roc_auc")
    }
    # an explicit out is never overwritten without force, and nothing is written before that refusal
    with pytest.raises(UserInputError, match="already exists; pass --force"):
        evaluate(model=model_file, split=synth_split, out=tmp_path / "report")
    assert evaluate(model=model_file, split=synth_split, out=tmp_path / "report", force=True).metrics


def test_progress_adds_up_to_the_subset_when_the_cache_is_built_and_when_it_is_read(model_file, synth_split, tmp_path):
    split = load_split(synth_split)
    n = len(split.subset("val"))
    size = create_model("custom", input_shape=(80, 80, 3))  # a size no other test caches
    for _ in range(2):  # builds the 80 px cache, then reads it
        seen = []
        evaluate_model(size, split, "val", progress=seen.append)
        assert sum(seen) == n


def test_the_library_imports_no_cli():
    code = "import sys, breastcnn.evaluation; assert 'typer' not in sys.modules and 'rich' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow  # trains one model per fold (1.6 s)
def test_a_kfold_run_is_paired_fold_by_fold(synth_kfold_split, tmp_path, synth_image_size):
    run = tmp_path / "kfold-run"
    for k in (1, 2):
        save_model(
            create_model("custom", input_shape=(synth_image_size,) * 2 + (3,), seed=k), run / f"fold{k}" / "model.npz"
        )
    (run / "config.json").write_text(json.dumps({"options": {"split": str(synth_kfold_split)}}))
    plan = plan_evaluation(model=run)  # the split comes from the run's config.json
    assert plan.kfold and plan.split_dir == synth_kfold_split
    assert [(t.fold, t.model_path, t.split.dir, t.out_dir) for t in plan.targets] == [
        (k, run / f"fold{k}" / "model.npz", d, run / f"fold{k}") for k, d in enumerate(fold_dirs(synth_kfold_split), 1)
    ]
    assert plan.notes == [f"using the split the model was trained on: {synth_kfold_split} (from {run / 'config.json'})"]
    result = run_evaluation(plan)
    doc = result.to_json()
    assert [f["fold"] for f in doc["folds"]] == [1, 2] and doc["mean_std"]["folds"] == 2
    assert "fold" not in json.loads((run / "fold2" / "metrics.json").read_text())
    one_fold = fold_dirs(synth_kfold_split)[0]
    with pytest.raises(UserInputError, match="has 2 folds but --split .* has 0"):
        plan_evaluation(model=run, split=one_fold)
    with pytest.raises(UserInputError, match="is a k-fold split but --model .* is one model"):
        plan_evaluation(model=run / "fold1" / "model.npz", split=synth_kfold_split)


def test_trained_split_reads_the_run_config(tmp_path):
    assert trained_split(tmp_path) == (Path(DEFAULT_SPLIT_DIR), None)
    (tmp_path / "config.json").write_text(json.dumps({"options": {"split": "splits/40X"}}))
    assert trained_split(tmp_path) == (Path("splits/40X"), tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"options": {"split": 3}}))
    with pytest.raises(UserInputError, match="config.json: option 'split' must be a path, got 3"):
        trained_split(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(UserInputError, match="not a valid config.json"):
        trained_split(tmp_path)


def test_a_model_trained_on_another_split_is_a_warning(model_file, synth_split, tmp_path):
    model = load_model(model_file)
    model.meta["split_hash"] = "0" * 64
    save_model(model, model_file)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate(model=model_file, split=synth_split)
    assert [str(w.message) for w in caught if issubclass(w.category, BreastCNNWarning)] == [
        f"{model_file} was trained on another split (manifest hash 000000000000 != "
        f"{load_split(synth_split).hash[:12]}); its training images may be in this test subset"
    ]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"threshold": 1.5}, "--threshold must be in"),
        ({"subset": "holdout"}, "--subset must be test, val or train"),
        ({"threads": 0}, "--threads must be >= 1"),
    ],
)
def test_bad_options_are_refused_before_anything_is_read(options, message, tmp_path):
    with pytest.raises(UserInputError, match=message):
        evaluate(model=tmp_path / "missing.npz", **options)
