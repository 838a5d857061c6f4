"""Scoring a VLM's image descriptions against the descriptions written from the image's own
answers (:mod:`medvl.data.describe`), and the no-image lookup control for VQA.

Descriptions are scored two ways. As text: BLEU-4, ROUGE-L and CIDEr-D (pycocoevalcap's
definitions, :mod:`medvl.eval.nlg`) against the reference description. As facts: how often
the description names the image's **modality** (the reference's modality class, e.g. "CT",
"MRI", "X-ray", found as a word in the prediction) and its **region** (the first word of the
reference's body region, e.g. "abdomen", "head", "chest"). Surface overlap rewards the
template; the fact rates say whether what it names is right.

The **lookup** control answers each question with the most common training answer to the same
question text (normalised), else the most common answer of its category: what a model that
never sees the image can score. A VLM that does not beat it has learnt the questions, not the
images (the issue's 0.346 on held-out VQA-Med for the VQA-RAD-only default).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Sequence

from medvl.data.schema import Sample
from medvl.eval import nlg
from medvl.eval.vqa import normalise_answer

_MODALITY_IN_TEXT = {"CT": r"\bct\b|computed tomography", "MRI": r"\bmri?\b|magnetic resonance",
                     "X-ray": r"x-?ray|radiograph|plain film", "ultrasound": r"ultrasound|sonograph|\bus\b",
                     "mammography": r"mammogra", "angiography": r"angiogra", "nuclear medicine": r"nuclear|scintigra",
                     "PET": r"\bpet\b", "fluoroscopy": r"fluoroscop|barium"}


def _modality_class(text: str) -> str | None:
    low = text.lower()
    for name, pat in _MODALITY_IN_TEXT.items():
        if re.search(pat, low):
            return name
    return None


def _region_word(reference: str) -> str | None:
    m = re.search(r"image of the ([a-z]+)", reference.lower())
    return m.group(1) if m else None


def description_scores(samples: Sequence[Sample], preds: dict[str, str]) -> dict:
    """BLEU-4 / ROUGE-L / CIDEr-D and modality / region fact rates of ``preds`` (by sample id)
    against each sample's reference description (its last assistant turn)."""
    refs = [s.conversation[-1].text for s in samples]
    hyps = [preds.get(s.id, "") for s in samples]
    low = lambda xs: [" ".join(re.findall(r"[a-z0-9]+", x.lower())) for x in xs]  # noqa: E731
    R, H = low(refs), low(hyps)
    out = {"n": len(samples), "bleu_4": nlg.bleu(R, H)["bleu4"] if samples else float("nan"),
           "rouge_l": nlg.rouge_l(R, H)["rouge_l"] if samples else float("nan"),
           "cider_d": nlg.cider_d(R, H)["cider_d"] if samples else float("nan")}
    for fact, of in (("modality", _modality_class), ("region", _region_word)):
        hits = [(of(r) is not None and (of(h) == of(r) if fact == "modality" else of(r) in h.lower()))
                for r, h in zip(refs, hyps) if of(r) is not None]
        out[f"{fact}_right"] = sum(hits) / len(hits) if hits else float("nan")
        out[f"{fact}_n"] = len(hits)
    words = [len(h.split()) for h in hyps]
    out["mean_words"] = sum(words) / len(words) if words else 0.0
    out["sentences_ge_1"] = sum(h.strip().endswith(".") or len(h.split()) >= 4 for h in hyps) / max(len(hyps), 1)
    return out


def lookup_answers(train: Sequence[Sample], samples: Sequence[Sample]) -> dict[str, str]:
    """The no-image control: per sample, the most common training answer to the same normalised
    question (ties: the answer seen first), else its category's most common answer."""
    by_q: dict[str, Counter] = defaultdict(Counter)
    by_cat: dict[str, Counter] = defaultdict(Counter)
    for s in train:
        if len(s.conversation) < 2:
            continue
        q = normalise_answer(s.conversation[-2].text.replace("<image>", ""))
        a = s.conversation[-1].text.strip()
        by_q[q][a] += 1
        by_cat[s.labels.get("category", "")][a] += 1
    out = {}
    for s in samples:
        q = normalise_answer(s.conversation[-2].text.replace("<image>", ""))
        pool = by_q.get(q) or by_cat.get(s.labels.get("category", "")) or Counter({"": 1})
        out[s.id] = pool.most_common(1)[0][0]
    return out

