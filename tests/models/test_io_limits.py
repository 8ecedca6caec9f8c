"""Issue 11, items 2, 8 and 10: a model file is checked before it costs memory, and its values are sane.

Item 8: key list, declared shapes and ``.npy`` headers are compared with the architecture before any
member is decompressed or any layer allocated; what a file may declare is capped. Each hostile file
must be refused with a ``UserInputError`` quickly and within a small memory bound (``tracemalloc``
peak, which NumPy's allocations report to). Item 2: BatchNorm variances must be >= 0, everything
finite, and ``predict`` never prints NaN. Item 10: device paths and non-zip ``.keras`` files are named
for what they are.
"""

from __future__ import annotations

import io
import json
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from breastcnn.cli.app import app
from breastcnn.errors import UserInputError
from breastcnn.models import create_model, load_model, save_model

MEMORY_BOUND = 4 * 2**20
"""Peak bytes (tracemalloc) a refused hostile file may cost; the refused files declare 256 MB to 3.6 TiB."""


def _run(args):
    return CliRunner().invoke(app, args, env={"BREASTCNN_NO_PROGRESS": "1"})


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A small valid model file (custom at 64 px)."""
    path = tmp_path_factory.mktemp("io_limits") / "good.npz"
    save_model(create_model("custom", input_shape=(64, 64, 3), seed=0), path)
    return path


def _members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _header_only(shape, descr="<f4", payload=b"\0" * 64) -> bytes:
    """An .npy member whose header declares ``shape`` followed by a few bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue() + payload


def _config(members) -> dict:
    return json.loads(str(np.load(io.BytesIO(members["__config__.npy"]))[()]))


def _with_config(members, config) -> dict:
    return {**members, "__config__.npy": _npy(np.array(json.dumps(config)))}


def _write(path, members, bomb: tuple[str, int] | None = None) -> None:
    """Write ``members`` as a deflated zip; ``bomb=(name, n_bytes)`` adds a member of zeros streamed in."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if bomb is not None:
            name, size = bomb
            with zf.open(name, "w", force_zip64=True) as handle:
                handle.write(_header_only((size // 4,), payload=b""))
                chunk = bytes(2**22)
                for _ in range(size // len(chunk)):
                    handle.write(chunk)


def _refused_cheaply(path, match: str) -> tuple[float, int]:
    """Assert load_model(path) raises UserInputError matching ``match``; return (seconds, peak bytes)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(UserInputError, match=match):
            load_model(path)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"refusing {path.name} cost {peak / 2**20:.1f} MiB"
    assert seconds < 10, f"refusing {path.name} took {seconds:.1f} s"
    return seconds, peak


# --------------------------------------------------------------------------- item 8


@pytest.mark.slow  # (0.8 s)
def test_zip_bomb_member_is_refused_before_decompression(good, tmp_path):
    bad = tmp_path / "bomb.npz"
    _write(bad, _members(good), bomb=("extra.bomb.npy", 256 * 2**20))
    assert bad.stat().st_size < 2 * 2**20  # 256 MB of zeros deflate to a few hundred KB
    _refused_cheaply(bad, "bomb.npz: unexpected array.*extra.bomb")


@pytest.mark.slow  # (0.8 s)
def test_declared_zip_bomb_is_refused_by_the_caps(good, tmp_path):
    members = _members(good)
    config = _config(members)
    config["arrays"]["extra.bomb"] = {"shape": [64 * 2**20], "dtype": "<f4"}
    bad = tmp_path / "declared.npz"
    _write(bad, _with_config(members, config), bomb=("extra.bomb.npy", 256 * 2**20))
    _refused_cheaply(bad, "declared.npz: .*extra.bomb")


@pytest.mark.parametrize("side", [1024, 6800, 16384])
def test_doctored_input_shape_is_refused_before_building(good, tmp_path, side):
    members = _members(good)
    config = _config(members)
    config["input_shape"] = [side, side, 3]
    bad = tmp_path / f"shape{side}.npz"
    _write(bad, _with_config(members, config))
    _refused_cheaply(bad, f"shape{side}.npz: ")


def test_npy_header_claiming_terabytes_is_refused(good, tmp_path):
    members = _members(good)
    members["layers.0.W.npy"] = _header_only((10**12,))  # 3.6 TiB of float32
    bad = tmp_path / "header.npz"
    _write(bad, members)
    _refused_cheaply(bad, r"header.npz: .*layers.0.W")
    config = _config(members)
    config["arrays"]["layers.0.W"]["shape"] = [10**12]  # the config agrees with the header: still refused
    _write(bad, _with_config(members, config))
    _refused_cheaply(bad, r"header.npz: .*layers.0.W")


def test_huge_dense_width_is_refused(good, tmp_path):
    members = _members(good)
    config = _config(members)
    dense = next(i for i, layer in enumerate(config["layers"]) if layer["class"] == "Dense")
    config["layers"][dense]["units"] = 10**9  # the arrays still declare 128 units
    bad = tmp_path / "wide.npz"
    _write(bad, _with_config(members, config))
    _refused_cheaply(bad, r"wide.npz: .*(units|parameters)")


