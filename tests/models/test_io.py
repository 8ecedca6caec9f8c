import io
import json
import zipfile

import numpy as np
import pytest

from breastcnn.errors import UserInputError
from breastcnn.models import create_model, load_checkpoint, load_model, save_model
from breastcnn.nn import Adam, optimizer_from_state


@pytest.fixture(scope="module")
def model():
    m = create_model("custom", input_shape=(64, 64, 3), seed=3)
    m.compile(optimizer=Adam(0.01))
    x = np.random.default_rng(0).normal(size=(4, 64, 64, 3)).astype(np.float32) * 20
    m.train_on_batch(x, np.array([0, 1, 1, 0]))  # non-trivial BN statistics and Adam state
    return m


def _x():
    return np.random.default_rng(1).normal(size=(3, 64, 64, 3)).astype(np.float32) * 20


def test_round_trip_identical_predictions(model, tmp_path):
    path = tmp_path / "m.npz"
    save_model(model, path)
    loaded = load_model(path)
    np.testing.assert_array_equal(loaded.predict(_x()), model.predict(_x()))
    assert loaded.meta == model.meta and loaded.count_params() == model.count_params()
    assert [layer.get_config() for layer in loaded.layers] == [layer.get_config() for layer in model.layers]
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed


def test_checkpoint_resume_takes_identical_step(model, tmp_path):
    path = tmp_path / "ckpt.npz"
    rng_state = np.random.default_rng(5).bit_generator.state["state"]["state"]
    save_model(model, path, optimizer=model.optimizer, extra={"epoch": 3, "rng": np.array([rng_state % 2**62])})
    loaded, opt_state, extra = load_checkpoint(path)
    assert int(extra["epoch"]) == 3 and extra["rng"].shape == (1,)
    loaded.compile(optimizer=optimizer_from_state(opt_state))
    x, y = _x(), np.array([1, 0, 1])
    original = create_model("custom", input_shape=(64, 64, 3))
    original.set_weights(model.get_weights())
    original.compile(optimizer=optimizer_from_state(model.optimizer.state_dict()))
    assert original.train_on_batch(x, y) == loaded.train_on_batch(x, y)
    for key, value in original.get_weights().items():
        np.testing.assert_array_equal(value, loaded.get_weights()[key])


def _rewrite(src, dst, mutate):
    with np.load(src, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    mutate(arrays)
    with open(dst, "wb") as handle:
        np.savez(handle, **arrays)


def _config(arrays):
    return json.loads(str(arrays["__config__"][()]))


def _set_config(arrays, config):
    arrays["__config__"] = np.array(json.dumps(config))


def test_pickled_object_array_is_refused_without_unpickling(model, tmp_path):
    good = tmp_path / "good.npz"
    save_model(model, good)
    bad = tmp_path / "pickled.npz"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with np.load(good, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["layers.0.W"] = np.array([Evil()], dtype=object)
    with open(bad, "wb") as handle:
        np.savez(handle, **arrays)  # allow_pickle defaults to True when saving
    with pytest.raises(UserInputError, match="pickled.npz: unreadable or unsafe model file"):
        load_model(bad)
    assert not marker.exists()


def test_truncated_file_is_refused(model, tmp_path):
    good = tmp_path / "good.npz"
    save_model(model, good)
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 30):
        bad = tmp_path / f"cut{cut}.npz"
        bad.write_bytes(data[:cut])
        with pytest.raises(UserInputError, match=f"cut{cut}.npz"):
            load_model(bad)


def test_wrong_shape_is_refused(model, tmp_path):
    good, bad = tmp_path / "good.npz", tmp_path / "shape.npz"
    save_model(model, good)

    def mutate(arrays):
        arrays["layers.0.W"] = np.zeros((3, 3, 3, 8), np.float32)
        config = _config(arrays)
        config["arrays"]["layers.0.W"]["shape"] = [3, 3, 3, 8]  # consistent manifest, wrong architecture
        _set_config(arrays, config)

    _rewrite(good, bad, mutate)
    with pytest.raises(UserInputError, match=r"layers.0.W has shape \(3, 3, 3, 8\).*needs \(3, 3, 3, 16\)"):
        load_model(bad)

    def lie(arrays):
        arrays["layers.3.b"] = np.zeros(5, np.float32)  # manifest still says (32,)

    _rewrite(good, bad, lie)
    with pytest.raises(UserInputError, match="layers.3.b has shape"):
        load_model(bad)


def test_missing_key_is_refused(model, tmp_path):
    good, bad = tmp_path / "good.npz", tmp_path / "missing.npz"
    save_model(model, good)
    _rewrite(good, bad, lambda arrays: arrays.pop("layers.1.moving_mean"))
    with pytest.raises(UserInputError, match="missing array.*layers.1.moving_mean"):
        load_model(bad)

    def drop_everywhere(arrays):
        arrays.pop("layers.1.moving_mean")
        config = _config(arrays)
        del config["arrays"]["layers.1.moving_mean"]
        _set_config(arrays, config)

    _rewrite(good, bad, drop_everywhere)
    with pytest.raises(UserInputError, match="missing.*layers.1.moving_mean"):
        load_model(bad)


def test_unknown_layer_class_is_refused(model, tmp_path):
    good, bad = tmp_path / "good.npz", tmp_path / "class.npz"
    save_model(model, good)

    def mutate(arrays):
        config = _config(arrays)
        config["layers"][2] = {"class": "os.system", "name": "x", "command": "touch pwned"}
        _set_config(arrays, config)

    _rewrite(good, bad, mutate)
    with pytest.raises(UserInputError, match=r"unknown layer class 'os.system'; supported: BatchNorm, Conv2D"):
        load_model(bad)


def test_not_an_npz_is_refused(tmp_path):
    for name, data in (("text.npz", b"hello, not a model"), ("empty.npz", b"")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(UserInputError, match=f"{name}: not a breastcnn model file"):
            load_model(path)
    npy = tmp_path / "array.npz"
    buf = io.BytesIO()
    np.save(buf, np.zeros(3))
    npy.write_bytes(buf.getvalue())
    with pytest.raises(UserInputError, match="not a breastcnn model file"):
        load_model(npy)
    other = tmp_path / "other.npz"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(UserInputError, match="other.npz"):
        load_model(other)
    with pytest.raises(UserInputError, match="does not exist"):
        load_model(tmp_path / "nope.npz")


def test_foreign_npz_without_config_is_refused(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, a=np.zeros(3))
    with pytest.raises(UserInputError, match="missing or malformed __config__"):
        load_model(path)


def test_object_arrays_cannot_be_saved_in_extra(model, tmp_path):
    with pytest.raises(UserInputError, match="extra.bad"):
        save_model(model, tmp_path / "x.npz", extra={"bad": np.array([{}], dtype=object)})
    assert not (tmp_path / "x.npz").exists()
