"""Synthetic BreakHis-layout data: plan (counts, patients), names, determinism, tree safety."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from breastcnn.data import synth
from breastcnn.data.breakhis import FILE_NAME_RE, MAGNIFICATIONS, SUBTYPES, scan
from breastcnn.errors import UserInputError


def test_plan_full_scale_has_real_counts():
    specs = synth.plan(1.0, MAGNIFICATIONS)
    counts = Counter((s.magnification, s.patient.label) for s in specs)
    assert counts[("200X", "benign")] == 623 and counts[("200X", "malignant")] == 1390
    assert counts[("40X", "benign")] == 625 and counts[("400X", "malignant")] == 1232
    assert len(specs) == 7909
    per_subtype = Counter(s.patient.code for s in specs if s.magnification == "200X")
    assert per_subtype == {"A": 111, "F": 264, "PT": 108, "TA": 140, "DC": 896, "LC": 163, "MC": 196, "PC": 135}


def test_patients_match_real_counts_and_small_scales_keep_everyone():
    people = synth.patients()
    assert len(people) == 82 and len({p.folder for p in people}) == 82
    assert Counter(p.code for p in people) == synth.REAL_PATIENTS
    for scale in (0.01, synth.DEFAULT_SCALE):
        specs = synth.plan(scale, ("40X", "200X"))
        for mag in ("40X", "200X"):
            assert len({s.patient.index for s in specs if s.magnification == mag}) == 82
    assert len(synth.plan(0.5, ("200X",))) == sum(
        max(n, round(c[2] * 0.5)) for n, c in zip(synth.REAL_PATIENTS.values(), synth.REAL_COUNTS.values(), strict=True)
    )


def test_names_follow_breakhis():
    spec = synth.ImageSpec(synth.patients()[0], "200X", 1)
    assert spec.patient.folder == "SOB_B_A_14-22549AB"
    assert spec.file_name == "SOB_B_A-14-22549AB-200-001.png"
    assert spec.path == (
        "histology_slides/breast/benign/SOB/adenosis/SOB_B_A_14-22549AB/200X/SOB_B_A-14-22549AB-200-001.png"
    )
    for s in synth.plan(0.05, ("100X",)):
        m = FILE_NAME_RE.match(s.file_name)
        assert m and SUBTYPES[m.group("tumour")] == (s.patient.label, s.patient.subtype)


def test_render_deterministic_and_seed_dependent():
    spec = synth.plan(0.01, ("200X",))[-1]
    a = synth.render(spec, seed=0)
    assert a.shape == (460, 700, 3) and a.dtype == np.uint8
    assert np.array_equal(a, synth.render(spec, seed=0))
    assert not np.array_equal(a, synth.render(spec, seed=1))


# sha256 (first 16 hex digits) of render(spec, seed).tobytes(), recorded with the generator as it was
# before --difficulty existed: the easy images must never change for a seed
EASY_HASHES = {
    ("SOB_B_A-14-22549AB-40-001.png", 5): "8d4e40d4e30e1541",
    ("SOB_M_MC-14-16457-100-001.png", 5): "645e629ccf535d52",
    ("SOB_B_A-14-22549AB-200-001.png", 0): "912f7304fb5664d1",
    ("SOB_B_F-14-8414-200-001.png", 0): "fb035a3bc0b08ae5",
    ("SOB_B_PT-15-22227-200-001.png", 0): "3e3fb61a7851b206",
    ("SOB_B_TA-15-18022-200-001.png", 0): "c12d08468795ba74",
    ("SOB_M_DC-14-20337-200-001.png", 0): "01cc412eed4f3197",
    ("SOB_M_LC-15-8597-200-001.png", 0): "ed54b34df03cce16",
    ("SOB_M_MC-14-16457-200-001.png", 0): "3097b5ef2bc17ad4",
    ("SOB_M_PC-14-27095-200-001.png", 0): "c5a7ff372be63ec6",
    ("SOB_M_DC-14-20337-400-001.png", 5): "673c757008c392b7",
}


@pytest.mark.slow  # renders 24 images (0.7 s)
def test_easy_images_unchanged():
    """The default difficulty draws exactly the images it drew before hard data existed (all 8 subtypes, 3 mags)."""
    import hashlib

    by_name = {s.file_name: s for s in synth.plan(0.01, MAGNIFICATIONS)}
    for (name, seed), digest in EASY_HASHES.items():
        spec = by_name[name]
        assert hashlib.sha256(synth.render(spec, seed).tobytes()).hexdigest()[:16] == digest, name
        assert np.array_equal(synth.render(spec, seed, "easy", "default"), synth.render(spec, seed))


def test_malignant_images_have_more_dark_nuclei():
    """The class signal in one number: share of dark (hematoxylin) pixels, averaged per class."""
    specs = synth.plan(0.01, ("200X",))
    dark = {"benign": [], "malignant": []}
    for spec in specs[::6]:
        img = synth.render(spec, seed=3).astype(np.float32)
        dark[spec.patient.label].append((img.mean(-1) < 140).mean())
    assert np.mean(dark["malignant"]) > 2 * np.mean(dark["benign"])


@pytest.fixture
def few_specs(monkeypatch):
    """Generate only a handful of images (each takes ~50 ms): one per subtype at 200X and 40X."""
    full = synth.plan

    def small(scale=synth.DEFAULT_SCALE, mags=synth.DEFAULT_MAGS):
        specs = full(scale, mags)
        picked, seen = [], set()
        for s in specs:
            if (s.patient.code, s.magnification) not in seen:
                seen.add((s.patient.code, s.magnification))
                picked.append(s)
        return picked

    monkeypatch.setattr(synth, "plan", small)


@pytest.mark.slow  # three trees (1.4 s)
def test_generate_tree_scans_back_and_is_safe(tmp_path, few_specs):
    summary = synth.generate(tmp_path, scale=0.05, mags=("40X", "200X"), seed=0, jobs=1)
    root = tmp_path / "BreaKHis_v1"
    assert summary["root"] == str(root) and summary["n_images"] == 16
    assert "NOT A MEDICAL DATA SET" in (root / "README.txt").read_text()
    result = scan(root, "all")
    assert len(result.records) == 16 and not result.warnings
    assert {r.subtype for r in result.records} == {name for _, name in SUBTYPES.values()}
    first = result.records[0]
    assert first.patient == first.path.split("/")[5] and first.path.split("/")[6] == first.magnification
    with pytest.raises(UserInputError, match="--force"):
        synth.generate(tmp_path, scale=0.05, mags=("200X",))
    before = (root / first.path).read_bytes()
    synth.generate(tmp_path, scale=0.05, mags=("40X", "200X"), seed=0, force=True, jobs=2)
    assert (root / first.path).read_bytes() == before  # same seed, same bytes, any jobs
    assert not list(tmp_path.glob(".BreaKHis_v1*"))  # no temporary folders left


def test_generate_never_replaces_real_data(tmp_path):
    (tmp_path / "BreaKHis_v1").mkdir()
    (tmp_path / "BreaKHis_v1" / "precious.png").write_bytes(b"x")
    with pytest.raises(UserInputError, match="not synthetic"):
        synth.generate(tmp_path, scale=0.01, force=True)
    assert (tmp_path / "BreaKHis_v1" / "precious.png").exists()


def test_bad_options():
    with pytest.raises(UserInputError, match="--scale"):
        synth.plan(0.0)
    with pytest.raises(UserInputError, match="--mags"):
        synth.parse_mags("200,300")
    assert synth.parse_mags("400,40") == ("40X", "400X") and synth.parse_mags("all") == MAGNIFICATIONS
