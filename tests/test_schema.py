import json

import pytest

from medvl.data.schema import (Box, Media, Sample, Turn, load_jsonl_report, read_jsonl,
                               validate, write_jsonl)
from medvl.errors import MedvlUserError


def qa(id="a", n_images=1, text="<image>\nWhat is shown?"):
    return Sample(id=id, images=[Media(path=f"img{i}.png") for i in range(n_images)],
                  conversation=[Turn("user", text), Turn("assistant", "A lung.")])


def test_valid_sample_has_no_problems():
    assert validate([qa()]) == []


def test_placeholder_mismatch_reported_with_index_and_id():
    problems = validate([qa(), qa(id="b", n_images=2)])
    assert len(problems) == 1
    p = problems[0]
    assert p.index == 1 and p.id == "b"
    assert "1 '<image>' placeholder(s)" in p.message and "2 image(s)" in p.message


def test_every_problem_is_reported():
    s = Sample(id="", images=[Media(path=None, kind="cube")],
               conversation=[Turn("robot", "hi")],
               boxes=[Box([10, 10, 5, 5], space="norm1000"), Box([0, 0, 2000, 10], space="norm1000")])
    msgs = [p.message for p in validate([s])]
    assert any("empty 'id'" in m for m in msgs)
    assert any("unknown role" in m for m in msgs)
    assert any("unknown kind" in m for m in msgs)
    assert any("neither a path nor an array" in m for m in msgs)
    assert any("x2 < x1" in m for m in msgs)
    assert any("outside [0, 1000]" in m for m in msgs)
    assert any("placeholder" in m for m in msgs)


def test_duplicate_ids():
    problems = validate([qa("x"), qa("x")])
    assert [p.index for p in problems] == [1] and "duplicate id" in problems[0].message


def test_missing_file_check(tmp_path):
    (tmp_path / "img0.png").write_bytes(b"")
    assert validate([qa()], image_root=tmp_path, check_files=True) == []
    problems = validate([qa(n_images=2, text="<image><image>")], image_root=tmp_path, check_files=True)
    assert len(problems) == 1 and "img1.png" in problems[0].message


def test_jsonl_round_trip(tmp_path):
    s = qa()
    s.boxes = [Box([1, 2, 3, 4], space="pixel", phrase="lesion", turn=1)]
    s.conversation[1] = Turn("assistant", "<ref>lesion</ref><box/>")
    s.labels = {"organ": "CHEST"}
    s.teacher_features = {"BiomedCLIP_img": "f.npz#BiomedCLIP_img"}
    s.meta = {"qid": 3}
    write_jsonl([s], tmp_path / "x.jsonl")
    back = read_jsonl(tmp_path / "x.jsonl")
    assert back[0].to_dict() == s.to_dict()


def test_malformed_jsonl_lines_are_located(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(qa().to_dict()) + "\n{not json\n" + json.dumps({"id": "q", "conversation": [{"role": "user"}]}) + "\n")
    samples, errors = load_jsonl_report(p)
    assert len(samples) == 1
    assert [ln for ln, _ in errors] == [2, 3]
    with pytest.raises(MedvlUserError, match="line 2"):
        read_jsonl(p)
