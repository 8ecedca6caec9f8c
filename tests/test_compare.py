"""`breastcnn compare`: the compare.json contract, resume, statistics cross-checks, the feature cache, safety."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from typer.testing import CliRunner

from breastcnn import comparison
from breastcnn.cli.app import app
from breastcnn.data.split import load_split
from breastcnn.data.stain import HEDJitter
from breastcnn.data.tasks import SUBTYPE_BINARY, SUBTYPE_CLASSES
from breastcnn.evaluation import evaluate_model
from breastcnn.models import load_model
from breastcnn.models.keras_models import create_resnet50, create_vgg16
from breastcnn.training.feature_cache import split_at_trainable

METRICS = ("accuracy", "patient_accuracy", "precision", "recall", "f1", "benign_recall", "roc_auc")
RESAMPLES = 400


def _run(args, **env):
    return CliRunner().invoke(app, [str(a) for a in args], env={"BREASTCNN_NO_PROGRESS": "1", **env})


def _args(split, out, models="custom,vgg16", *extra):
    return [
        "compare",
        "--split",
        split,
        "--models",
        models,
        "--epochs",
        "1",
        "--image-size",
        "64",
        "--trainable-layers",
        "0",
        "--weights",
        "none",
        "--resamples",
        RESAMPLES,
        "--out",
        out,
        *extra,
    ]


def _cells(out: Path) -> dict:
    return {(p.parent.name, p.parent.parent.name): json.loads(p.read_text()) for p in out.glob("cells/*/*/cell.json")}


@pytest.fixture(scope="module")
def compared(tmp_path_factory, synth_kfold_split, keras):
    """One small comparison (custom vs a vgg16 linear probe, 2 folds, 64 px): (out, document, seconds)."""
    out = tmp_path_factory.mktemp("compare") / "out"
    start = time.perf_counter()
    result = _run([*_args(synth_kfold_split, out), "--json"])
    seconds = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout), seconds


# --------------------------------------------------------------------------- the contract


@pytest.mark.slow
def test_json_contract_and_outputs(compared):
    out, doc, _ = compared
    assert set(doc) >= {"protocol", "models", "pairwise"}
    assert {"folds", "by", "mag", "seed", "split"} <= set(doc["protocol"])
    assert doc["protocol"]["folds"] == 2 and doc["protocol"]["by"] == "patient" and doc["protocol"]["mag"] == "200X"
    assert len(doc["protocol"]["test_patients_per_fold"]) == 2 and doc["protocol"]["distinct_test_patients"] > 0
    assert [m["model"] for m in doc["models"]] == ["custom", "vgg16"]
    for entry in doc["models"]:
        assert {
            "model",
            "params_total",
            "size_kb",
            "latency_ms_p50",
            "train_seconds",
            "folds",
            "mean",
            "std",
            "ci95",
        } <= set(entry)
        assert entry["params_total"] > 0 and entry["size_kb"] > 0 and entry["latency_ms_p50"] > 0
        assert entry["train_seconds"] == pytest.approx(np.mean(entry["train_seconds_folds"]))
        assert [f["fold"] for f in entry["folds"]] == [1, 2]
        for fold in entry["folds"]:
            assert {"fold", "n", *METRICS} <= set(fold) and fold["n"] > 0
        for metric in METRICS:
            values = [f[metric] for f in entry["folds"]]
            assert entry["mean"][metric] == pytest.approx(np.mean(values))
            assert entry["std"][metric] == pytest.approx(np.std(values, ddof=1))
            low, high = entry["ci95"][metric]
            assert low <= high
    # the VGG16 probe has the whole network's parameters and a file to match (the backbone is in model.keras)
    assert doc["models"][1]["params_total"] > 14_000_000 and doc["models"][1]["size_kb"] > 50_000
    [pair] = doc["pairwise"]
    assert {"a", "b", "accuracy_diff", "ci95", "p_value", "significant"} <= set(pair)
    assert (pair["a"], pair["b"]) == ("custom", "vgg16")
    accuracy = {m["model"]: m["mean"]["accuracy"] for m in doc["models"]}
    assert pair["accuracy_diff"] == pytest.approx(accuracy["custom"] - accuracy["vgg16"])
    assert isinstance(pair["significant"], bool) and 0 < pair["p_value"] <= 1
    assert pair["significant"] == (pair["p_value_holm"] < 0.05)
    for name in ("compare.json", "compare.md", "pareto.png", "folds.png"):
        assert (out / name).is_file()
    assert json.loads((out / "compare.json").read_text()) == doc  # --json prints exactly the file
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "compare.md").read_text()
    assert "| custom |" in md and "| vgg16 |" in md and ("not significant" in md or "significant (" in md)


@pytest.mark.slow
def test_statistics_agree_with_an_independent_computation(compared):
    """Per-fold accuracy (scikit-learn), pooled McNemar (scipy binomtest) and the patient-bootstrap CI (a
    plain loop over patients, other random numbers) recomputed from the cells' stored predictions."""
    out, doc, _ = compared
    cells = _cells(out)
    right = {}
    for (model, fold), cell in cells.items():
        p = cell["predictions"]
        y, pred = np.array(p["y_true"]), (np.array(p["p_malignant"]) >= 0.5).astype(int)
        entry = next(m for m in doc["models"] if m["model"] == model)
        assert entry["folds"][int(fold[4:]) - 1]["accuracy"] == pytest.approx(accuracy_score(y, pred))
        right[model, fold] = pred == y
    b = sum(int(np.sum(right["custom", f] & ~right["vgg16", f])) for f in ("fold1", "fold2"))
    c = sum(int(np.sum(~right["custom", f] & right["vgg16", f])) for f in ("fold1", "fold2"))
    [pair] = doc["pairwise"]
    assert (pair["mcnemar"]["a_right_b_wrong"], pair["mcnemar"]["a_wrong_b_right"]) == (b, c)
    expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert pair["mcnemar"]["p_value"] == pytest.approx(expected)

    # patient bootstrap by hand: the distinct patients of both folds (a patient can be in both test
    # sets) drawn with replacement per class, each fold taking the drawn patients it holds
    rng = np.random.default_rng(12345)
    replicates = []
    folds = [cells["custom", f]["predictions"] for f in ("fold1", "fold2")]
    right_by_patient, label = [], {}
    for p in folds:
        patients = np.array(p["patients"])
        y = np.array(p["y_true"])
        ok = (np.array(p["p_malignant"]) >= 0.5) == (y == 1)
        right_by_patient.append({q: ok[patients == q] for q in np.unique(patients)})
        label.update({q: int(y[patients == q][0]) for q in np.unique(patients)})
    classes = [sorted(q for q in label if label[q] == k) for k in (0, 1)]
    for _ in range(2000):
        drawn = [grp[i] for grp in classes for i in rng.integers(0, len(grp), len(grp))]
        accs = []
        for by_patient in right_by_patient:
            rows = [by_patient[q] for q in drawn if q in by_patient]
            if {label[q] for q in drawn if q in by_patient} == {label[q] for q in by_patient}:
                accs.append(np.concatenate(rows).mean())
        replicates.append(np.mean(accs))
    low, high = np.percentile(replicates, [2.5, 97.5])
    got_low, got_high = doc["models"][0]["ci95"]["accuracy"]
    assert got_low == pytest.approx(low, abs=0.02) and got_high == pytest.approx(high, abs=0.02)


