"""`--scheduler`: predict and slide on a dask.distributed LocalCluster (2 worker processes) = a local run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from breastcnn.cli.app import app

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster():
    """One LocalCluster for the module: 2 worker processes, 1 thread each (workers get our sys.path)."""
    if os.environ.get("CI"):
        import distributed
    else:
        distributed = pytest.importorskip("distributed")
    local = distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None, worker_dashboard_address=None
    )
    try:
        yield local.scheduler_address
    finally:
        local.close()


def _run(args, **env):
    return CliRunner().invoke(app, [str(a) for a in args], env={"BREASTCNN_NO_PROGRESS": "1", **env})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """40 small PNGs with a corrupt one in the middle (a failure that happens on a worker)."""
    root = tmp_path_factory.mktemp("cluster-images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(40):
        path = root / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (48 + i, 70, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    bad = root / "img17.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated: the header reads, the pixels do not
    return paths


@pytest.mark.slow  # a LocalCluster (1 s)
def test_predict_on_the_cluster_equals_the_local_run(cluster, images, tile_model):
    args = ["predict", *images, "--model", tile_model, "--csv", "--batch-size", "8"]
    local = _run(args)
    remote = _run([*args, "--scheduler", cluster])
    assert local.exit_code == remote.exit_code == 1
    assert remote.stdout == local.stdout  # same rows, same order, same digits
    assert len(remote.stdout.splitlines()) == 1 + 39
    [line] = [x for x in remote.stderr.splitlines() if x.startswith("error:")]
    assert "img17.png" in line and "cannot read image" in line
    probabilities = [float(row.split(",")[2]) for row in remote.stdout.splitlines()[1:]]
    assert np.std(probabilities) > 1e-3  # a model whose answers differ per image


def test_the_model_is_loaded_once_per_worker(cluster, images, tile_model):
    import distributed

    from breastcnn import cluster as cluster_module

    digest = cluster_module.ModelPayload.from_path(tile_model).digest
    for _ in range(2):  # two runs of 4 batches each
        result = _run(
            ["predict", *images[:16], "--model", tile_model, "--json", "--batch-size", "4", "--scheduler", cluster]
        )
        assert result.exit_code == 0, result.output
    with distributed.Client(cluster) as client:
        loads = client.run(lambda: dict(__import__("breastcnn.cluster").cluster.MODEL_LOADS))
    assert len(loads) == 2 and all(counts.get(digest, 0) <= 1 for counts in loads.values())
    assert sum(counts.get(digest, 0) for counts in loads.values()) >= 1


def test_predict_reads_the_scheduler_from_the_environment(cluster, images, tile_model):
    from breastcnn import cluster as cluster_module

    args = ["predict", *images[:5], "--model", tile_model, "--json"]
    local = _run(args)
    remote = _run(args, BREASTCNN_SCHEDULER=cluster)
    assert local.exit_code == remote.exit_code == 0
    assert json.loads(remote.stdout) == json.loads(local.stdout)
    assert cluster_module.scheduler_address(None) is None or os.environ.get(cluster_module.SCHEDULER_ENV)


@pytest.mark.slow  # two slides twice: ~8 s on a quiet 2-core machine, 17 s on a loaded one
def test_slide_on_the_cluster_equals_the_local_run(cluster, pyramid_tiff, cmu_slide, tile_model, tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 32)
    args = ["slide", pyramid_tiff[0], bad, cmu_slide, "--model", tile_model, "--batch-size", "16", "--json"]
    local = _run([*args, "--out", tmp_path / "local"])
    remote = _run([*args, "--out", tmp_path / "remote", "--scheduler", cluster])
    assert local.exit_code == remote.exit_code == 1
    assert sum("broken.svs" in x for x in remote.stderr.splitlines() if x.startswith("error:")) == 1
    for name in ("generated", "cmu_small_region"):
        assert (tmp_path / "remote" / name / "tiles.csv").read_text() == (
            tmp_path / "local" / name / "tiles.csv"
        ).read_text()
    strip = lambda s: {k: v for k, v in s.items() if k not in ("seconds", "out")}  # noqa: E731
    assert [strip(s) for s in json.loads(remote.stdout)] == [strip(s) for s in json.loads(local.stdout)]


def test_worker_loads_the_shipped_model_once_and_checks_the_version(tile_model):
    from breastcnn import cluster as cluster_module
    from breastcnn.models import load_model

    payload = cluster_module.ModelPayload.from_path(tile_model)
    assert "bytes" not in repr(payload) and payload.digest in cluster_module.ModelPayload.from_path(tile_model).digest
    first = cluster_module.resolve_model(payload)
    assert cluster_module.resolve_model(payload) is first  # cached per process
    x = np.random.default_rng(0).random((3, 64, 64, 3)).astype(np.float32)
    np.testing.assert_array_equal(first.predict(x), load_model(tile_model).predict(x))
    from dataclasses import replace

    with pytest.raises(Exception, match="worker runs breastcnn .* client runs 0.0.0-other"):
        cluster_module.resolve_model(replace(payload, version="0.0.0-other"))


@pytest.mark.slow  # waits for a connection timeout (1 s)
def test_unreachable_scheduler_is_one_line_exit_2(tile_model, tmp_path, monkeypatch):
    from breastcnn import cluster as cluster_module

    pytest.importorskip("distributed")
    monkeypatch.setattr(cluster_module, "CONNECT_TIMEOUT_S", 1.0)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    result = _run(["predict", tmp_path / "a.png", "--model", tile_model, "--scheduler", "tcp://127.0.0.1:9"])
    assert result.exit_code == 2
    assert "--scheduler tcp://127.0.0.1:9: cannot connect" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # a Python subprocess (1.2 s)
def test_without_scheduler_dask_is_never_imported(tile_model, tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from breastcnn.cli.app import app\n"
        f"r = CliRunner().invoke(app, ['predict', {str(tmp_path / 'a.png')!r}, '--model', {str(tile_model)!r}, '--json'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in ('dask', 'distributed') if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "BREASTCNN_SCHEDULER"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_payload_of_a_keras_model_carries_its_sidecar(tmp_path):
    from breastcnn.cluster import ModelPayload

    (tmp_path / "model.keras").write_bytes(b"zip bytes")
    (tmp_path / "breastcnn.json").write_text("{}")  # an earlier version's sidecar name
    legacy = ModelPayload.from_path(tmp_path / "model.keras")
    assert [name for name, _ in legacy.files] == ["model.keras", "breastcnn.json"]
    (tmp_path / "model.keras.json").write_text("{}")  # the current name wins
    payload = ModelPayload.from_path(tmp_path / "model.keras")
    assert [name for name, _ in payload.files] == ["model.keras", "model.keras.json"]
    assert ModelPayload.from_path(tmp_path / "model.keras").digest == payload.digest != legacy.digest
    (tmp_path / "model.keras.json").write_text('{"changed": 1}')
    assert ModelPayload.from_path(tmp_path / "model.keras").digest != payload.digest


def test_a_slide_the_worker_cannot_see_is_named(tmp_path):
    from breastcnn.cluster import SlideSource
    from breastcnn.errors import UserInputError
    from breastcnn.wsi.reader import resolve_reader

    with pytest.raises(UserInputError, match=r"nowhere\.svs: worker .* cannot read it .*shared filesystem"):
        resolve_reader(SlideSource(str(tmp_path / "nowhere.svs")))


def test_onnx_model_on_the_cluster_equals_local(cluster, images, tile_model, tmp_path, onnxruntime):
    model = tmp_path / "model.onnx"
    exported = _run(["export", "--model", tile_model, "--to", "onnx", "--out", model])
    assert exported.exit_code == 0, exported.output
    args = ["predict", *images[:12], "--model", model, "--csv", "--batch-size", "4"]
    local, remote = _run(args), _run([*args, "--scheduler", cluster])
    assert local.exit_code == remote.exit_code == 0, remote.output
    assert remote.stdout == local.stdout and len(local.stdout.splitlines()) == 13
