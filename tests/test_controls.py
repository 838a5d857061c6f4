"""Image controls: shuffled never gives a question its own image; blank holds zeros; the CLI runs them."""

import json
from pathlib import Path

import pytest

from medvl.data.bundled import load_bundled
from medvl.data.controls import blank_images, image_control, shuffled_images
from medvl.data.schema import Media, Sample, Turn
from medvl.errors import MedvlUserError


def _s(i, path):
    return Sample(id=str(i), images=[Media(path)], conversation=[Turn("user", "<image>\nq?"), Turn("assistant", "a")])


def test_shuffled_never_returns_the_own_image_even_when_images_repeat():
    test = load_bundled("vqa-rad", "test")
    out = shuffled_images(test, seed=3)
    assert [s.id for s in out] == [s.id for s in test]
    assert all(a.images[0].path != b.images[0].path for a, b in zip(out, test))
    assert sorted(s.images[0].path for s in out) == sorted(s.images[0].path for s in test)  # same images, re-paired
    assert [s.images[0].path for s in shuffled_images(test, seed=3)] == [s.images[0].path for s in out]
    assert [s.images[0].path for s in shuffled_images(test, seed=4)] != [s.images[0].path for s in out]
    assert test[0].images[0].path == load_bundled("vqa-rad", "test")[0].images[0].path  # input untouched


def test_shuffle_refusals():
    with pytest.raises(MedvlUserError, match="two different images"):
        shuffled_images([_s(0, "a.png"), _s(1, "a.png")])
    with pytest.raises(MedvlUserError, match="shared by too many"):
        shuffled_images([_s(0, "a.png"), _s(1, "a.png"), _s(2, "b.png")])
    with pytest.raises(MedvlUserError, match="unknown image control"):
        image_control([_s(0, "a.png")], "upside-down")


def test_blank_images_are_zeros_in_memory():
    out = blank_images([_s(0, "a.png")])
    m = out[0].images[0]
    assert m.path is None and m.array.array.shape == (256, 256) and not m.array.array.any()


def test_predict_with_controls_writes_scoreable_files(tmp_path, capsys):
    pytest.importorskip("timm")
    from medvl.cli import main
    rows = [s.to_dict() for s in load_bundled("vqa-rad", "test")[:6]]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = {}
    for mode in (None, "shuffled", "blank"):
        out = tmp_path / f"{mode}.jsonl"
        extra = ["--image-control", mode] if mode else []
        assert main(["predict", "--data", str(data), "--out", str(out), "--max-new-tokens", "4", *extra]) == 0
        got[mode] = [json.loads(ln) for ln in Path(out).read_text().splitlines()]
        assert sorted(r["id"] for r in got[mode]) == sorted(r["id"] for r in rows)
    assert "control: blank images for 6 sample(s)" in capsys.readouterr().out
    assert main(["eval", "vqa", "--pred", str(tmp_path / "blank.jsonl"), "--ref", str(data)]) == 0


def test_paired_gaps_and_exact_match_by_category():
    from medvl.data.schema import Media, Sample, Turn
    from medvl.harness.image_controls import exact_by_category, paired_gap
    g = paired_gap([1, 1, 1, 0] * 50, [[0, 1, 0, 0] * 50, [0, 1, 1, 0] * 50])
    assert g["mean"] == pytest.approx(0.375) and g["low"] < 0.375 < g["high"] and g["n"] == 200
    assert paired_gap([1, 0], [[1, 0]])["mean"] == 0.0
    samples = [Sample(f"s{i}", [Media(path=f"{i}.jpg")], [Turn("user", "<image>\nq"), Turn("assistant", a)],
                      labels={"category": c}) for i, (a, c) in enumerate([("Axial", "plane"), ("ct - noncontrast", "modality"),
                                                                            ("gastrointestinal", "organ")])]
    res = exact_by_category(samples, {"s0": "axial.", "s1": "CT noncontrast", "s2": "skull and contents"})
    assert res["per_item"] == [1.0, 1.0, 0.0] and res["by_category"]["organ"]["accuracy"] == 0.0
    assert res["accuracy"] == pytest.approx(2 / 3)