# --------------------------------------------------------------------------- resume and the feature cache


@pytest.mark.slow
def test_rerun_skips_finished_cells_with_identical_numbers(compared):
    out, doc, first_seconds = compared
    stamps = {key: (out / "cells" / key[1] / key[0] / "cell.json").stat().st_mtime_ns for key in _cells(out)}
    start = time.perf_counter()
    result = _run([*_args(doc["protocol"]["split"], out), "--json"])
    seconds = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == doc  # identical numbers, cost included
    assert result.stderr.count("already done") == 4
    assert seconds < first_seconds / 3, (seconds, first_seconds)
    assert {key: (out / "cells" / key[1] / key[0] / "cell.json").stat().st_mtime_ns for key in _cells(out)} == stamps


@pytest.mark.slow
def test_feature_cache_is_built_once_and_hit_on_the_second_fold(compared):
    out, doc, _ = compared
    cells = _cells(out)
    assert cells["vgg16", "fold1"]["feature_cache"]["status"] == "built"
    assert cells["vgg16", "fold2"]["feature_cache"]["status"] == "hit"
    assert cells["vgg16", "fold1"]["feature_cache"]["file"] == cells["vgg16", "fold2"]["feature_cache"]["file"]
    assert len(list((out / "features").glob("*.npz"))) == 1
    assert doc["models"][1]["feature_cache"]["statuses"] == ["built", "hit"]
    assert "custom" not in {m for m, _ in cells if "feature_cache" in cells[m, _]}


