"""Each format: read a file laid out as the public project writes it, check the canonical
fields, write it back and read again (counts and content preserved)."""

import json

import numpy as np
import pytest

from conftest import shared
from medvl.data.formats import FORMATS, get_format
from medvl.data.formats.mmkd import load_teacher_feature
from medvl.data.schema import validate
from medvl.errors import MedvlUserError


def round_trip(name, src, tmp_path, out_name="out.json", **read_opts):
    fmt = get_format(name)
    first = fmt.read(src, **read_opts)
    assert validate(first.samples) == []
    w = fmt.write(first.samples, tmp_path / out_name)
    assert w.written == len(first.samples) and not w.skipped
    second = fmt.read(tmp_path / out_name, **read_opts)
    assert [s.to_dict() for s in second.samples] == [s.to_dict() for s in first.samples]
    return first


def test_registry_lists_every_format():
    assert set(FORMATS.names()) == {"medvl", "llava", "sharegpt", "medm-vl", "grounding", "vqa-rad",
                                    "slake", "vqa-med-2019", "mimic-cxr", "iu-xray", "captions", "mmkd-clip"}
    with pytest.raises(MedvlUserError, match="Did you mean 'llava'"):
        get_format("lava")


def test_llava_med(fixtures, tmp_path):
    r = round_trip("llava", fixtures / "llava_med.json", tmp_path)
    assert [s.id for s in r.samples] == ["PMC3016364_1", "llava_pretrain_0002", "text_only_3"]
    assert [(x.index, x.id) for x in r.skipped] == [(3, "bad_4")]
    s0 = r.samples[0]
    assert s0.images[0].path == "PMC3016364_Fig1.jpg" and len(s0.conversation) == 4
    assert s0.meta["extra"]["domain"]["chest_xray"] is True
    # placeholder missing in the source: inserted for training, removed on write
    s1 = r.samples[1]
    assert s1.conversation[0].text.startswith("<image>\n")
    out = json.loads((tmp_path / "out.json").read_text())
    assert out[1]["conversations"][0]["value"] == "Describe the image concisely."
    assert "image" not in out[2]


def test_sharegpt_and_dataset_info(fixtures, tmp_path):
    r = round_trip("sharegpt", fixtures / "sharegpt.json", tmp_path, out_name="medvqa.json")
    assert r.samples[0].conversation[0].role == "system"
    assert len(r.samples[1].images) == 2
    assert r.samples[2].conversation[0].text == "Answer briefly."
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert info["medvqa"]["formatting"] == "sharegpt"
    assert info["medvqa"]["columns"]["images"] == "images"
    assert info["medvqa"]["tags"]["assistant_tag"] == "assistant"


def test_medmvl_interleaves_2d_and_3d(fixtures, tmp_path):
    r = round_trip("medm-vl", fixtures / "medmvl.json", tmp_path)
    assert [(x.index, x.id) for x in r.skipped] == [(3, "bad_3")]
    mix = r.samples[1]
    assert [(m.kind, m.path) for m in mix.images] == [("volume", "ct.npy"), ("image", "xray.png")]
    assert "<image3d>" not in mix.conversation[0].text
    out = json.loads((tmp_path / "out.json").read_text())
    assert out[0]["image3d"].endswith(".npy")  # a string stays a string
    assert out[1]["conversations"][0]["value"].startswith("<image3d>\n<image>\n")


def test_grounding_med_grit_and_qwenvl(fixtures, tmp_path):
    r = round_trip("grounding", fixtures / "med_grit.json", tmp_path)
    assert len(r.samples) == 3 and r.skipped[0].id == "bad_box_3"
    s0, s1, s2 = r.samples
    assert s0.boxes[0].bbox == [120, 210, 498, 603] and s0.boxes[0].phrase == "the liver"
    assert s1.boxes[0].turn == 0
    assert s2.images[0].path == "MedGRIT/X-ray/chest_0003.png" and len(s2.boxes) == 2
    src = json.loads((fixtures / "med_grit.json").read_text())[:3]
    assert json.loads((tmp_path / "out.json").read_text()) == src  # byte-for-byte content


def test_grounding_qwen2vl_to_grit_style(fixtures, tmp_path):
    fmt = get_format("grounding")
    r = fmt.read(fixtures / "clinkd_qwen2vl.json")
    assert r.samples[0].meta["box_style"] == "qwen2vl"
    fmt.write(r.samples, tmp_path / "g.json", box_style="grit", layout="llava")
    row = json.loads((tmp_path / "g.json").read_text())[0]
    assert row["conversations"][1]["value"] == "<ref>the kidney</ref><box_start>(211,340),(389,512)<box_end>"


def test_slake_language_filter_is_counted(fixtures, tmp_path):
    r = round_trip("slake", fixtures / "slake.json", tmp_path)
    assert len(r.samples) == 3 and r.samples[1].meta["lang"] == "zh"
    assert r.samples[0].images[0].modality == "MRI" and r.samples[2].labels["answer_type"] == "CLOSED"
    en = get_format("slake").read(fixtures / "slake.json", lang="en")
    assert len(en.samples) == 2
    assert sorted(x.reason for x in en.skipped)[0].startswith("missing field")
    assert any("q_lang='zh' left out" in x.reason for x in en.skipped)


def test_vqa_med_test_layout(fixtures, tmp_path):
    r = get_format("vqa-med-2019").read(fixtures / "vqa_med_2019_test.txt")
    assert [s.id for s in r.samples] == ["synpic54082/modality", "synpic54082/plane", "synpic33889/abnormality"]
    get_format("vqa-med-2019").write(r.samples, tmp_path / "t.txt", with_category="true")
    assert (tmp_path / "t.txt").read_text() == (fixtures / "vqa_med_2019_test.txt").read_text()


