"""VQA metrics for closed (yes/no) and open questions, with breakdowns.

Answers are normalised as the VQA evaluation does (and LLaVA-Med's ``normalize_word``
after it): lower-case, punctuation to spaces, number words to digits ("two" -> "2"),
articles (a, an, the) dropped, whitespace collapsed.

* ``closed_accuracy`` — over **every** closed question (the denominator is the number of
  closed questions; LLaVA-Med's ``run_eval.py`` drops wrong answers from it), a prediction
  is right when it contains the reference's yes/no as a **whole word** and not the other
  one ("A nodule is seen" does not say "no"; LLaVA-Med's substring test says it does).
  For closed questions whose reference is not yes/no (VQA-RAD has some: "left"), exact
  match of the normalised answers.
* ``closed_accuracy_llava_med`` — LLaVA-Med's published number, bugs included, named so,
  for comparison with papers that report it.
* ``open_exact`` — normalised exact match; ``open_recall`` — the fraction of reference
  tokens present in the prediction (what LLaVA-Med reports for open questions);
  ``open_f1`` — token F1 over bags of words (SQuAD style).

Breakdowns by answer type and by question type come from the references' labels.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Sequence

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[^\w\s]|_")


def normalise_answer(text: str) -> str:
    t = _PUNCT.sub(" ", str(text).lower())
    words = [_NUMBERS.get(w, w) for w in t.split() if w not in _ARTICLES]
    return " ".join(words)


def _closed_correct(ref: str, pred: str) -> int:
    r, p = normalise_answer(ref), normalise_answer(pred).split()
    if r in ("yes", "no"):
        other = "no" if r == "yes" else "yes"
        return int(r in p and other not in p)
    return int(" ".join(p) == r)


def _llava_med_closed(ref: str, pred: str) -> int | None:
    """LLaVA-Med run_eval.py: substring test; returns None when it leaves the item out."""
    r, p = ref.lower(), pred.lower()
    if "yes" in p or "no" in p:
        return int(r in p) if r in ("yes", "no") else int(r == p)
    return None


def token_prf(ref: str, pred: str) -> tuple[float, float, float]:
    r, p = normalise_answer(ref).split(), normalise_answer(pred).split()
    if not r or not p:
        return 0.0, 0.0, 0.0
    same = sum((Counter(r) & Counter(p)).values())
    if same == 0:
        return 0.0, 0.0, 0.0
    prec, rec = same / len(p), same / len(r)
    return prec, rec, 2 * prec * rec / (prec + rec)


def vqa_scores(refs: Sequence[str], preds: Sequence[str], answer_types: Sequence[str | None],
               question_types: Sequence[str | None] | None = None) -> dict:
    """All VQA metrics; ``answer_types`` are CLOSED / OPEN (anything else: inferred — a
    yes/no reference is closed)."""
    per: list[dict] = []
    for i, (r, p) in enumerate(zip(refs, preds)):
        at = (answer_types[i] or "").strip().upper() if answer_types else ""
        if at not in ("CLOSED", "OPEN"):
            at = "CLOSED" if normalise_answer(r) in ("yes", "no") else "OPEN"
        item = {"answer_type": at, "question_type": (question_types[i] if question_types else None) or "",
                "exact": int(normalise_answer(r) == normalise_answer(p))}
        if at == "CLOSED":
            item["closed_correct"] = _closed_correct(r, p)
            item["llava_med"] = _llava_med_closed(r, p)
        else:
            item["precision"], item["recall"], item["f1"] = token_prf(r, p)
        per.append(item)

    def summary(items: list[dict]) -> dict:
        closed = [x for x in items if x["answer_type"] == "CLOSED"]
        open_ = [x for x in items if x["answer_type"] == "OPEN"]
        out: dict = {"n": len(items), "n_closed": len(closed), "n_open": len(open_)}
        if closed:
            out["closed_accuracy"] = sum(x["closed_correct"] for x in closed) / len(closed)
            counted = [x["llava_med"] for x in closed if x["llava_med"] is not None]
            out["closed_accuracy_llava_med"] = sum(counted) / len(counted) if counted else 0.0
            out["closed_exact"] = sum(x["exact"] for x in closed) / len(closed)
        if open_:
            out["open_exact"] = sum(x["exact"] for x in open_) / len(open_)
            out["open_recall"] = sum(x["recall"] for x in open_) / len(open_)
            out["open_f1"] = sum(x["f1"] for x in open_) / len(open_)
        if items:
            out["overall_exact"] = sum(x["exact"] for x in items) / len(items)
        return out

    res = summary(per)
    by_qt: dict[str, list[dict]] = defaultdict(list)
    for x in per:
        for qt in (x["question_type"] or "").split(","):
            if qt.strip():
                by_qt[qt.strip()].append(x)
    res["by_question_type"] = {k: summary(v) for k, v in sorted(by_qt.items())}
    res["per_sample"] = per
    return res