@pytest.mark.slow
def test_probe_predictions_equal_the_saved_full_model(compared):
    """The head on cached features gives what the saved model.keras gives on the test images (evaluate's code)."""

    out, _, _ = compared
    cell = _cells(out)["vgg16", "fold2"]
    model = load_model(out / "cells" / "fold2" / "vgg16" / cell["model_path"])
    assert model.meta["linear_probe"] is True and model.meta["weights"] == "none"
    _, rows = evaluate_model(model, load_split(out / "splits" / "fold2"), "test")
    assert [r["path"] for r in rows] == cell["predictions"]["paths"]
    np.testing.assert_allclose([r["probability"] for r in rows], cell["predictions"]["p_malignant"], atol=1e-5)
    assert np.std(cell["predictions"]["p_malignant"]) > 0


@pytest.mark.slow
def test_an_interrupted_numpy_cell_continues_from_its_checkpoint(compared, tmp_path):
    """A cell without cell.json (killed before it finished) is trained again, resuming from last.npz:
    the same predictions as the uninterrupted run."""

    out, doc, _ = compared
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = _cells(copy)["custom", "fold2"]
    (copy / "cells" / "fold2" / "custom" / "cell.json").unlink()
    result = _run([*_args(doc["protocol"]["split"], copy), "--json"])
    assert result.exit_code == 0, result.output
    after = _cells(copy)["custom", "fold2"]
    assert after["resumed"] is True and after["predictions"] == before["predictions"]
    assert result.stderr.count("already done") == 3


@pytest.mark.slow
def test_other_options_are_refused_and_force_keeps_the_users_files(compared, tmp_path):

    out, doc, _ = compared
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (copy / "notes.txt").write_text("mine")
    changed = _run([*_args(doc["protocol"]["split"], copy)[:-2], "--seed", "1", "--out", copy])
    assert changed.exit_code == 2 and "other options" in changed.stderr and "--force" in changed.stderr
    assert "Traceback" not in changed.output and len(changed.stderr.strip().splitlines()) == 1
    owned = json.loads((copy / "compare-files.json").read_text())["paths"]
    assert "notes.txt" not in owned
    # --force on a 1-epoch custom-only rerun (custom vs custom-k4: no TensorFlow cells)
    forced = _run(
        [
            "compare",
            "--split",
            doc["protocol"]["split"],
            "--models",
            "custom,custom-k4",
            "--epochs",
            "1",
            "--image-size",
            "64",
            "--resamples",
            RESAMPLES,
            "--out",
            copy,
            "--force",
            "--json",
        ]
    )
    assert forced.exit_code == 0, forced.output
    assert (copy / "notes.txt").read_text() == "mine"
    assert not (copy / "cells" / "fold1" / "vgg16").exists()  # ours: removed by --force
    assert [m["model"] for m in json.loads(forced.stdout)["models"]] == ["custom", "custom-k4"]
    assert len(list((copy / "features").glob("*.npz"))) == 1  # the feature cache is kept


