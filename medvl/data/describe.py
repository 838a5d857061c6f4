"""Image descriptions built from a dataset's own question-answer pairs, so a VQA model also
learns to answer "Describe this image." in sentences.

VQA datasets ask many questions about one image; together their answers say what a short
radiology description says: modality, plane, region, main finding. medcap and LLaVA-Med train
captioning beside VQA on figure captions (PMC); we have no captions for VQA-Med 2019 or
VQA-RAD, so one description per image is written from its answers:

* **VQA-Med 2019** (four questions per image, one per category): *"An axial CT (w/contrast
  (iv)) image of the abdomen, bowel. Organ system: gastrointestinal. The main finding is
  appendicitis."* A yes/no abnormality answer ("is this image abnormal?" - "no") becomes "No
  abnormality is seen." or "An abnormality is seen." by the question's polarity.
* **VQA-RAD** (labels ``organ`` HEAD / CHEST / ABD and ``question_type``): the region from the
  organ label; modality and plane from open MODALITY / PLANE answers; findings from open
  presence / abnormality answers to *what / which* questions about a finding and from closed *"Is there
  X?"* questions (yes: "X is present."; no: "No X."). Questions with a negation ("what type of
  imaging does this *not* represent?") are never used: their answer is not about the image.

Only answers of the samples given are used, so a held-out split stays held out. The prompt is
one of :data:`PROMPTS`, picked by a hash of the image's file stem (stable across runs); the
sample id is ``<stem>/describe``. Everything here is text; nothing reads an image.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from pathlib import Path

from medvl.data.schema import Sample, Turn

YES_NO = {"yes", "no"}
REGION = {
    "skull and contents": "head, brain", "face, sinuses, and neck": "head and neck",
    "spine and contents": "spine", "musculoskeletal": "bones and joints",
    "heart and great vessels": "chest, heart", "lung, mediastinum, pleura": "chest, lungs",
    "gastrointestinal": "abdomen, bowel", "genitourinary": "abdomen and pelvis, kidneys",
    "breast": "breast", "vascular and lymphatic": "blood vessels",
}
MODALITY_WORDS = [(r"^ct\b|^cta\b", "CT"), (r"^mr\b|mri|^t1\b|^t2\b|^flair\b", "MRI"), (r"^xr\b|plain film|x-ray", "X-ray"),
                  (r"^us\b|ultrasound", "ultrasound"), (r"mammo", "mammography"), (r"^an\b|angio", "angiography"),
                  (r"^nm\b|nuclear", "nuclear medicine"), (r"pet", "PET"), (r"^gi$|fluoro|barium|^ugi\b|^sbft\b|^be\b", "fluoroscopy")]
RAD_REGION = {"HEAD": "head", "CHEST": "chest", "ABD": "abdomen"}
PROMPTS = ("Describe this image.", "Describe the image.", "What does this image show?",
           "Write a short description of this image.", "Give a brief radiology description of this image.")
_NEGATED = re.compile(r"\b(not|no|without|never|except)\b|n't\b", re.I)
_IS_THERE = re.compile(r"^(?:is|are) there (?:an? |any )?(?:evidence of (?:an? )?)?(.+?)\s*\??$", re.I)
_WH_FINDING = re.compile(r"^(what|which)\b.*\b(abnormal|lesion|patholog|finding|wrong|diagnos|mass|seen|shown|visible|"
                         r"present)", re.I)
_TRAILING = re.compile(r"\s+(present|seen|visible|noted|shown|identified)$", re.I)


def modality_phrase(answer: str) -> str:
    """A VQA-Med modality answer in words ("ct - noncontrast" -> "CT (noncontrast)")."""
    for pat, word in MODALITY_WORDS:
        if re.search(pat, answer):
            detail = answer.split(" - ", 1)[1] if " - " in answer else (answer if word == "MRI" else "")
            return f"{word} ({detail})" if detail and detail.lower() != word.lower() else word
    return answer


def _clean(answer: str) -> str:
    return " ".join(answer.split()).rstrip(" .")


def _article(phrase: str) -> str:
    return ("An " if phrase[:1].lower() in "aeiou" or re.match(r"(MRI|X-ray|NM|US)\b", phrase) else "A ") + phrase


def vqa_med_description(answers: dict[str, str], questions: dict[str, str] | None = None) -> str:
    """One image's description from its VQA-Med 2019 category answers (keys modality, plane,
    organ, abnormality; lower-case answers), ``""`` when none is usable."""
    questions = questions or {}
    mod = answers.get("modality")
    mod = modality_phrase(mod) if mod and mod not in YES_NO else ""
    plane, organ, abn = (_clean(answers.get(k) or "") for k in ("plane", "organ", "abnormality"))
    if not (mod or plane or organ or abn):
        return ""
    region = REGION.get(organ, organ)
    head = " ".join(x for x in (plane, mod or "radiology", "image") if x)
    parts = [_article(head) + (f" of the {region}" if region else "") + "."]
    if organ:
        parts.append(f"Organ system: {organ}.")
    if abn in YES_NO:
        q = questions.get("abnormality", "").lower()
        abnormal = (abn == "yes") == ("abnormal" in q)  # "is this image normal?" - "no" is abnormal too
        parts.append("An abnormality is seen." if abnormal else "No abnormality is seen.")
    elif abn:
        parts.append(f"The main finding is {abn}.")
    return " ".join(parts)


def vqa_rad_description(samples: list[Sample]) -> str:
    """One image's description from its VQA-RAD samples (see the module docstring)."""
    region = next((RAD_REGION[s.labels["organ"]] for s in samples if s.labels.get("organ") in RAD_REGION), "")
    mod = plane = ""
    findings: list[str] = []
    for s in samples:
        q, a = s.conversation[-2].text.replace("<image>", "").strip(), _clean(s.conversation[-1].text)
        if not a or _NEGATED.search(q):
            continue
        qtype, closed = str(s.labels.get("question_type", "")), s.labels.get("answer_type") == "CLOSED"
        if not closed and qtype == "MODALITY" and not mod:
            mod = a
        elif not closed and qtype == "PLANE" and not plane:
            plane = a.lower()
        elif not closed and qtype.split(",")[0].strip() in ("PRES", "ABN") and _WH_FINDING.match(q):
            findings.append(f"Finding: {a}.")
        elif closed and a.lower() in YES_NO and (m := _IS_THERE.match(q)) and not re.search(r"normal|free of", q, re.I):
            thing = _TRAILING.sub("", m.group(1).rstrip(" ."))
            verb = "are" if re.search(r"[^s]s$", thing) and not re.search(r"(sis|us)$", thing) else "is"
            findings.append(f"{thing[:1].upper() + thing[1:]} {verb} present." if a.lower() == "yes" else f"No {thing}.")
    if not (region or mod or findings):
        return ""
    head = " ".join(x for x in (plane, mod or "radiology", "image") if x)
    parts = [_article(head) + (f" of the {region}" if region else "") + "."]
    seen: set[str] = set()
    parts += [f for f in findings if not (f.lower() in seen or seen.add(f.lower()))][:6]  # first mention, at most six
    return " ".join(parts)


