"""Splits: patient disjointness, ratios, stratification, determinism, k-fold, overwrite rules."""

from __future__ import annotations

import pytest

from breastcnn.data.breakhis import Record
from breastcnn.data.split import (
    MANIFEST_COLUMNS,
    create_split,
    fold_dirs,
    load_split,
    parse_ratios,
    split_by_image,
    split_by_patient,
)
from breastcnn.errors import UserInputError


def _records(n_benign=24, n_malignant=58, seed=0):
    """BreakHis-like records: patients with very uneven image counts."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for label, n in (("benign", n_benign), ("malignant", n_malignant)):
        for p in range(n):
            patient = f"SOB_{label[0].upper()}_X_14-{p:05d}"
            for i in range(int(rng.integers(3, 60))):
                out.append(Record(f"{label}/{patient}/{i:03d}.png", label, "x", patient, "200X"))
    return out


def test_patient_split_is_disjoint_stratified_and_close_to_ratios():
    records = _records()
    rows = split_by_patient(records, (0.8, 0.1, 0.1), seed=3)
    assert len(rows) == len(records)
    subsets_of = {}
    for r in rows:
        subsets_of.setdefault(r.patient, set()).add(r.split)
    assert all(len(s) == 1 for s in subsets_of.values())  # no patient in two subsets
    for label in ("benign", "malignant"):
        part = [r for r in rows if r.label == label]
        for subset, ratio in zip(("train", "val", "test"), (0.8, 0.1, 0.1), strict=True):
            share = sum(r.split == subset for r in part) / len(part)
            assert abs(share - ratio) < 0.03, (label, subset, share)
            assert any(r.split == subset for r in part)  # every subset sees every class


def test_patient_split_deterministic_and_seed_dependent():
    records = _records()
    a = split_by_patient(records, seed=1)
    assert a == split_by_patient(records, seed=1)
    assert a != split_by_patient(records, seed=2)


def test_image_split_per_class_ratios_and_leaks():
    records = _records()
    rows = split_by_image(records, (0.8, 0.1, 0.1), seed=0)
    for label in ("benign", "malignant"):
        part = [r for r in rows if r.label == label]
        n_train = sum(r.split == "train" for r in part)
        assert n_train == round(0.8 * len(part))
    leaked = {r.patient for r in rows if r.split == "train"} & {r.patient for r in rows if r.split == "test"}
    assert leaked  # the report's protocol leaks patients: that is why it is not the default


@pytest.mark.parametrize("bad", ["0.8,0.1", "0.5,0.5,0.5", "a,b,c", "0.8,0.2,0", "1,0,0,0", "-0.1,0.6,0.5"])
def test_parse_ratios_rejects(bad):
    if bad == "0.8,0.1":
        with pytest.raises(UserInputError):
            parse_ratios(bad)  # 2 values = train,test must sum to 1
    else:
        with pytest.raises(UserInputError, match="--ratios"):
            parse_ratios(bad)


def test_parse_ratios_two_values_mean_train_test():
    assert parse_ratios("0.7,0.3") == (0.7, 0.0, 0.3)


def test_create_split_files_determinism_and_source_untouched(breakhis_tree, tmp_path, tree_digest):
    before = tree_digest(breakhis_tree)
    info = create_split(breakhis_tree, "200X", out=tmp_path / "s1", seed=5)
    create_split(breakhis_tree, "200X", out=tmp_path / "s2", seed=5)
    m1 = (tmp_path / "s1" / "manifest.csv").read_bytes()
    assert m1 == (tmp_path / "s2" / "manifest.csv").read_bytes()  # byte-identical
    assert m1.decode().splitlines()[0] == ",".join(MANIFEST_COLUMNS)
    assert tree_digest(breakhis_tree) == before
    split = load_split(tmp_path / "s1")
    assert split.root == breakhis_tree.resolve() and split.hash == info["manifest_hash"]
    assert len(split.rows) == info["n_images"]
    assert {r.y for r in split.subset("test")} == {0, 1}
    assert all((split.root / r.path).is_file() for r in split.rows)
    assert not any("091.png" in r.path for r in split.rows)  # truncated PNG left out
    assert fold_dirs(tmp_path / "s1") == []


def test_create_split_refuses_overwrite_and_force_clears(breakhis_tree, tmp_path):
    out = tmp_path / "s"
    create_split(breakhis_tree, "200X", out=out, materialize="copy")
    assert any((out / "train" / "benign").iterdir())
    with pytest.raises(UserInputError, match="--force"):
        create_split(breakhis_tree, "200X", out=out)
    stale = out / "test" / "malignant" / "stale.png"
    stale.write_bytes(b"x")
    create_split(breakhis_tree, "200X", out=out, seed=9, force=True, materialize="none")
    # old materialized files do not survive (report defect 11); a file the split did not write does (issue 11)
    assert [p for p in out.rglob("*") if p.is_file() and p.parent != out] == [stale]
    assert not (out / "train").exists() and not (out / "val").exists()


def test_strict_fails_on_unreadable(breakhis_tree, tmp_path):
    with pytest.raises(UserInputError, match="unreadable"):
        create_split(breakhis_tree, "200X", out=tmp_path / "s", strict=True)


def test_out_inside_data_tree_refused(breakhis_tree):
    with pytest.raises(UserInputError, match="inside the data tree"):
        create_split(breakhis_tree, "200X", out=breakhis_tree / "histology_slides" / "splits")


def test_kfold(breakhis_tree, tmp_path):
    info = create_split(breakhis_tree, "200X", out=tmp_path / "k", folds=3, seed=1)
    dirs = fold_dirs(tmp_path / "k")
    assert [d.name for d in dirs] == ["fold1", "fold2", "fold3"] and info["kind"] == "kfold"
    tests = []
    for d in dirs:
        s = load_split(d)
        assert {r.split for r in s.rows} == {"train", "test"}
        assert not {r.patient for r in s.subset("train")} & {r.patient for r in s.subset("test")}
        tests.append(frozenset(r.patient for r in s.subset("test")))
    assert len(set(tests)) > 1  # folds differ
    with pytest.raises(UserInputError, match="fold1"):
        load_split(tmp_path / "k")


def test_accession_grouping_keeps_shared_accessions_together():
    recs = [
        Record(f"b/{p}/{i}.png", "benign", "a", p, "200X")
        for p in ("SOB_B_A_14-22549AB", "SOB_B_A_14-22549G", "SOB_B_A_14-1", "SOB_B_A_14-2", "SOB_B_A_14-3")
        for i in range(5)
    ]
    for seed in range(5):
        rows = split_by_patient(recs, (0.6, 0.2, 0.2), seed=seed, group="accession")
        assert len({r.split for r in rows if "22549" in r.patient}) == 1


def test_load_split_errors(tmp_path):
    with pytest.raises(UserInputError, match="breastcnn split"):
        load_split(tmp_path)
    (tmp_path / "manifest.csv").write_text("a,b\n")
    with pytest.raises(UserInputError, match="header"):
        load_split(tmp_path)