def test_force_keeps_a_users_files_inside_the_folders_compare_made(tmp_path, synth_kfold_split):
    """--force deletes the files compare wrote in its cell and split folders, never a file a user put there."""
    out = tmp_path / "out"
    owned = comparison.Ownership(out)
    cell, split_dir = owned.claim("cells/fold1/custom"), owned.claim("splits/fold1")
    shutil.copytree(Path(synth_kfold_split) / "fold1", split_dir)  # a split: its split.json records its files
    run = cell / "run"
    run.mkdir(parents=True)
    for name in ("model.npz", "history.csv", "config.json", ".model.npz.x1y2.tmp", "model.keras.json"):
        (run / name).write_text("ours")
    (cell / "cell.json").write_text("{}")
    (run / "notes.txt").write_text("the user's")
    (split_dir / "my-annotations.csv").write_text("the user's too")
    other = owned.claim("cells/fold2/custom")
    (other / "run").mkdir(parents=True)
    (other / "run" / "model.npz").write_text("ours")
    owned.claim("cells/fold3/custom").mkdir()  # made, nothing written yet
    owned.claim("cost/custom.json")  # claimed, never written

    kept = owned.remove()
    assert sorted(kept) == [run, split_dir]
    assert (run / "notes.txt").read_text() == "the user's" and sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in split_dir.iterdir()) == ["my-annotations.csv"]
    assert not (cell / "cell.json").exists() and not other.exists() and not (out / "cells" / "fold2").exists()
    assert not (out / "cells" / "fold3").exists() and not (out / "cost").exists()
    assert comparison.Ownership(out).paths == {"cells/fold1/custom", "splits/fold1"}  # still ours, kept
    comparison._fresh(run)  # a cell that starts again
    assert (run / "notes.txt").read_text() == "the user's"


@pytest.mark.slow  # two small compare runs (about 10 s)
def test_a_cell_that_starts_again_keeps_a_users_file_in_its_run_folder(tmp_path, synth_kfold_split):
    out = tmp_path / "out"
    args = ["compare", "--split", synth_kfold_split, "--models", "custom,custom-k4", "--epochs", "1"]
    args += ["--image-size", "64", "--resamples", "200", "--out", out]
    assert _run(args).exit_code == 0
    run = out / "cells" / "fold1" / "custom" / "run"
    (run / "notes.txt").write_text("the user's")
    for name in ("cell.json", "run/last.npz"):  # an unfinished cell without a checkpoint: it starts again
        (run.parent / name).unlink()
    again = _run(args)
    assert again.exit_code == 0, again.output
    assert (run / "notes.txt").read_text() == "the user's" and (run / "model.npz").is_file()
    assert (run.parent / "cell.json").is_file() and again.stderr.count("already done") == 3


# --------------------------------------------------------------------------- bad input (fast)


@pytest.mark.slow  # compare runs (1.4 s)
def test_a_users_file_where_compare_writes_is_refused_even_with_force(tmp_path, synth_kfold_split):
    out = tmp_path / "out"
    (out / "cells" / "fold1").mkdir(parents=True)
    (out / "cells" / "fold1" / "custom").write_text("the user's")
    result = _run(["compare", "--split", synth_kfold_split, "--models", "custom,custom-k4", "--out", out, "--force"])
    assert result.exit_code == 2
    assert "was not written by 'breastcnn compare'" in result.stderr and "Traceback" not in result.output
    assert (out / "cells" / "fold1" / "custom").read_text() == "the user's"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "exactly one of --data"),
        (["--data", "x", "--split", "y"], "exactly one of --data"),
        (["--split", "{split}", "--models", "custom,alexnet"], "unknown model 'alexnet'"),
        (["--split", "{split}", "--models", "custom"], "at least two models"),
        (["--split", "{split}", "--models", "custom,custom"], "twice"),
        (["--split", "{split}", "--models", "custom,vgg16", "--folds", "3"], "has 2 folds"),
        (["--split", "{split}", "--models", "custom,vgg16", "--trainable-layers", "-1"], "--trainable-layers"),
        (["--split", "{split}", "--models", "custom,vgg16", "--resamples", "5"], "--resamples"),
        (["--split", "{split}", "--models", "custom,vgg16", "--json", "--markdown"], "exclusive"),
        (["--split", "{split}", "--models", "custom,vgg16", "--weights", "/no/such.h5"], "--weights /no/such.h5"),
        (["--split", "{data}", "--models", "custom,vgg16"], "not a k-fold split"),
        (["--split", "{split}", "--models", "custom,custom-k4", "--task", "multiclass"], "--task must be one of"),
        (["--split", "{split}", "--models", "custom,custom-k4", "--stain-norm", "vahadane"], "--stain-norm must be"),
        (
            [
                "--split",
                "{split}",
                "--models",
                "custom,custom-k4",
                "--stain-norm",
                "macenko",
                "--stain-target",
                "/no.png",
            ],
            "--stain-target /no.png: no such image file",
        ),
        (
            ["--split", "{split}", "--models", "custom,custom-k4", "--stain-target", "{split}/split.json"],
            "needs --stain-norm",
        ),
        (
            ["--split", "{split}", "--models", "custom,vgg16", "--trainable-layers", "0", "--stain-norm", "reinhard"],
            "--stain-norm reinhard: not supported by the linear probe of vgg16",
        ),
        (
            ["--split", "{split}", "--models", "custom,resnet50", "--trainable-layers", "0", "--task", "subtype"],
            "--task subtype: not supported by the linear probe of resnet50",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, synth_kfold_split, synth_data):
    args = [a.format(split=synth_kfold_split, data=synth_data) for a in args]
    result = _run(["compare", *args, "--out", tmp_path / "out"])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


