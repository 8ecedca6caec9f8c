"""Parsing BreakHis trees: records, traps, magnifications, folder-per-class trees, errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from breastcnn.data.breakhis import accession, parse_mag, scan
from breastcnn.errors import UserInputError


def test_scan_counts_and_traps(breakhis_tree, breakhis_200x_counts):
    result = scan(breakhis_tree, "200X")
    expected = breakhis_200x_counts
    labels = [r.label for r in result.records]
    assert labels.count("benign") == expected["benign"]
    assert labels.count("malignant") == expected["malignant"] + expected["traps_kept"]
    # the truncated PNG is left out with a warning naming it; stray files are ignored silently
    assert len(result.unreadable) == 1 and result.unreadable[0].endswith("SOB_M_DC-trap-200-091.png")
    assert any("091.png" in w and "unreadable" in w for w in result.warnings)
    assert result.ignored == 3  # Thumbs.db, .DS_Store, notes.txt (README.txt sits outside the walked tree)
    assert any(r.path.endswith(".PNG") for r in result.records)
    assert all(r.magnification == "200X" for r in result.records)


def test_record_fields_parse_from_path(breakhis_tree):
    rec = scan(breakhis_tree, "40X", verify=False).records[0]
    assert rec.path.startswith("histology_slides/breast/benign/SOB/adenosis/SOB_B_A_14-")
    assert rec.label == "benign" and rec.subtype == "adenosis" and rec.magnification == "40X"
    assert rec.patient.startswith("SOB_B_A_14-") and rec.path.split("/")[5] == rec.patient
    assert rec.y == 0


def test_scan_all_magnifications_and_root_variants(breakhis_tree):
    all_mags = scan(breakhis_tree, "all", verify=False).records
    assert {r.magnification for r in all_mags} == {"40X", "200X"}
    # the parent of BreaKHis_v1 works too, and paths stay relative to BreaKHis_v1
    from_parent = scan(breakhis_tree.parent, "all", verify=False).records
    assert [r.path for r in from_parent] == [r.path for r in all_mags]


def test_folder_per_class_tree(tmp_path):
    rng = np.random.default_rng(0)
    for label, n in (("benign", 3), ("malignant", 5)):
        (tmp_path / label).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "benign" / "Thumbs.db").write_bytes(b"x")
    result = scan(tmp_path, "200X")
    assert result.layout == "folders"
    assert [r.label for r in result.records].count("malignant") == 5
    assert all(r.patient == "" for r in result.records)


def test_missing_root_message(tmp_path):
    with pytest.raises(UserInputError) as err:
        scan(tmp_path / "nowhere", "200X")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "breastcnn synth" in msg and "web.inf.ufpr.br" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("text,expected", [("200X", "200X"), ("200", "200X"), ("40x", "40X"), ("all", None)])
def test_parse_mag(text, expected):
    assert parse_mag(text) == expected


def test_parse_mag_rejects_with_valid_values():
    with pytest.raises(UserInputError, match="300X.*40X, 100X, 200X, 400X"):
        parse_mag("300X")


def test_accession_groups_slides_sharing_a_number():
    assert accession("SOB_B_A_14-22549AB") == accession("SOB_B_A_14-22549G") == "14-22549"
    assert accession("SOB_M_DC_14-10926") == "14-10926"
