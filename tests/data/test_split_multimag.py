"""Splits over several magnifications, stratified by subtype (issue 13, "Tasks and magnifications")."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest

from breastcnn.data.breakhis import MAGNIFICATIONS, Record, mags_label, parse_mags, scan
from breastcnn.data.split import (
    SUBSETS,
    create_split,
    fold_dirs,
    load_split,
    manifest_hash,
    manifest_text,
    split_by_image,
    split_by_patient,
)
from breastcnn.data.synth import REAL_PATIENTS
from breastcnn.data.tasks import SUBTYPE_CLASSES
from breastcnn.errors import UserInputError
from tests.data.plans import plan_records

ALL = MAGNIFICATIONS


def _subsets_of(rows) -> dict[str, set[str]]:
    where = defaultdict(set)
    for r in rows:
        where[r.patient].add(r.split)
    return where


def _patients(rows, subtype: str, subset: str) -> int:
    return len({r.patient for r in rows if r.subtype == subtype and r.split == subset})


# --------------------------------------------------------------------------- --mag parsing


@pytest.mark.parametrize(
    "text,expected",
    [
        ("all", ALL),
        ("ALL", ALL),
        ("200X", ("200X",)),
        ("200", ("200X",)),
        ("200x,40", ("40X", "200X")),
        ("40X,200X", ("40X", "200X")),
        ("400X+40X", ("40X", "400X")),
        ("40X, 100X ,40X", ("40X", "100X")),
        ("40X,100X,200X,400X", ALL),
        (["200X", "40X"], ("40X", "200X")),
    ],
)
def test_parse_mags(text, expected):
    assert parse_mags(text) == expected


@pytest.mark.parametrize("bad", ["250X", "40X,250X", "40X,", "all,40X", "", "40X;200X"])
def test_parse_mags_rejects_naming_the_option_and_valid_values(bad):
    with pytest.raises(UserInputError, match=r"^--mag: unknown magnification .*40X, 100X, 200X, 400X.*or all$"):
        parse_mags(bad)
    with pytest.raises(UserInputError, match="^--mag must name at least one"):
        parse_mags([])


def test_mags_label_names_the_selection():
    assert [mags_label(m) for m in (("200X",), ALL, ("200X", "40X"), ("40X", "100X", "200X"))] == [
        "200X",
        "all",
        "40X+200X",
        "40X+100X+200X",
    ]
    assert parse_mags(mags_label(("40X", "200X"))) == ("40X", "200X")  # the name reads back


def test_scan_keeps_the_selected_magnifications(multimag_tree):
    found = scan(multimag_tree, "40X,400X", verify=False).records
    assert {r.magnification for r in found} == {"40X", "400X"} and len(found) == 2 * 82
    assert (
        len(scan(multimag_tree, None, verify=False).records)
        == 4 * 82
        == len(scan(multimag_tree, "all", verify=False).records)
    )


# --------------------------------------------------------------------------- patient-wise over magnifications


def test_all_magnifications_one_subset_per_patient(multimag_tree, tmp_path):
    info = create_split(multimag_tree, "all", out=tmp_path / "s", seed=2)
    split = load_split(tmp_path / "s")
    assert len(split.rows) == 4 * 82 and info["n_patients"] == 82
    assert all(len(s) == 1 for s in _subsets_of(split.rows).values())  # no patient in two subsets
    mags_of = defaultdict(set)
    for r in split.rows:
        mags_of[r.patient].add(r.magnification)
    assert all(m == set(ALL) for m in mags_of.values())  # each patient's 4 magnifications, all in its subset
    for subset in SUBSETS:
        assert info["images_by_magnification"][subset] == {
            m: sum(r.magnification == m for r in split.subset(subset)) for m in ALL
        }
    saved = json.loads((tmp_path / "s" / "split.json").read_text())
    assert saved["magnification"] == "all" and saved["magnifications"] == list(ALL)
    assert saved["stratify"] == "subtype" and saved["manifest_hash"] == split.hash


def test_mag_list_split_and_default_out(multimag_tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    info = create_split(multimag_tree, "200X,40X", seed=0)
    assert info["out"] == "splits/40X+200X" and info["magnification"] == "40X+200X"
    assert info["magnifications"] == ["40X", "200X"]
    split = load_split("splits/40X+200X")
    assert {r.magnification for r in split.rows} == {"40X", "200X"} and len(split.rows) == 2 * 82
    assert all(len(s) == 1 for s in _subsets_of(split.rows).values())
    assert create_split(multimag_tree, "all", seed=0)["out"] == "splits/all"
    assert create_split(multimag_tree, "400", seed=0)["out"] == "splits/400X"


def test_single_magnification_keeps_its_split_json_meaning(breakhis_tree, tmp_path):
    info = create_split(breakhis_tree, "200X", out=tmp_path / "s")
    assert info["magnification"] == "200X" and info["magnifications"] == ["200X"]
    assert {r.magnification for r in load_split(tmp_path / "s").rows} == {"200X"}


def test_a_selected_magnification_without_images_is_warned_about(breakhis_tree, tmp_path):
    info = create_split(breakhis_tree, "40X,100X", out=tmp_path / "s")  # the tree has 200X and 40X only
    assert info["magnifications"] == ["40X"] and info["magnification"] == "40X+100X"
    assert any("no 100X images" in w for w in info["warnings"])


def test_kfold_over_several_magnifications(multimag_tree, tmp_path):
    info = create_split(multimag_tree, "40X,200X", out=tmp_path / "k", folds=3, seed=4)
    assert info["kind"] == "kfold" and info["magnifications"] == ["40X", "200X"]
    tests = []
    for fold in fold_dirs(tmp_path / "k"):
        rows = load_split(fold).rows
        assert {r.split for r in rows} == {"train", "test"} and len(rows) == 2 * 82
        assert all(len(s) == 1 for s in _subsets_of(rows).values())
        for subtype in SUBTYPE_CLASSES:  # every subtype has >= 3 patients: train and test each get one
            assert _patients(rows, subtype, "train") >= 1 and _patients(rows, subtype, "test") >= 1, subtype
        tests.append(frozenset(r.patient for r in rows if r.split == "test"))
    assert len(set(tests)) == 3  # the folds differ


def test_image_split_and_accession_grouping_over_several_magnifications(multimag_tree, tmp_path):
    info = create_split(multimag_tree, "all", out=tmp_path / "i", by="image", seed=1)
    rows = load_split(tmp_path / "i").rows
    assert len(rows) == 4 * 82 and info["leaks_patients"] and info["stratify"] is None
    assert any(len(s) > 1 for s in _subsets_of(rows).values())  # the report's protocol leaks patients
    create_split(multimag_tree, "all", out=tmp_path / "a", group="accession", seed=1)
    rows = load_split(tmp_path / "a").rows
    trio = {r.split for r in rows if "14-22549" in r.patient}  # three slide folders, one accession number
    assert len({r.patient for r in rows if "14-22549" in r.patient}) == 3 and len(trio) == 1


def test_manifest_round_trip_labels_and_magnifications(multimag_tree, tmp_path):
    create_split(multimag_tree, "all", out=tmp_path / "s", seed=3)
    split = load_split(tmp_path / "s")
    lines = (tmp_path / "s" / "manifest.csv").read_text().splitlines()
    assert lines[0] == "path,label,subtype,patient,magnification,split"
    by_path = {line.split(",")[0]: line.split(",") for line in lines[1:]}
    for subset in SUBSETS:
        rows = split.subset(subset)
        cols = [by_path[r.path] for r in rows]
        assert split.magnifications(subset) == [c[4] for c in cols]
        assert split.labels(subset, task="subtype").tolist() == [SUBTYPE_CLASSES.index(c[2]) for c in cols]
        assert split.labels(subset).tolist() == [("benign", "malignant").index(c[1]) for c in cols]
        assert np.array_equal(split.labels(subset, task="binary"), split.labels(subset))
    # the manifest is written from the rows it reads back as, byte for byte
    assert manifest_text(split.rows) == (tmp_path / "s" / "manifest.csv").read_text()


def test_same_seed_same_bytes_other_seed_other_split(multimag_tree, tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        create_split(multimag_tree, "all", out=tmp_path / name, seed=seed)
    a, b, c = ((tmp_path / n / "manifest.csv").read_bytes() for n in "abc")
    assert a == b and a != c


# --------------------------------------------------------------------------- stratification by subtype


@pytest.mark.parametrize("mags", [("200X",), ALL], ids=["200X", "all"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_subset_gets_every_subtype_and_ratios_hold(mags, seed):
    """Full-scale synthetic counts (2,013 images at 200X, 7,909 at all four): every subset has a patient of
    each subtype (all have >= 3 patients); benign ratios are as close as that allows, malignant within 0.2%."""
    records = plan_records(1.0, mags)
    rows = split_by_patient(records, (0.8, 0.1, 0.1), seed=seed)
    assert all(len(s) == 1 for s in _subsets_of(rows).values())
    for subtype in SUBTYPE_CLASSES:
        for subset in SUBSETS:
            assert _patients(rows, subtype, subset) >= 1, (subtype, subset)
    # benign: val and test each need a patient of 4 subtypes; their smallest two per subtype set the floor
    sizes = defaultdict(lambda: defaultdict(int))
    for r in records:
        sizes[r.subtype][r.patient] += 1
    benign = [r for r in rows if r.label == "benign"]
    floor = sum(sum(sorted(sizes[t].values())[:2]) for t in SUBTYPE_CLASSES[:4])
    assert floor > 0.2 * len(benign)  # on these counts the subtype rule costs benign train images...
    assert sum(r.split == "train" for r in benign) == len(benign) - floor  # ... no more than it must
    for subset in ("val", "test"):
        assert 0.1 <= sum(r.split == subset for r in benign) / len(benign) < 0.115
    malignant = [r for r in rows if r.label == "malignant"]
    for subset, ratio in zip(SUBSETS, (0.8, 0.1, 0.1), strict=True):
        assert abs(sum(r.split == subset for r in malignant) / len(malignant) - ratio) < 0.002
    for m in mags:  # a patient's magnifications travel together; each magnification is still split ~80/10/10
        at = [r for r in rows if r.magnification == m]
        for subset, ratio in zip(SUBSETS, (0.8, 0.1, 0.1), strict=True):
            assert abs(sum(r.split == subset for r in at) / len(at) - ratio) < 0.015


@pytest.mark.parametrize("mags", [("200X",), ALL], ids=["200X", "all"])
@pytest.mark.slow  # five-fold splits of every magnification (0.7 s)
def test_folds_keep_each_subtypes_image_ratio(mags):
    """70/30 (the Spanhol protocol): each subtype's images are split close to 70/30 too (0.1.0: up to 59 points
    off), while the class ratios stay within 0.2 points."""
    records = plan_records(1.0, mags)
    worst_old = 0.0
    for seed in range(3):
        rows = split_by_patient(records, (0.7, 0.0, 0.3), seed=seed)
        old = split_by_patient(records, (0.7, 0.0, 0.3), seed=seed, stratify="class")
        for group in (*SUBTYPE_CLASSES, "benign", "malignant"):
            part = [r for r in rows if group in (r.subtype, r.label)]
            share = sum(r.split == "test" for r in part) / len(part)
            assert abs(share - 0.3) < (0.12 if group in SUBTYPE_CLASSES else 0.002), (seed, group, share)
            if group in SUBTYPE_CLASSES:
                before = [r for r in old if r.subtype == group]
                worst_old = max(worst_old, abs(sum(r.split == "test" for r in before) / len(before) - 0.3))
    assert worst_old > 0.2


def test_polish_step_changes_match_the_recomputed_distance():
    """The vectorised change of every move and swap equals the distance recomputed after the step."""
    from breastcnn.data.split import _distance, _step_changes

    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(2, 10))
        counts = rng.integers(1, 50, n).astype(np.float64)
        strata = np.unique(rng.integers(0, 3, n), return_inverse=True)[1]
        ratios = np.array([0.8, 0.1, 0.1]) if rng.random() < 0.7 else np.array([0.7, 0.0, 0.3])
        choice = rng.integers(0, 3, n)
        for norm in (np.abs, np.square):
            move, swap = _step_changes(choice, counts, ratios, strata, norm)
            base = _distance(choice, counts, ratios, strata, norm)
            steps = 0
            for i in range(n):
                for s in np.flatnonzero(np.isfinite(move[i])):
                    after = choice.copy()
                    after[i] = s
                    assert _distance(after, counts, ratios, strata, norm) - base == pytest.approx(move[i, s], abs=1e-6)
                    steps += 1
                for j in np.flatnonzero(np.isfinite(swap[i])):
                    after = choice.copy()
                    after[i], after[j] = choice[j], choice[i]
                    assert _distance(after, counts, ratios, strata, norm) - base == pytest.approx(swap[i, j], abs=1e-6)
                    assert i < j and choice[i] != choice[j]
                    steps += 1
            assert steps == np.isfinite(move).sum() + np.isfinite(swap).sum() > 0
            assert not np.isfinite(move[:, ratios == 0]).any()  # never into a subset with ratio 0


def test_class_only_stratification_misses_subtypes_that_subtype_stratification_covers():
    """The behaviour of 0.1.0 (per class only) leaves subsets without some subtype for every one of these seeds."""
    records = plan_records(1.0, ("200X",))
    for seed in range(3):
        old = split_by_patient(records, (0.8, 0.1, 0.1), seed=seed, stratify="class")
        assert any(_patients(old, t, s) == 0 for t in SUBTYPE_CLASSES for s in SUBSETS)


@pytest.mark.slow  # (0.6 s)
def test_stratify_class_reproduces_the_splits_of_0_1_0():
    """Same data, same seed, ``stratify="class"``: the manifests breastcnn 0.1.0 wrote, byte for byte."""
    pinned = {
        (1.0, ("200X",), (0.8, 0.1, 0.1), 0): "daeca659c1438acdaaf754aa8b140bf6fc5b0f931572952de2731a052fb5acdb",
        (1.0, ALL, (0.8, 0.1, 0.1), 0): "c4d3484c2c24f1f6ae269669c7116d3f9a4f7738a6d7b401b1b3239325032fa9",
        (0.1, ("200X",), (0.7, 0.0, 0.3), 3): "b49461fd60be18507c4bcff920bd584e655db6b07c91f554e8b36495d10e81f0",
    }
    for (scale, mags, ratios, seed), digest in pinned.items():
        rows = split_by_patient(plan_records(scale, mags), ratios, seed=seed, stratify="class")
        assert manifest_hash(manifest_text(rows)) == digest, (scale, mags, ratios, seed)
        default = split_by_patient(plan_records(scale, mags), ratios, seed=seed)
        assert manifest_hash(manifest_text(default)) != digest  # the default changed: see the CHANGELOG


def test_one_subtype_per_class_gives_the_same_split_either_way(breakhis_tree):
    """A tree with one subtype per class (the tests' fixture): subtype strata are the classes, nothing changes."""
    records = scan(breakhis_tree, "200X").records
    for seed in range(3):
        assert split_by_patient(records, seed=seed) == split_by_patient(records, seed=seed, stratify="class")


def _records(spec: dict[tuple[str, str], list[int]]) -> list[Record]:
    """Records from ``{(label, subtype): [images of each patient]}``, at 200X."""
    out = []
    for (label, subtype), sizes in spec.items():
        for p, n in enumerate(sizes):
            patient = f"SOB_{label[0].upper()}_X_14-{subtype[:3]}{p:03d}"
            out += [Record(f"{label}/{patient}/{i:03d}.png", label, subtype, patient, "200X") for i in range(n)]
    return out


def test_a_subtype_with_fewer_patients_than_subsets_goes_to_train_first():
    records = _records(
        {
            ("benign", "adenosis"): [30, 5],
            ("benign", "fibroadenoma"): [20, 22, 18, 25, 9, 14, 30],
            ("benign", "phyllodes_tumor"): [12],
            ("malignant", "ductal_carcinoma"): [40, 3, 20, 33, 17, 9, 11],
            ("malignant", "lobular_carcinoma"): [8, 6],
        }
    )
    for seed in range(10):
        rows = split_by_patient(records, (0.8, 0.1, 0.1), seed=seed)
        for subtype in ("adenosis", "phyllodes_tumor", "lobular_carcinoma"):
            assert _patients(rows, subtype, "train") >= 1, (seed, subtype)
        for subtype in ("adenosis", "lobular_carcinoma"):  # two patients: train and one other subset
            assert len({r.split for r in rows if r.subtype == subtype}) == 2
        for subtype in ("fibroadenoma", "ductal_carcinoma"):
            assert all(_patients(rows, subtype, s) >= 1 for s in SUBSETS)


def test_subtype_split_is_deterministic_and_seed_dependent():
    records = plan_records(1.0, ("200X",))
    a = split_by_patient(records, seed=5)
    assert a == split_by_patient(records, seed=5) and a != split_by_patient(records, seed=6)


def test_stratify_rejects_unknown_values(multimag_tree, tmp_path):
    with pytest.raises(UserInputError, match="^--stratify must be one of subtype, class, got 'tissue'$"):
        split_by_patient(plan_records(0.1), stratify="tissue")
    with pytest.raises(UserInputError, match="--stratify"):
        create_split(multimag_tree, "all", out=tmp_path / "s", stratify="tissue")
    assert not (tmp_path / "s").exists()


def test_image_split_over_several_magnifications_cuts_each_class():
    """``--by image`` stays the report's per-class cut of the images; over several magnifications it sees more."""
    every = split_by_image(plan_records(0.1, ALL), seed=0)
    assert {r.magnification for r in every} == set(ALL) and len(every) == len(plan_records(0.1, ALL))
    for label in ("benign", "malignant"):
        part = [r for r in every if r.label == label]
        for subset, upto in (("train", 0.8), ("val", 0.9)):
            cut = round(upto * len(part)) - (round(0.8 * len(part)) if subset == "val" else 0)
            assert sum(r.split == subset for r in part) == cut


def test_summary_counts_by_subtype(multimag_tree, tmp_path):
    info = create_split(multimag_tree, "200X", out=tmp_path / "s", seed=0)
    split = load_split(tmp_path / "s")
    for subset in SUBSETS:
        assert list(info["patients_by_subtype"][subset]) == list(SUBTYPE_CLASSES)  # label order
        for t in SUBTYPE_CLASSES:
            assert info["patients_by_subtype"][subset][t] == _patients(split.rows, t, subset) >= 1
            assert info["images_by_subtype"][subset][t] == sum(r.subtype == t for r in split.subset(subset))
    total = sum(REAL_PATIENTS.values())
    assert sum(sum(info["patients_by_subtype"][s].values()) for s in SUBSETS) == total