# --------------------------------------------------------------------------- on a cluster


@pytest.mark.slow
@pytest.mark.cluster
def test_cells_on_a_dask_cluster_give_the_local_numbers(compared, tmp_path):
    distributed = pytest.importorskip("distributed") if not os.environ.get("CI") else __import__("distributed")
    out, doc, _ = compared
    local = distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None, worker_dashboard_address=None
    )
    try:
        result = _run(
            [*_args(doc["protocol"]["split"], tmp_path / "out"), "--json", "--scheduler", local.scheduler_address]
        )
    finally:
        local.close()
    assert result.exit_code == 0, result.output
    remote = json.loads(result.stdout)
    for mine, theirs in zip(remote["models"], doc["models"], strict=True):
        for key in ("folds", "mean", "std", "ci95", "params_total", "size_kb"):
            assert mine[key] == theirs[key], key
    assert remote["pairwise"] == doc["pairwise"]


# --------------------------------------------------------------------------- finetune --trainable-layers 0


@pytest.mark.slow
def test_finetune_linear_probe_caches_features_once_for_the_split(keras, synth_split, tmp_path):
    """`finetune --trainable-layers 0`: a normal run directory (model.keras evaluates as usual), augmentation
    off and said so, the features cached next to the split's image cache and hit by the next run."""

    def finetune(out):
        return _run(
            [
                "finetune",
                "--model",
                "resnet50",
                "--split",
                synth_split,
                "--weights",
                "none",
                "--trainable-layers",
                "0",
                "--epochs",
                "2",
                "--image-size",
                "64",
                "--out",
                out,
                "--json",
            ]
        )

    first = finetune(tmp_path / "a")
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["linear_probe"] is True and summary["epochs_run"] == 2
    assert summary["feature_cache"]["status"] in ("built", "hit")  # another test may have built it
    assert "no augmentation" in first.stderr
    config = json.loads((tmp_path / "a" / "config.json").read_text())["options"]
    assert config["augment"] is False and config["trainable_layers"] == 0
    assert Path(config["feature_cache"]).parent == synth_split / "cache" / "features"
    second = finetune(tmp_path / "b")
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout)["feature_cache"]["status"] == "hit"
    model = load_model(tmp_path / "b" / "model.keras")
    metrics, _ = evaluate_model(model, load_split(synth_split), "test")
    assert 0 <= metrics["accuracy"] <= 1 and model.meta["linear_probe"] is True
    a, b = (
        load_model(tmp_path / d / "model.keras").model.get_layer("predictions").get_weights()[0] for d in ("a", "b")
    )
    np.testing.assert_array_equal(a, b)  # same seed, same head


# --------------------------------------------------------------------------- partial fine-tuning, cached prefix


