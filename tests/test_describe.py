"""Descriptions written from a dataset's own answers (medvl.data.describe) and the data keys
that add them (describe, exclude_images_of)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medvl.data.bundled import bundled_image_stems, load_bundled
from medvl.data.describe import description_samples, vqa_med_description, vqa_rad_description
from medvl.data.loading import load_training_samples
from medvl.data.schema import Media, Sample, Turn
from medvl.errors import MedvlUserError

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def _qa(image: str, q: str, a: str, **labels) -> Sample:
    return Sample(id=f"{image}/{q}", images=[Media(path=f"/x/{image}.jpg")],
                  conversation=[Turn("user", f"<image>\n{q}"), Turn("assistant", a)], labels=labels,
                  meta={"source": "vqa-rad"})


def test_vqa_med_description_names_modality_plane_region_and_finding():
    got = vqa_med_description({"modality": "ct w/contrast (iv)", "plane": "axial", "organ": "gastrointestinal",
                               "abnormality": "appendicitis."})
    assert got == ("An axial CT image of the abdomen, bowel. Organ system: gastrointestinal. "
                   "The main finding is appendicitis.")
    normal = vqa_med_description({"modality": "xr - plain film", "abnormality": "no"},
                                 {"abnormality": "is this image abnormal?"})
    assert normal == "An X-ray (plain film) image. No abnormality is seen."
    abnormal = vqa_med_description({"abnormality": "no"}, {"abnormality": "is this image normal?"})
    assert abnormal == "A radiology image. An abnormality is seen."
    assert vqa_med_description({}) == ""


def test_vqa_rad_description_uses_only_affirmative_questions():
    samples = [_qa("p1", "What type of imaging does this not represent?", "ultrasound", question_type="MODALITY",
                   answer_type="OPEN", organ="CHEST"),
               _qa("p1", "What imaging modality was used?", "X-ray", question_type="MODALITY", answer_type="OPEN"),
               _qa("p1", "Is there a pneumothorax?", "No", question_type="PRES", answer_type="CLOSED"),
               _qa("p1", "Are there rib fractures?", "yes", question_type="PRES", answer_type="CLOSED"),
               _qa("p1", "Is there evidence of pleural effusions?", "Yes", question_type="PRES", answer_type="CLOSED"),
               _qa("p1", "What abnormality is seen?", "cavitary lesion", question_type="ABN", answer_type="OPEN"),
               _qa("p1", "Where is the lesion?", "right upper lobe", question_type="POS", answer_type="OPEN")]
    assert vqa_rad_description(samples) == ("An X-ray image of the chest. No pneumothorax. Rib fractures are "
                                            "present. Pleural effusions are present. Finding: cavitary lesion.")


def test_description_samples_one_per_image_with_a_stable_prompt():
    train = load_bundled("vqa-rad", "train")
    described, missed = description_samples(train)
    assert missed == 0 and len(described) == len({s.images[0].path for s in train})
    again, _ = description_samples(list(reversed(train)))
    prompts = {s.id: s.conversation[0].text for s in described}
    assert prompts == {s.id: s.conversation[0].text for s in again}  # picked by the image, not the order
    assert all(s.id.endswith("/describe") and s.labels["category"] == "describe" for s in described)


def test_describe_and_exclude_keys_in_a_data_section():
    base, _ = load_training_samples({"path": "vqa-rad/train"})
    both, _ = load_training_samples({"path": "vqa-rad/train", "describe": True})
    only, _ = load_training_samples({"path": "vqa-rad/train", "describe": "only"})
    assert len(both) == len(base) + len(only) and all(s.id.endswith("/describe") for s in only)
    gone, skipped = load_training_samples({"path": "vqa-rad/train", "exclude_images_of": "bundled:vqa-rad"})
    assert gone == [] and skipped == {"image also in bundled:vqa-rad": len(base)}  # counted, not silent
    with pytest.raises(MedvlUserError, match="describe must be true or only"):
        load_training_samples({"path": "vqa-rad/train", "describe": "yes please"})
    with pytest.raises(MedvlUserError, match="exclude_images_of"):
        load_training_samples({"path": "vqa-rad/train", "exclude_images_of": "slake"})


@pytest.mark.skipif(not (SHARED / "vqa_med_2019_train").is_dir(), reason="../shared/data/vqa_med_2019_train not present")
def test_generalist_mix_keeps_held_out_and_vqa_rad_images_out():
    med = {"path": str(SHARED / "vqa_med_2019_train"), "format": "vqa-med-2019", "holdout": 0.15,
           "exclude_images_of": "bundled:vqa-rad", "describe": True}
    train, skipped = load_training_samples({"sources": [med, {"path": "vqa-rad/train", "describe": True}]})
    held, _ = load_training_samples(dict(med, part="holdout"))
    rad = bundled_image_stems("vqa-rad")
    med_train = {Path(s.images[0].path).stem for s in train if "vqa-med" in s.meta.get("source", "")}
    assert med_train and not med_train & rad  # no VQA-Med training image is a VQA-RAD image
    assert not {Path(s.images[0].path).stem for s in train} & {Path(s.images[0].path).stem for s in held}
    assert any(k.endswith("image also in bundled:vqa-rad") for k in skipped)
    described = [s for s in held if s.id.endswith("/describe")]
    assert described and len(described) == len({s.images[0].path for s in held})


def test_description_scores_and_lookup_control():
    from medvl.eval.descriptions import description_scores, lookup_answers
    from medvl.harness.image_controls import exact_by_category
    described, _ = description_samples(load_bundled("vqa-rad", "test"))
    perfect = description_scores(described, {s.id: s.conversation[-1].text for s in described})
    assert perfect["rouge_l"] == pytest.approx(1.0) and perfect["region_right"] == 1.0
    wrong = description_scores(described, {s.id: "A CT image of the head." for s in described})
    assert wrong["region_right"] < 0.5 and wrong["cider_d"] < perfect["cider_d"]
    train, test = load_bundled("vqa-rad", "train"), load_bundled("vqa-rad", "test")
    lookup = lookup_answers(train, test)
    assert set(lookup) == {s.id for s in test}
    acc = exact_by_category(test, lookup)["accuracy"]
    assert 0.25 < acc < 0.45  # the question-text prior alone: 0.337 on VQA-RAD test
