"""Task vocabularies (binary, subtype), labels from the manifest, and one image cache for every task."""

from __future__ import annotations

import numpy as np
import pytest

from breastcnn import CLASSES
from breastcnn.data import images
from breastcnn.data.breakhis import SUBTYPES, Record
from breastcnn.data.images import cache_paths, load_subset
from breastcnn.data.split import create_split, load_split
from breastcnn.data.tasks import (
    SUBTYPE_BINARY,
    SUBTYPE_CLASSES,
    SUBTYPE_TO_CLASS,
    TASK_CLASSES,
    TASKS,
    binary_probabilities,
    check_task,
    label_indices,
    subtype_to_binary,
)
from breastcnn.errors import UserInputError


def test_vocabularies_in_the_issues_order():
    assert TASKS == ("binary", "subtype")
    assert SUBTYPE_CLASSES == (
        "adenosis",
        "fibroadenoma",
        "phyllodes_tumor",
        "tubular_adenoma",
        "ductal_carcinoma",
        "lobular_carcinoma",
        "mucinous_carcinoma",
        "papillary_carcinoma",
    )
    assert SUBTYPE_CLASSES == tuple(name for _, name in SUBTYPES.values())  # the tumour codes' order, benign first
    assert TASK_CLASSES == {"binary": ("benign", "malignant"), "subtype": SUBTYPE_CLASSES}
    assert SUBTYPE_TO_CLASS == {name: label for label, name in SUBTYPES.values()}
    assert SUBTYPE_BINARY.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_check_task_names_the_option():
    assert check_task("subtype") == "subtype"
    with pytest.raises(UserInputError, match="^--task must be one of binary, subtype, got 'tissue'$"):
        check_task("tissue")


def _rec(label, subtype, i=0):
    return Record(f"{label}/{subtype}/{i}.png", label, subtype, "P1", "200X")


def test_label_indices_for_both_tasks():
    recs = [
        _rec("malignant", "papillary_carcinoma"),
        _rec("benign", "adenosis"),
        _rec("benign", "tubular_adenoma"),
        _rec("malignant", "ductal_carcinoma"),
    ]
    assert label_indices(recs).tolist() == [1, 0, 0, 1] and label_indices(recs).dtype == np.int64
    y = label_indices(recs, "subtype")
    assert y.tolist() == [7, 0, 3, 4] and y.dtype == np.int64
    assert subtype_to_binary(y).tolist() == label_indices(recs, "binary").tolist()
    assert label_indices([], "subtype").shape == (0,)


@pytest.mark.parametrize(
    "record,message",
    [
        (Record("benign/a.png", "benign", "", "", ""), "benign/a.png has no subtype"),
        (Record("benign/a.png", "benign", "sclerosing", "P", "200X"), "has subtype 'sclerosing'"),
        (
            Record("benign/a.png", "benign", "ductal_carcinoma", "P", "200X"),
            "is benign but its subtype ductal_carcinoma",
        ),
    ],
)
def test_label_indices_refuses_rows_without_a_known_subtype(record, message):
    with pytest.raises(UserInputError, match=message) as err:
        label_indices([record], "subtype", where="s/manifest.csv")
    assert str(err.value).startswith("s/manifest.csv: ") and "\n" not in str(err.value)
    assert label_indices([record], "binary").tolist() == [0]  # the binary task never reads the subtype


def test_subtype_probabilities_to_binary():
    p = np.array([[0.1, 0.2, 0.0, 0.1, 0.3, 0.1, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    assert np.allclose(binary_probabilities(p), [[0.4, 0.6], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"shape \(N, 8\)"):
        binary_probabilities(np.ones((2, 2)))
    with pytest.raises(ValueError, match="0..7"):
        subtype_to_binary(np.array([8]))


def test_one_cache_serves_both_tasks_without_a_second_decode(multimag_tree, tmp_path, monkeypatch):
    create_split(multimag_tree, "all", out=tmp_path / "s", seed=0)
    split = load_split(tmp_path / "s")
    x, y = load_subset(split, "train", 8)  # builds the cache (decodes every image once)
    cache_files = sorted(p.name for p in (tmp_path / "s" / "cache").iterdir())

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded again for another task")

    monkeypatch.setattr(images, "decode_many", no_decoding)
    x8, y8 = load_subset(split, "train", 8, task="subtype")
    assert np.array_equal(x8, x) and y8.dtype == np.int64
    assert y8.tolist() == [SUBTYPE_CLASSES.index(r.subtype) for r in split.subset("train")]
    assert np.array_equal(y8, split.labels("train", task="subtype")) and set(y8.tolist()) == set(range(8))
    assert np.array_equal(subtype_to_binary(y8), y)
    x2, y2 = load_subset(split, "train", 8, task="binary")
    assert np.array_equal(x2, x) and np.array_equal(y2, y) and y.tolist() == [r.y for r in split.subset("train")]
    assert sorted(p.name for p in (tmp_path / "s" / "cache").iterdir()) == cache_files  # nothing new written
    assert cache_paths(split, "train", 8)[1].is_file()  # y.npy: binary, as before


def test_subtype_labels_of_a_folder_tree_are_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import Image

    for label in CLASSES:
        (tmp_path / "d" / label).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8), (i * 40, 10, 10)).save(tmp_path / "d" / label / f"{i}.png")
    create_split(tmp_path / "d", "200X", out=tmp_path / "s")
    split = load_split(tmp_path / "s")
    monkeypatch.setattr(images, "decode_many", lambda *a, **k: pytest.fail("decoded before the labels were checked"))
    with pytest.raises(UserInputError, match=r"manifest\.csv: .* has no subtype .*BreakHis-layout split"):
        load_subset(split, "train", 8, task="subtype")
    with pytest.raises(UserInputError, match="--task"):
        load_subset(split, "train", 8, task="tissue")
    assert split.magnifications("train") == [""] * len(split.subset("train"))