@pytest.mark.slow
def test_split_at_trainable_is_the_same_network(keras):
    """prefix -> top equals the whole model: one crossing tensor for VGG16, two (branch and shortcut) when the
    cut falls inside a ResNet50 block; nothing to cache when every base layer trains."""

    x = np.random.default_rng(0).normal(0, 50, (3, 32, 32, 3)).astype(np.float32)
    vgg = create_vgg16(input_shape=(32, 32, 3), weights="none", trainable_layers=4)
    prefix, top, crossing = split_at_trainable(vgg)
    assert crossing == ["block4_pool"]
    np.testing.assert_allclose(np.asarray(top(prefix(x))), np.asarray(vgg.model(x)), atol=1e-6)
    resnet = create_resnet50(input_shape=(32, 32, 3), weights="none", trainable_layers=18)
    prefix, top, crossing = split_at_trainable(resnet)
    assert len(crossing) == 2 and "conv5_block1_out" in crossing
    np.testing.assert_allclose(np.asarray(top(prefix(x))), np.asarray(resnet.model(x)), atol=1e-5)
    assert split_at_trainable(create_vgg16(input_shape=(32, 32, 3), weights="none", trainable_layers=20)) is None


@pytest.mark.slow
def test_finetune_without_augmentation_trains_only_the_top_on_cached_activations(keras, synth_split, tmp_path):

    result = _run(
        [
            "finetune",
            "--model",
            "vgg16",
            "--split",
            synth_split,
            "--weights",
            "none",
            "--trainable-layers",
            "4",
            "--no-augment",
            "--epochs",
            "2",
            "--image-size",
            "64",
            "--out",
            tmp_path / "run",
            "--json",
        ]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["prefix_cache"]["tensors"] == ["block4_pool"] and summary["epochs_run"] == 2
    # the random VGG16 top collapses on these 20 validation images: the summary says so (it was always [])
    assert any("collapsed to one class" in w for w in summary["warnings"]), summary["warnings"]
    assert "ran once per image" in result.stderr
    trained = load_model(tmp_path / "run" / "model.keras").model
    fresh = create_vgg16(input_shape=(64, 64, 3), weights="none", trainable_layers=4).model

    def kernel(model, layer):
        return model.get_layer(layer).get_weights()[0]

    for layer in ("block1_conv1", "block4_conv3"):  # frozen: as built
        np.testing.assert_array_equal(kernel(trained, layer), kernel(fresh, layer))
    for layer in ("block5_conv1", "predictions"):  # trainable: changed by training
        assert not np.array_equal(kernel(trained, layer), kernel(fresh, layer))


# --------------------------------------------------------------------------- Ctrl-C (fast: cells faked)


@pytest.mark.slow  # (0.8 s)
def test_ctrl_c_keeps_finished_cells_and_the_rerun_continues(tmp_path, synth_kfold_split, monkeypatch):
    """Ctrl-C in the second cell: exit 130, the first cell's cell.json kept, nothing half-written marked finished,
    the directory unlocked; the rerun skips the first cell and computes the others."""

    calls = []

    def fake_cell(spec, run_dir):
        calls.append((spec.model, spec.fold))
        if len(calls) == 2 and interrupt:
            raise KeyboardInterrupt
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "model.npz").write_bytes(b"")
        split = load_split(spec.split_dir)
        y = split.labels("test")
        p = np.random.default_rng(len(calls)).uniform(size=y.size)
        return {
            "model_path": str(run_dir / "model.npz"),
            "train_seconds": 0.0,
            "predictions": {
                "paths": [r.path for r in split.subset("test")],
                "y_true": y.tolist(),
                "p_malignant": p.tolist(),
                "patients": split.patients("test"),
            },
        }

    monkeypatch.setattr(comparison, "_numpy_cell", fake_cell)
    monkeypatch.setattr(
        comparison, "model_cost", lambda *a, **k: {"params_total": 1, "size_kb": 1.0, "latency_ms_p50": 1.0}
    )
    out = tmp_path / "out"
    args = [
        "compare",
        "--split",
        synth_kfold_split,
        "--models",
        "custom,custom-k4",
        "--resamples",
        "200",
        "--out",
        out,
        "--image-size",
        "64",
    ]
    interrupt = True
    result = _run(args)
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert (out / "cells" / "fold1" / "custom" / "cell.json").is_file()
    assert not (out / "cells" / "fold1" / "custom-k4" / "cell.json").exists()
    assert not (out / "compare.json").exists() and not (out / ".breastcnn.lock").exists()
    interrupt, calls[:] = False, []
    result = _run([*args, "--json"])
    assert result.exit_code == 0, result.output
    assert calls == [("custom-k4", 1), ("custom", 2), ("custom-k4", 2)]
    assert result.stderr.count("already done") == 1
    assert [m["model"] for m in json.loads(result.stdout)["models"]] == ["custom", "custom-k4"]