def test_mimic_cxr(fixtures, tmp_path):
    fmt = get_format("mimic-cxr")
    r = fmt.read(fixtures / "mimic")
    assert [s.id for s in r.samples] == ["s50414267", "s57375967"]
    s = r.samples[0]
    assert s.images[0].path == "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"
    assert s.conversation[1].text.startswith("There is no focal consolidation, pleural effusion")
    assert s.meta["impression"] == "No acute cardiopulmonary process."
    assert r.samples[1].meta["impression"].startswith("Interval placement")  # FINDINGS AND IMPRESSION
    reasons = dict(r.skip_summary())
    assert reasons["view LATERAL not kept (views=PA,AP)"] == 3
    assert reasons["report has no findings section"] == 1
    imp = fmt.read(fixtures / "mimic", section="impression", views="all", unit="image", split="train")
    assert len(imp.samples) == 4 and imp.samples[2].conversation[1].text.startswith("1. Mild pulmonary")
    # and back
    w = fmt.write(r.samples, tmp_path / "m")
    assert w.written == 2
    again = fmt.read(tmp_path / "m")
    assert [s.conversation[1].text for s in again.samples] == [s.conversation[1].text for s in r.samples]


def test_iu_xray(fixtures, tmp_path):
    fmt = get_format("iu-xray")
    r = fmt.read(fixtures / "iu_xray")
    assert [s.id for s in r.samples] == ["iu-1", "iu-2"]
    assert r.samples[1].labels["problems"] == ["Cardiomegaly", "Pulmonary Artery"]
    per_image = fmt.read(fixtures / "iu_xray", views="all", unit="image", section="impression")
    assert len(per_image.samples) == 6
    fmt.write(r.samples, tmp_path / "iu")
    again = fmt.read(tmp_path / "iu")
    assert [s.to_dict() for s in again.samples] == [s.to_dict() for s in r.samples]


@pytest.mark.parametrize("name,out", [("roco.csv", "o.csv"), ("pmc_oa.jsonl", "o.jsonl")])
def test_captions(fixtures, tmp_path, name, out):
    r = round_trip("captions", fixtures / name, tmp_path, out_name=out)
    assert r.samples[0].conversation[1].text
    assert (tmp_path / out).read_text().splitlines()[0] == (fixtures / name).read_text().splitlines()[0]


def test_mmkd_meta_and_feature_files(tmp_path):
    feats = tmp_path / "feats"
    feats.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        arrays = {f"{t}_{m}": rng.standard_normal(512).astype("float32")
                  for t in ("BiomedCLIP", "PMC_CLIP") for m in ("img", "txt")}
        np.savez(feats / f"{i:04d}.npz", **arrays)
        rows.append({"imgpath": f"images/{i:04d}.jpg", "txt": f"caption {i}",
                     "available_clips": ["BiomedCLIP", "PMC_CLIP"]})
    (tmp_path / "meta.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    fmt = get_format("mmkd-clip")
    r = fmt.read(tmp_path / "meta.jsonl", features_dir=str(feats))
    tf = r.samples[1].teacher_features
    assert set(tf) == {"BiomedCLIP_img", "BiomedCLIP_txt", "PMC_CLIP_img", "PMC_CLIP_txt"}
    v = load_teacher_feature(tf["PMC_CLIP_txt"])
    assert v.shape == (512,)
    assert np.array_equal(v, np.load(feats / "0001.npz")["PMC_CLIP_txt"])
    fmt.write(r.samples, tmp_path / "back.jsonl")
    back = fmt.read(tmp_path / "back.jsonl")
    assert back.samples[1].teacher_features == tf
    assert json.loads((tmp_path / "back.jsonl").read_text().splitlines()[0])["featpath"].endswith("0000.npz")
    with pytest.raises(MedvlUserError, match="no feature 'X_img'"):
        load_teacher_feature(tf["PMC_CLIP_txt"].replace("PMC_CLIP_txt", "X_img"))


def test_unknown_option_is_an_error():
    with pytest.raises(MedvlUserError, match="no read option 'lang'"):
        get_format("vqa-rad").check_options({"lang": "en"}, "read")


# ---- real data -----------------------------------------------------------------------

def test_vqa_rad_published_files(tmp_path):
    src = shared("vqa_rad", "trainset.json")
    r = get_format("vqa-rad").read(src, image_dir="images")
    assert len(r.samples) == 3064 and not r.skipped
    by_qid = {s.meta["qid"]: s for s in r.samples}
    assert by_qid[2392].conversation[1].text == "4"  # published as the integer 4
    assert by_qid[2392].meta["original"]["answer"] == 4
    assert {s.labels["answer_type"] for s in r.samples} == {"OPEN", "CLOSED"}
    assert "ATRIB" not in {s.labels["question_type"] for s in r.samples}
    assert validate(r.samples, image_root=src.parent, check_files=True) == []
    fmt = get_format("vqa-rad")
    fmt.write(r.samples, tmp_path / "t.json", original="true")
    orig = json.loads(src.read_text())
    assert json.loads((tmp_path / "t.json").read_text()) == orig  # restores the published values


def test_vqa_med_2019_training_folder():
    d = shared("vqa_med_2019_train")
    r = get_format("vqa-med-2019").read(d)
    assert len(r.samples) == 12792 and not r.skipped
    cats = {s.labels["category"] for s in r.samples}
    assert cats == {"modality", "plane", "organ", "abnormality"}
    assert len({s.id for s in r.samples}) == 12792
    one = get_format("vqa-med-2019").read(d / "All_QA_Pairs_train.txt")
    assert len(one.samples) == 12792
