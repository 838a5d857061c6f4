"""Reflective correction training (ClinKD): learn from the student's own mistakes.

After a training round the student answers its training questions. An answer is a mistake
when the task's metric says so — VQA: closed questions by whole-word yes/no (medvl's
closed accuracy), open questions by token F1 below ``f1_threshold``; grounding: IoU < 0.5
of the first predicted box — or, optionally, when its sentence embedding is farther than
``semantic_threshold`` (cosine) from the reference. Every mistake becomes a *correction
sample*:

    user:      <image> question
    assistant: the student's wrong answer
    user:      a request to look again and correct it (REFLECT_PROMPT)
    assistant: the reference answer        <- the only turn with loss

(``meta.loss_on = "last"`` tells the collator to learn the final turn only: training on the
wrong answer would teach it.) The next round continues from the previous weights on the
original data plus the corrections; rounds and every round's counts are logged — the rounds
themselves are driven by :func:`medvl.train.reflect.run_reflective`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from medvl.data.schema import Sample, Turn
from medvl.eval.vqa import _closed_correct, normalise_answer, token_prf

REFLECT_PROMPT = "Look at the image again and check the answer above. If it is wrong, give the correct answer."


def is_mistake(pred: str, ref: str, answer_type: str | None = None, task: str = "vqa", f1_threshold: float = 0.5,
               ref_box=None) -> bool:
    if task == "grounding":
        from medvl.eval.classification import iou, parse_boxes_from_text
        boxes = parse_boxes_from_text(pred)
        target = ref_box if ref_box is not None else (parse_boxes_from_text(ref) or [None])[0]
        return not boxes or target is None or iou(boxes[0], target) < 0.5
    closed = (answer_type or "").upper() == "CLOSED" or normalise_answer(ref) in ("yes", "no")
    if closed:
        return not _closed_correct(ref, pred)
    return token_prf(ref, pred)[2] < f1_threshold


def correction_samples(samples: Sequence[Sample], preds: dict[str, str], round_: int, task: str = "vqa",
                       f1_threshold: float = 0.5, semantic_threshold: float = 0.0, encoder=None) -> tuple[list, dict]:
    """The correction samples for the student's mistakes, and counts by reason."""
    out, counts = [], {"answered": 0, "wrong_by_metric": 0, "wrong_by_meaning": 0}
    for s in samples:
        if s.id not in preds or not s.conversation or s.conversation[-1].role != "assistant":
            continue
        counts["answered"] += 1
        ref, pred = s.conversation[-1].text, preds[s.id]
        wrong = is_mistake(pred, ref, s.labels.get("answer_type"), task, f1_threshold)
        if wrong:
            counts["wrong_by_metric"] += 1
        elif semantic_threshold > 0:
            from medvl.generate.sasg import SentenceEncoder
            encoder = encoder or SentenceEncoder()
            e = encoder([pred, ref])
            if float(e[0] @ e[1]) < semantic_threshold:
                wrong = True
                counts["wrong_by_meaning"] += 1
        if not wrong:
            continue
        conv = list(s.conversation[:-1]) + [Turn("assistant", pred), Turn("user", REFLECT_PROMPT),
                                            Turn("assistant", ref)]
        out.append(replace(s, id=f"{s.id}#reflect{round_}", conversation=conv,
                           meta={**s.meta, "loss_on": "last", "reflect_round": round_, "wrong_answer": pred}))
    return out, counts