# --------------------------------------------------------------------------- --task subtype and the stain options


@pytest.fixture(scope="module")
def subtype_compared(tmp_path_factory, synth_kfold_split, keras):
    """custom vs custom-keras on the 8 subtypes, Macenko-normalised, with HED jitter (2 folds, 64 px): (out, doc)."""
    out = tmp_path_factory.mktemp("compare-subtype") / "out"
    args = ["compare", "--split", synth_kfold_split, "--models", "custom,custom-keras", "--epochs", "1"]
    args += ["--image-size", "64", "--resamples", RESAMPLES, "--out", out, "--json"]
    result = _run([*args, "--task", "subtype", "--stain-norm", "macenko", "--stain-augment"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout), args


@pytest.mark.slow
def test_task_and_stain_options_reach_every_cell_and_compare_json(subtype_compared):
    out, doc, _ = subtype_compared
    protocol = doc["protocol"]
    assert (protocol["task"], protocol["stain_norm"], protocol["stain_augment"]) == ("subtype", "macenko", True)
    assert protocol["stain_target"] is None
    cells = _cells(out)
    assert len(cells) == 4
    for (model, _fold), cell in cells.items():
        assert cell["key"]["task"] == "subtype" and cell["key"]["stain_norm"] == "macenko"
        assert cell["key"]["stain_augment"] is True
        trained = load_model(out / "cells" / _fold / model / cell["model_path"])
        assert trained.spec.task == "subtype" and tuple(trained.spec.classes) == SUBTYPE_CLASSES
        assert trained.meta["stain"]["method"] == "macenko" and trained.meta["stain"]["target"] == "training subset"
        assert trained.meta["stain"]["augment"] == HEDJitter().to_dict()
        assert len(cell["predictions"]["subtype_pred"]) == len(cell["predictions"]["y_true"])
    assert "Subtype accuracy" in (out / "compare.md").read_text()


@pytest.mark.slow
def test_subtype_fold_metrics_agree_with_scikit_learn(subtype_compared):
    out, doc, _ = subtype_compared
    cells = _cells(out)
    for entry in doc["models"]:
        for fold in entry["folds"]:
            p = cells[entry["model"], f"fold{fold['fold']}"]["predictions"]
            y, pred = np.array(p["subtype_true"]), np.array(p["subtype_pred"])
            # the binary outcome is the subtype's class; P(malignant) the malignant subtypes' sum
            assert p["y_true"] == SUBTYPE_BINARY[y].tolist()
            assert {*METRICS, "subtype_accuracy", "balanced_accuracy", "macro_f1"} <= set(fold)
            binary_pred = (np.array(p["p_malignant"]) >= 0.5).astype(int)
            assert fold["accuracy"] == pytest.approx(accuracy_score(p["y_true"], binary_pred))
            assert fold["subtype_accuracy"] == pytest.approx(accuracy_score(y, pred))
            with pytest.warns(UserWarning) if set(pred) - set(y) else contextlib.nullcontext():
                balanced = balanced_accuracy_score(y, pred)
            assert fold["balanced_accuracy"] == pytest.approx(balanced)
            assert fold["macro_f1"] == pytest.approx(
                f1_score(y, pred, labels=range(8), average="macro", zero_division=0)
            )
        assert entry["subtype_mean"]["macro_f1"] == pytest.approx(np.mean([f["macro_f1"] for f in entry["folds"]]))
    [pair] = doc["pairwise"]
    right = {
        m: np.concatenate(
            [
                np.equal(cells[m, k]["predictions"]["subtype_true"], cells[m, k]["predictions"]["subtype_pred"])
                for k in ("fold1", "fold2")
            ]
        )
        for m in ("custom", "custom-keras")
    }
    b, c = int(np.sum(right["custom"] & ~right["custom-keras"])), int(np.sum(~right["custom"] & right["custom-keras"]))
    assert pair["subtype_mcnemar"]["a_right_b_wrong"] == b and pair["subtype_mcnemar"]["a_wrong_b_right"] == c
    expected = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    assert pair["subtype_mcnemar"]["p_value"] == pytest.approx(expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "differ"),
    [
        (["--task", "subtype", "--stain-norm", "reinhard", "--stain-augment"], "stain_norm"),
        (["--task", "subtype", "--stain-norm", "macenko", "--no-stain-augment"], "stain_augment"),
        (["--stain-norm", "macenko", "--stain-augment"], "task"),
    ],
)
def test_a_rerun_with_other_task_or_stain_options_is_refused(subtype_compared, change, differ):
    out, _, args = subtype_compared
    before = {k: c["cell_seconds"] for k, c in _cells(out).items()}
    result = _run([*args, *change])
    assert result.exit_code == 2 and differ in result.stderr and "--force" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert {k: c["cell_seconds"] for k, c in _cells(out).items()} == before


