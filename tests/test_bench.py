"""The bench harness: timing helpers, the JSON contract, skipped models, metrics, rendering."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from breastcnn import bench
from breastcnn.errors import MissingDependencyError, UserInputError
from breastcnn.metrics import METRIC_KEYS
from breastcnn.models import create_model, save_model

REQUIRED = (
    "model",
    "params_total",
    "params_trainable",
    "size_kb",
    "latency_ms_p50",
    "latency_ms_p95",
    "throughput_ips",
    "train_step_ms",
    "skipped",
)
TINY = dict(
    image_size=64,
    batch_sizes=(1, 4),
    repeats=3,
    warmup=1,
    train_steps=1,
    keras_train_batch_size=4,
    max_seconds=1.0,
    threads=1,
)


def test_time_calls_counts_repeats_and_stops_on_the_time_budget():
    calls = []
    times = bench.time_calls(lambda: calls.append(1), repeats=7, warmup=2, max_seconds=1e9)
    assert len(times) == 7 and len(calls) == 9 and (times >= 0).all()
    slow = bench.time_calls(lambda: time.sleep(0.02), repeats=100, warmup=0, max_seconds=0.05, min_calls=3)
    assert 3 <= len(slow) <= 4  # budget hit after 3 calls (60 ms > 50 ms)
    assert slow.min() >= 19.0  # milliseconds
    floor = bench.time_calls(lambda: time.sleep(0.02), repeats=100, warmup=0, max_seconds=1e-6, min_calls=3)
    assert len(floor) == 3


def test_summarise_ms_percentiles():
    stats = bench.summarise_ms(np.arange(1, 101, dtype=float))
    assert stats["p50"] == pytest.approx(50.5) and stats["p95"] == pytest.approx(95.05)
    assert stats["calls"] == 100 and stats["min"] == 1.0


def test_parsers_name_the_option_and_value(tmp_path):
    assert bench.parse_int_list("1,32,1", "--batch-sizes") == (1, 32)
    with pytest.raises(UserInputError, match=r"--batch-sizes .*'1,x'"):
        bench.parse_int_list("1,x", "--batch-sizes")
    with pytest.raises(UserInputError, match="--batch-sizes"):
        bench.parse_int_list("0", "--batch-sizes")
    assert bench.parse_model_names("custom, VGG16", ["custom", "vgg16"]) == ["custom", "vgg16"]
    with pytest.raises(UserInputError, match="unknown model 'alexnet'; known: custom, vgg16"):
        bench.parse_model_names("custom,alexnet", ["custom", "vgg16"])
    with pytest.raises(UserInputError, match="NAME=PATH"):
        bench.parse_model_files(["model.npz"], ["custom"])
    with pytest.raises(UserInputError, match="not in --models"):
        bench.parse_model_files([f"vgg16={tmp_path}"], ["custom"])
    with pytest.raises(UserInputError, match="no such file"):
        bench.parse_model_files([f"custom={tmp_path / 'missing.npz'}"], ["custom"])
    with pytest.raises(UserInputError, match="--repeats"):
        bench.BenchOptions(repeats=0).validate()
    with pytest.raises(UserInputError, match="--weights"):
        bench.BenchOptions(weights="random").validate()


def _check_entry(entry: dict, batch_sizes=(1, 4)) -> None:
    for key in REQUIRED:
        assert key in entry, key
    assert entry["skipped"] is None
    assert entry["params_total"] >= entry["params_trainable"] > 0
    assert entry["size_kb"] > 0
    assert 0 < entry["latency_ms_p50"] <= entry["latency_ms_p95"]
    assert set(entry["throughput_ips"]) == {str(b) for b in batch_sizes}
    assert all(v > 0 for v in entry["throughput_ips"].values())
    assert entry["train_step_ms"] > 0 and entry["e2e_ms_p50"] > 0


def test_custom_model_json_contract_and_sane_values():
    result = bench.run_bench(["custom"], options=bench.BenchOptions(**TINY))
    assert set(result) >= {"machine", "models"}
    machine = result["machine"]
    assert machine["cpu_model"] and machine["cpu_count"] >= 1 and machine["numpy"] == np.__version__
    assert machine["threads"]["requested"] == 1 and machine["threads"]["blas"] == 1
    (entry,) = result["models"]
    _check_entry(entry)
    counts = create_model("custom", input_shape=(64, 64, 3)).count_params()
    assert entry["params_trainable"] == counts["trainable"]
    assert entry["params_total"] == counts["trainable"] + counts["non_trainable"]
    assert entry["train_batch_size"] == 32 and entry["image_size"] == 64
    # forward at batch 1 is a lower bound of the end-to-end time (which adds decoding a 700x460 PNG)
    assert entry["e2e_ms_p50"] > entry["latency_ms_p50"]
    assert entry["ratio_to_custom"]["latency_ms_p50"] == 1.0
    json.dumps(result)  # serialisable as is


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_flow_down_to_the_numpy_engine(threads):
    """--threads N: the engine really runs on N threads (its own chunk bookkeeping), and the JSON says so.
    (The engine used to run on all cores whatever --threads said; only BLAS followed it.)"""
    from breastcnn.nn.parallel import observe_chunks

    options = bench.BenchOptions(**{**TINY, "threads": threads, "batch_sizes": (1,)})
    with observe_chunks() as log:
        result = bench.run_bench(["custom"], options=options)
    (entry,) = result["models"]
    assert entry["threads"] == {"engine": threads, "blas": 1}
    assert log.calls > 0 and log.max_threads == threads  # the batch-32 train step cuts its convs in chunks
    assert f"NumPy engine {threads} x BLAS 1" in bench.machine_line(result)
    assert result["machine"]["threads"]["requested"] == threads
    default = bench.run_bench(["custom"], options=bench.BenchOptions(**{**TINY, "threads": None, "train_steps": 0}))
    from breastcnn.nn.parallel import available_cores

    assert default["models"][0]["threads"]["engine"] == available_cores()


def test_missing_dependency_is_reported_as_skipped(monkeypatch):
    from breastcnn.models import keras_models

    def missing(*args, **kwargs):
        raise MissingDependencyError("TensorFlow is not installed: pip install 'breastcnn[keras]'")

    monkeypatch.setattr(keras_models, "create_vgg16", missing)
    monkeypatch.setattr(bench, "require_keras", missing)  # as without TensorFlow: its thread pools are not pinned
    result = bench.run_bench(["custom", "vgg16"], options=bench.BenchOptions(**{**TINY, "train_steps": 0}))
    custom, vgg = result["models"]
    assert custom["skipped"] is None and custom["latency_ms_p50"] > 0
    assert "pip install 'breastcnn[keras]'" in vgg["skipped"]
    assert vgg["latency_ms_p50"] is None and vgg["ratio_to_custom"] is None
    markdown = bench.to_markdown(result)
    assert "| vgg16 | skipped: TensorFlow is not installed" in markdown


@pytest.mark.slow  # test metrics of a bench run (8 s)
def test_metrics_from_a_split_and_a_model_file(tmp_path):
    from breastcnn.data import synth
    from breastcnn.data.split import create_split

    tree = synth.generate(tmp_path / "data", scale=0.01, seed=0, jobs=2)
    create_split(tree["root"], mag="200X", out=tmp_path / "split")
    model_file = tmp_path / "model.npz"
    save_model(create_model("custom", input_shape=(64, 64, 3)), model_file)
    result = bench.run_bench(
        ["custom"],
        {"custom": model_file},
        bench.BenchOptions(**{**TINY, "train_steps": 0}),
        split_dir=tmp_path / "split",
    )
    (entry,) = result["models"]
    assert entry["file"] == str(model_file)
    assert entry["size_kb"] == pytest.approx(model_file.stat().st_size / 1024, abs=0.1)
    for key in METRIC_KEYS:
        assert key in entry, key
    assert entry["n"] > 0 and 0 <= entry["accuracy"] <= 1
    headers, rows = bench.table_rows(result)
    assert "test accuracy" in headers and "F1 (malignant)" in headers
    assert rows[0][headers.index("test accuracy")] == f"{entry['accuracy']:.4f}"


def test_keras_model_at_tiny_size(keras):
    result = bench.run_bench(["custom", "custom-keras"], options=bench.BenchOptions(**TINY))
    custom, ckeras = result["models"]
    _check_entry(custom)
    _check_entry(ckeras)
    assert ckeras["framework"] == "keras" and ckeras["train_batch_size"] == 4
    # the same architecture on both sides: the same parameter count
    assert ckeras["params_total"] == custom["params_total"]
    assert ckeras["keras_predict_ms_p50"] > 0
    # TF's pools can be pinned only before TF starts (earlier tests may have started it):
    # whatever is in force must be what the result records
    import tensorflow as tf

    in_force = tf.config.threading.get_intra_op_parallelism_threads() or "default"
    assert result["machine"]["threads"]["tf_intra_op"] == in_force
    assert any("tf.function" in note for note in result["notes"])
    assert ckeras["ratio_to_custom"]["params_total"] == 1.0


def test_onnx_model_file_is_timed_without_a_train_step(onnxruntime, tmp_path):
    from breastcnn.models.onnx_export import export_onnx

    model = create_model("custom", input_shape=(64, 64, 3))
    export_onnx(model, tmp_path / "custom.onnx")
    result = bench.run_bench(["custom"], {"custom": tmp_path / "custom.onnx"}, bench.BenchOptions(**TINY))
    (entry,) = result["models"]
    assert entry["framework"] == "onnx" and entry["file"] == str(tmp_path / "custom.onnx")
    assert entry["latency_ms_p50"] > 0 and entry["e2e_ms_p50"] > entry["latency_ms_p50"]
    assert entry["train_step_ms"] is None and "ONNX Runtime runs inference only: no train step" in entry["notes"]
    counts = model.count_params()
    assert entry["params_total"] == counts["trainable"] + counts["non_trainable"]


# ------------------------------------------------------------ issue 16: caps, defaults, progress, slow batches
@pytest.mark.slow  # sleeps (0.55 s)
def test_time_calls_budget_includes_warm_up_after_the_first_call():
    ticks = []
    times = bench.time_calls(
        lambda: time.sleep(0.05),
        repeats=100,
        warmup=5,
        max_seconds=0.08,
        min_calls=1,
        tick=lambda calls, spent: ticks.append((calls, spent)),
    )
    # first warm-up (never cut), two more while under 0.08 s after it (0, 0.05), then the one timed call
    # the floor demands (0.10 s spent: no second one), of 5 warm-ups and 100 repeats
    assert len(times) == 1 and [c for c, _ in ticks] == [1, 2, 3, 4]
    assert ticks[-1][1] >= 0.2 and times[0] >= 49.0
    slow_first = iter([0.3, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01])
    times = bench.time_calls(lambda: time.sleep(next(slow_first)), repeats=5, warmup=2, max_seconds=0.2)
    assert len(times) == 5  # a slow first call (tracing) does not eat the budget


def test_defaults_fit_two_cores_and_full_is_the_reports():
    quick, full = bench.BenchOptions(), bench.BenchOptions.full()
    assert quick.batch_sizes == (1, 8) and quick.keras_train_batch_size == 4 and quick.max_seconds == 2.0
    assert full.batch_sizes == (1, 32) and full.keras_train_batch_size == bench.REPORT_KERAS_TRAIN_BATCH == 64
    assert full.max_seconds == 10.0 and full.min_calls == 3
    assert bench.BenchOptions.full(max_seconds=1.0).max_seconds == 1.0  # explicit options win


class Recorder(bench.Progress):
    def __init__(self):
        self.events = []

    def plan(self, model, measurements):
        self.events.append(("plan", model, measurements))

    def measurement(self, model, what, max_calls, budget_s):
        self.events.append(("measurement", model, what, max_calls, budget_s))

    def tick(self, calls, spent_s):
        self.events.append(("tick", calls))

    def model_done(self, model):
        self.events.append(("done", model))


def test_every_measurement_is_capped_and_reported(tmp_path):
    options = bench.BenchOptions(**{**TINY, "repeats": 1000, "train_steps": 1000, "max_seconds": 0.05})
    recorder = Recorder()
    started = time.perf_counter()
    (entry,) = bench.run_bench(["custom"], options=options, progress=recorder)["models"]
    assert time.perf_counter() - started < 20
    assert 1 <= entry["train_steps_timed"] < 1000 and entry["train_batch_size"] == 32
    # rounded to 3 (per image) and 2 (per step) decimals: they agree to half a unit in the last place of each
    assert entry["train_ms_per_image"] == pytest.approx(entry["train_step_ms"] / 32, abs=5e-4 + 5e-3 / 32 + 1e-9)
    assert all(1 <= calls < 1000 for calls in entry["calls"].values())
    starts = [e for e in recorder.events if e[0] == "measurement"]
    assert [e[2] for e in starts][:4] == [
        "forward pass, batch 1",
        "forward pass, batch 4",
        "end-to-end (PNG from disk)",
        "train step, batch 32",
    ]
    assert all(e[4] == 0.05 for e in starts)
    assert recorder.events[0] == ("plan", "custom", 4) and recorder.events[-1] == ("done", "custom")
    assert sum(e[0] == "tick" for e in recorder.events) >= 2 * len(starts)  # warm-up + timed calls


def test_test_metrics_are_capped_on_a_seeded_sample_and_match_evaluate_when_complete(tmp_path, make_breakhis_tree):
    from breastcnn.data.split import create_split, load_split
    from breastcnn.evaluation import evaluate_model

    create_split(make_breakhis_tree(tmp_path, traps=False), mag="200X", out=tmp_path / "split", jobs=1)
    split = load_split(tmp_path / "split")
    model = create_model("custom", input_shape=(64, 64, 3), seed=3)
    complete = bench._evaluate(model, split, bench.BenchOptions(max_seconds=60), bench.Progress(), "custom", chunk=2)
    reference, _ = evaluate_model(model, split)
    assert complete["metrics_images"] == complete["test_images"] == reference["n"] and "notes" not in complete
    assert complete["confusion_matrix"] == reference["confusion_matrix"]
    for key in ("accuracy", "recall", "f1", "roc_auc", "patient_accuracy"):
        assert complete[key] == pytest.approx(reference[key]), key
    capped = bench._evaluate(model, split, bench.BenchOptions(max_seconds=1e-9), bench.Progress(), "custom", chunk=2)
    assert capped["metrics_images"] == capped["n"] == 2 < capped["test_images"]
    assert "test metrics on 2 of" in capped["notes"][0] and "--max-seconds" in capped["notes"][0]


def test_train_step_ratio_is_per_image():
    entries = [
        {"model": "custom", "train_step_ms": 10.0, "train_ms_per_image": 10.0 / 32, "throughput_ips": {}},
        {"model": "vgg16", "train_step_ms": 100.0, "train_ms_per_image": 25.0, "throughput_ips": {}},
    ]
    bench.add_ratios(entries)
    assert entries[1]["ratio_to_custom"]["train_ms_per_image"] == 80.0
    assert entries[1]["ratio_to_custom"]["train_step_ms"] == 10.0


def test_a_batch_slower_than_batch_1_is_re_timed_on_one_thread_and_explained():
    model = create_model("custom", input_shape=(64, 64, 3), seed=0)
    model.threads = 0
    options = bench.BenchOptions(**{**TINY, "max_seconds": 0.05})
    entry = {"throughput_ips": {"1": 1e9, "4": 10.0}, "notes": []}  # batch 4 "slower" than batch 1
    planned = []

    def measure(what, fn, repeats, warmup):
        assert model.threads == 1 and "one engine thread" in what
        fn()
        return {"p50": 2.0, "cpu_per_wall": 0.4}

    bench._explain_slow_batches(model, entry, np.random.default_rng(0), 64, "caffe", options, measure, planned.append)
    assert model.threads == 0 and planned == [1]  # restored; one more measurement announced
    assert entry["throughput_ips_one_thread"] == {"4": 2000.0}  # 4 images / 2 ms
    note = entry["notes"][0]
    assert "b4: 10 img/s on all engine threads, 2,000 on one" in note and "40% of a core" in note
    quiet = {"throughput_ips": {"1": 10.0, "4": 30.0}, "notes": []}
    bench._explain_slow_batches(model, quiet, np.random.default_rng(0), 64, "caffe", options, measure, planned.append)
    assert quiet["notes"] == [] and "throughput_ips_one_thread" not in quiet


def test_test_metrics_of_a_stain_normalised_subtype_model_match_evaluates_binary_scores(synth_split, synth_image_size):
    from breastcnn.data.images import load_subset
    from breastcnn.data.split import load_split
    from breastcnn.data.stain import ReinhardNormaliser, stain_meta
    from breastcnn.data.tasks import SUBTYPE_CLASSES
    from breastcnn.evaluation import evaluate_model

    split = load_split(synth_split)
    model = create_model("custom", input_shape=(synth_image_size,) * 2 + (3,), num_classes=8, seed=3)
    model.meta.update(
        classes=list(SUBTYPE_CLASSES),
        task="subtype",
        stain=stain_meta(ReinhardNormaliser().fit(load_subset(split, "train", synth_image_size)[0]), "training subset"),
    )
    scores = bench._evaluate(model, split, bench.BenchOptions(max_seconds=60), bench.Progress(), "custom")
    reference, _ = evaluate_model(model, split)  # normalised the same way; bench reports the binary call
    assert scores["confusion_matrix"] == reference["binary"]["confusion_matrix"]
    for key in ("accuracy", "recall", "roc_auc", "patient_accuracy"):
        assert scores[key] == pytest.approx(reference["binary"][key]), key