def description_samples(samples: list[Sample]) -> tuple[list[Sample], int]:
    """One "describe" sample per single-image group of ``samples`` (VQA-Med 2019 by category
    labels, VQA-RAD by its labels; other sources have no rule and are not described), and how
    many images got no description."""
    by_image: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        if len(s.images) == 1 and s.images[0].path and len(s.conversation) >= 2:
            by_image[s.images[0].path].append(s)
    out, missed = [], 0
    for path, group in by_image.items():
        source = group[0].meta.get("source")
        if source == "vqa-med-2019":
            cats = {s.labels.get("category"): s for s in group if s.labels.get("category")}
            text = vqa_med_description({c: s.conversation[-1].text.strip().lower() for c, s in cats.items()},
                                       {c: s.conversation[-2].text for c, s in cats.items()})
        elif source == "vqa-rad":
            text = vqa_rad_description(group)
        else:
            text = ""
        if not text:
            missed += 1
            continue
        stem = Path(path).stem
        prompt = PROMPTS[int(hashlib.sha256(stem.encode()).hexdigest(), 16) % len(PROMPTS)]
        first = group[0]
        out.append(Sample(id=f"{stem}/describe", images=[first.images[0]],
                          conversation=[Turn("user", f"<image>\n{prompt}"), Turn("assistant", text)],
                          labels={"category": "describe"}, meta={"source": f"{source}-describe", "image_id": stem}))
    return out, missed