def _fake_cell(spec, run_dir):
    """A cell without training: random predictions of the fold's test images."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "model.npz").write_bytes(b"")
    split = load_split(spec.split_dir)
    y = split.labels("test")
    p = np.random.default_rng(spec.fold).uniform(size=y.size)
    return {
        "model_path": str(run_dir / "model.npz"),
        "train_seconds": 0.0,
        "predictions": {
            "paths": [r.path for r in split.subset("test")],
            "y_true": y.tolist(),
            "p_malignant": p.tolist(),
            "patients": split.patients("test"),
        },
    }


@pytest.mark.slow  # three compare runs (2 s)
def test_cells_from_before_the_stain_options_are_reused_and_a_stain_change_is_not(
    tmp_path, synth_kfold_split, monkeypatch
):
    """A cell.json written before compare had --task/--stain-* (no such keys) ran with the defaults: reused at the
    defaults, refused (not silently reused) with another stain option, recomputed with --force."""
    calls = []
    monkeypatch.setattr(
        comparison, "_numpy_cell", lambda spec, run_dir: calls.append(spec) or _fake_cell(spec, run_dir)
    )
    monkeypatch.setattr(
        comparison, "model_cost", lambda *a, **k: {"params_total": 1, "size_kb": 1.0, "latency_ms_p50": 1.0}
    )
    out = tmp_path / "out"
    args = ["compare", "--split", synth_kfold_split, "--models", "custom,custom-k4", "--resamples", "200"]
    args += ["--out", out, "--image-size", "64"]
    assert _run(args).exit_code == 0
    assert len(calls) == 4 and all(s.stain_norm == "none" and s.stain_augment is None for s in calls)
    for path in out.glob("cells/*/*/cell.json"):
        cell = json.loads(path.read_text())
        for name in ("task", "stain_norm", "stain_target", "stain_augment"):
            del cell["key"][name]
        path.write_text(json.dumps(cell))
    result = _run(args)
    assert result.exit_code == 0 and result.stderr.count("already done") == 4 and len(calls) == 4
    result = _run([*args, "--stain-norm", "reinhard"])
    assert result.exit_code == 2 and "(stain_norm differ)" in result.stderr and len(calls) == 4
    result = _run([*args, "--stain-norm", "reinhard", "--force", "--json"])
    assert result.exit_code == 0, result.output
    assert len(calls) == 8 and all(s.stain_norm == "reinhard" for s in calls[4:])
    assert json.loads(result.stdout)["protocol"]["stain_norm"] == "reinhard"


def test_a_one_class_cell_is_named_in_the_warnings():
    """A degenerate model (one class for every test image) must not sit silently in the comparison."""
    from breastcnn.comparison import one_class_warnings

    y = [0, 0, 1, 1, 1, 1]
    cells = [
        {"model": "vgg16", "fold": 2, "predictions": {"y_true": y, "p_malignant": [0.1] * 6}},
        {"model": "custom", "fold": 1, "predictions": {"y_true": y, "p_malignant": [0.2, 0.3, 0.9, 0.8, 0.7, 0.6]}},
    ]
    [line, worse_than_majority] = one_class_warnings(cells)
    assert line.startswith("vgg16 fold 2: the model predicts benign for 100% of the 6 test images")
    assert "vgg16 fold 2: test accuracy 0.333 is no better than always answering the majority class" in (
        worse_than_majority
    )
