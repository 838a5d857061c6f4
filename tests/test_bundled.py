from pathlib import Path

import pytest

from conftest import shared
from medvl.data import load_bundled
from medvl.data.bundled import BUNDLED_ROOT
from medvl.data.formats import get_format
from medvl.data.schema import validate
from medvl.errors import MedvlUserError


def test_bundled_vqa_rad_loads_and_is_valid():
    train, test = load_bundled("vqa-rad", "train"), load_bundled("vqa-rad", split="test")
    assert (len(train), len(test)) == (3064, 451)
    assert validate(train, check_files=True) == [] and validate(test, check_files=True) == []
    assert all(Path(m.path).is_absolute() for s in test for m in s.images)
    assert {s.labels["answer_type"] for s in train} == {"OPEN", "CLOSED"}


def test_bundle_is_small_and_licensed():
    size = sum(p.stat().st_size for p in BUNDLED_ROOT.rglob("*") if p.is_file())
    assert size < 8_000_000
    lic = (BUNDLED_ROOT / "vqa-rad" / "LICENSE.txt").read_text()
    assert "CC0" in lic and "Lau" in lic


def test_unknown_bundled_split():
    with pytest.raises(MedvlUserError, match="splits train, test"):
        load_bundled("vqa-rad", "val")


def test_bundle_matches_the_source():
    """The bundled questions are the published ones, through the vqa-rad reader."""
    src = get_format("vqa-rad").read(shared("vqa_rad", "testset.json"), image_dir="images")
    bundled = load_bundled("vqa-rad", "test")
    assert [s.conversation for s in src.samples] == [s.conversation for s in bundled]
    assert [s.labels for s in src.samples] == [s.labels for s in bundled]
