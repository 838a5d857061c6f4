"""Held-out splits by image, the plain-label caption texts, mixed data sources."""

from pathlib import Path

import pytest

from medvl.data.pairs import DataConfig, build_pairs, vqa_med_texts
from medvl.data.splits import in_holdout, keep_image
from medvl.errors import MedvlUserError

VQA_MED = Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa_med_2019_train"


def test_split_is_by_image_stable_and_sized():
    stems = [f"synpic{i}" for i in range(20000)]
    held = {s for s in stems if in_holdout(s, 0.15, 0)}
    assert 0.14 < len(held) / len(stems) < 0.16
    # the key is the stem: a path, another extension or folder lands on the same side
    assert all(in_holdout(f"/x/y/{s}.jpg", 0.15, 0) for s in list(held)[:50])
    # another seed draws another split; a larger fraction only adds images
    assert {s for s in stems if in_holdout(s, 0.15, 1)} != held
    assert held <= {s for s in stems if in_holdout(s, 0.3, 0)}
    assert all(keep_image(s, 0.15, 0, "holdout") != keep_image(s, 0.15, 0, "train") for s in stems[:500])
    assert keep_image("a", 0.0, 0, "train") and keep_image("a", 0.5, 0, "all")


def test_bad_split_settings_are_refused(tmp_path):
    for kw, msg in [({"holdout": 1.5}, "fraction"), ({"holdout": 0.1, "part": "val"}, "part must be"),
                    ({"part": "holdout"}, "needs data.holdout")]:
        with pytest.raises(MedvlUserError, match=msg):
            build_pairs(DataConfig(format="medvl", path=str(tmp_path), **kw))


def test_plain_answers_reach_the_texts():
    texts = vqa_med_texts({"modality": "mr - flair", "plane": "axial", "organ": "skull and contents",
                           "abnormality": "glioma"})
    assert "a radiology image of the skull and contents." in texts and "skull and contents." in texts
    assert any("MRI" in t for t in texts) and any(t.endswith("the axial.") for t in texts)
    assert vqa_med_texts({"modality": "yes", "organ": "breast"})[0].startswith("image of the breast")


@pytest.mark.skipif(not VQA_MED.is_dir(), reason="../shared/data/vqa_med_2019_train is not here")
def test_clip_and_vlm_hold_out_the_same_images():
    from medvl.data.loading import load_training_samples
    cfg = dict(format="vqa-med-2019", path=str(VQA_MED), holdout=0.15, holdout_seed=0)
    train, _ = build_pairs(DataConfig(**cfg, text_mode="vqa-med"))
    held, skipped = build_pairs(DataConfig(**cfg, text_mode="vqa-med", part="holdout"))
    assert len(train) + len(held) == 3200 and 0.12 < len(held) / 3200 < 0.18
    assert sum(skipped.values()) == len(train)
    assert all(Path(p.image).exists() for p in held[:5])
    qa, left = load_training_samples(dict(cfg, part="holdout"))
    assert {Path(s.images[0].path).stem for s in qa} == {p.id for p in held}
    assert list(left.values()) == [12792 - len(qa)]
    mixed, left = load_training_samples({"sources": [dict(cfg), {"path": "vqa-rad/train"}]})
    shared = left["vqa-rad/train: image held out by another source"]  # MedPix images in both datasets
    assert 0 < shared < 100
    assert len(mixed) == 12792 - len(qa) + 3064 - shared and len({s.id for s in mixed}) == len(mixed)
    assert not {Path(s.images[0].path).stem for s in mixed} & {p.id for p in held}


def test_sources_must_be_sections():
    from medvl.data.loading import load_training_samples
    with pytest.raises(MedvlUserError, match="must be a list"):
        load_training_samples({"sources": "vqa-rad/train"})
    with pytest.raises(MedvlUserError, match=r"sources\[0\]"):
        load_training_samples({"sources": ["vqa-rad/train"]})


def test_source_weights_repeat_subsample_or_only_hold_out():
    from medvl.data.loading import load_training_samples
    rad = load_training_samples({"path": "vqa-rad/train"})[0]
    n = len(rad)
    tripled, _ = load_training_samples({"sources": [{"path": "vqa-rad/train", "weight": 3}]})
    assert len(tripled) == 3 * n and len({s.id for s in tripled}) == 3 * n
    assert [s.conversation for s in tripled[n:2 * n]] == [s.conversation for s in rad]
    a, left = load_training_samples({"sources": [{"path": "vqa-rad/train", "weight": 1.5}]})
    b, _ = load_training_samples({"sources": [{"path": "vqa-rad/train", "weight": 1.5}]})
    assert len(a) == n + round(0.5 * n) and [s.id for s in a] == [s.id for s in b]  # seeded
    assert len({s.id for s in a}) == len(a) and not left
    quarter, left = load_training_samples({"sources": [{"path": "vqa-rad/train", "weight": 0.25}]})
    assert len(quarter) == round(0.25 * n) and left == {"vqa-rad/train: left out by weight 0.25": n - len(quarter)}
    # weight 0: nothing of the source, but its held-out images still leave the other source
    only, left = load_training_samples({"sources": [{"path": "vqa-rad/train", "holdout": 0.2, "weight": 0},
                                                    {"path": "vqa-rad/train"}]})
    assert 0.1 * n < len(only) < 0.95 * n
    assert left["vqa-rad/train: image held out by another source"] == n - len(only)
    with pytest.raises(MedvlUserError, match=r"sources\[0\]\.weight"):
        load_training_samples({"sources": [{"path": "vqa-rad/train", "weight": -1}]})


def test_a_question_only_source_beside_the_same_source_with_images():
    from medvl.data.loading import load_training_samples
    n = len(load_training_samples({"path": "vqa-rad/train"})[0])
    mixed, _ = load_training_samples({"sources": [{"path": "vqa-rad/train"},
                                                  {"path": "vqa-rad/train", "question_only": True}]})
    assert len(mixed) == 2 * n and len({s.id for s in mixed}) == 2 * n
    assert all(s.images for s in mixed[:n]) and not any(s.images for s in mixed[n:])
    assert mixed[n].id == mixed[0].id + "#q" and "<image>" not in mixed[n].conversation[0].text
    assert mixed[n].conversation[-1].text == mixed[0].conversation[-1].text