def test_too_many_layers_and_huge_config_are_refused(good, tmp_path):
    members = _members(good)
    config = _config(members)
    config["layers"] = (
        config["layers"][:-1] + [{"class": "ReLU", "name": f"r{i}"} for i in range(5000)] + config["layers"][-1:]
    )
    bad = tmp_path / "deep.npz"
    _write(bad, _with_config(members, config))
    _refused_cheaply(bad, "deep.npz: .*layers")
    members["__config__.npy"] = _header_only((), descr=f"<U{10**9}")  # a 4 GB JSON string
    _write(bad, members)
    _refused_cheaply(bad, "deep.npz: .*__config__")


@pytest.mark.parametrize("size", [10**6, "64", 32])
def test_meta_image_size_must_match_the_input_shape(good, tmp_path, size):
    """``meta.image_size`` decides how large inference resizes images: it must be the model's input size."""
    members = _members(good)
    config = _config(members)
    config["meta"]["image_size"] = size
    bad = tmp_path / "meta.npz"
    _write(bad, _with_config(members, config))
    _refused_cheaply(bad, "meta.npz: .*image_size")


def test_a_real_model_still_loads_and_costs_what_its_arrays_cost(good):
    tracemalloc.start()
    try:
        model = load_model(good)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    n_bytes = 4 * sum(model.count_params().values())
    assert peak < 8 * n_bytes + 4 * 2**20  # arrays, the built model, bookkeeping: no hidden copies


def test_parameter_shapes_match_what_build_allocates():
    """The loader computes parameter shapes without building; they must be the ones build() makes."""
    from breastcnn.models.io import _parameter_shapes
    from breastcnn.nn.layers import layer_from_config

    layers = [layer for arch in ("custom", "custom-k4") for layer in create_model(arch, input_shape=(64, 64, 3)).layers]
    rng = np.random.default_rng(0)
    for cfg, shape in (
        ({"class": "Conv2D", "filters": 5, "kernel_size": 3, "use_bias": False}, (9, 9, 2)),
        ({"class": "Dense", "units": 7, "use_bias": False}, (11,)),
        ({"class": "Dense", "units": 7}, (11,)),
    ):
        layer = layer_from_config(cfg)
        layer.build(shape, rng)
        layers.append(layer)
    classes = set()
    for layer in layers:
        built = {k: v.shape for store in (layer.params, layer.state) for k, v in store.items()}
        assert _parameter_shapes(layer, layer.input_shape) == built, layer
        classes.add(type(layer).__name__)
    assert {"Conv2D", "BatchNorm", "Dense", "ReLU", "MaxPool2D", "Flatten", "Softmax"} <= classes


# --------------------------------------------------------------------------- item 2


def _rewrite_array(src, dst, key, change):
    members = _members(src)
    arr = np.load(io.BytesIO(members[f"{key}.npy"]))
    members[f"{key}.npy"] = _npy(change(arr).astype(arr.dtype))
    _write(dst, members)


def test_negative_moving_variance_is_refused(good, tmp_path):
    bad = tmp_path / "variance.npz"
    _rewrite_array(good, bad, "layers.1.moving_variance", lambda v: -np.abs(v) - 1)
    with pytest.raises(UserInputError, match=r"variance.npz: layers.1.moving_variance .*negative"):
        load_model(bad)
    image = tmp_path / "x.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(image)
    for args in (
        ["predict", "--model", str(bad), str(image), "--json"],
        ["featuremaps", "--model", str(bad), str(image), "--out", str(tmp_path / "maps")],
    ):
        result = _run(args)
        assert result.exit_code == 2, result.output
        assert "NaN" not in result.stdout and result.stderr.count("\n") <= 2
        assert "variance.npz" in result.stderr


def test_predict_never_prints_nan(good, tmp_path):
    """A model with finite but huge weights overflows to inf/NaN: predict names the model, prints no NaN."""
    bad = tmp_path / "overflow.npz"
    members = _members(good)
    for key in ("layers.11.W", "layers.13.W"):
        arr = np.load(io.BytesIO(members[f"{key}.npy"]))
        members[f"{key}.npy"] = _npy((np.sign(arr) * 3e38).astype(np.float32))
    _write(bad, members)
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    for fmt in ("--json", "--csv"):
        result = _run(["predict", "--model", str(bad), str(image), fmt])
        assert result.exit_code != 0, result.output
        assert "nan" not in result.stdout.lower() and "inf" not in result.stdout.lower()
        assert "overflow.npz" in result.stderr


# --------------------------------------------------------------------------- item 10


def test_device_path_as_model_is_named_as_such():
    result = _run(["predict", "--model", "/dev/zero", "x.png"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "/dev/zero" in result.stderr and "not a regular file" in result.stderr
    with pytest.raises(UserInputError, match="/dev/zero: not a regular file"):
        load_model("/dev/zero")


@pytest.mark.keras
def test_text_or_truncated_keras_file_is_named(tmp_path, keras):
    from breastcnn.models.keras_models import create_custom_keras, sidecar_path

    good = tmp_path / "good" / "model.keras"
    create_custom_keras(input_shape=(64, 64, 3)).save(good)
    for name, data in (("text", b"this is not a model\n"), ("cut", good.read_bytes()[:2000])):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.keras").write_bytes(data)
        (folder / "model.keras.json").write_bytes(sidecar_path(good).read_bytes())
        with pytest.raises(UserInputError) as info:
            load_model(folder / "model.keras")
        message = str(info.value)
        assert str(folder / "model.keras") in message and "not found" not in message.lower(), message
        assert "zip" in message or "truncated" in message, message
