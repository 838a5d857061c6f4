"""Score a VLM with its image controls and a question-only twin, with paired gaps.

What :mod:`medvl.data.controls` builds (shuffled and blank images), scored the same way as
the real images, so a reader sees what the image adds: the quickstart's table, the shipped
model's card and a user's own model (``control_answers``) all come from here. Gaps are paired —
the same questions under two conditions — and summarised as the mean difference with a 95 %
bootstrap interval; shuffles are averaged per question over their seeds before the
difference is taken.

VQA-Med 2019 has no closed/open split; it is scored by exact match of the answer normalised
as for VQA (:func:`medvl.eval.vqa.normalise_answer`)
per category (modality, plane, organ, abnormality), the task's official "accuracy"
(Ben Abacha et al., CLEF 2019 working notes), whose best reported test accuracy over all
categories is 0.624.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

from medvl.data.controls import image_control
from medvl.data.schema import Sample
from medvl.eval.bootstrap import bootstrap_mean
from medvl.eval.vqa import normalise_answer

SHUFFLE_SEEDS = (0, 1, 2)


def answers(model, collator, samples: Sequence[Sample], batch_size: int = 64, max_new_tokens: int = 16,
            progress: bool = False) -> dict[str, str]:
    """Greedy answers by sample id (the lean batched decoder)."""
    from medvl.generate.batched import generate_answers
    from medvl.models.vlm import image_loader_for
    return dict(generate_answers(model, collator, samples, image_loader_for(model), batch_size=batch_size,
                                 max_new_tokens=max_new_tokens, progress=progress))


def control_answers(model, collator, samples: Sequence[Sample], seeds: Sequence[int] = SHUFFLE_SEEDS,
                    blank: bool = True, **kw) -> dict[str, list[dict[str, str]]]:
    """Answers with the real images, each shuffle seed and a blank image: {condition: [answers per seed]}."""
    out = {"real": [answers(model, collator, samples, **kw)],
           "shuffled": [answers(model, collator, image_control(samples, "shuffled", seed=s), **kw) for s in seeds]}
    if blank:
        out["blank"] = [answers(model, collator, image_control(samples, "blank"), **kw)]
    return out


def paired_gap(a: Sequence[float], b: Sequence[Sequence[float]], n_boot: int = 2000) -> dict:
    """Mean of a - mean_over_runs(b) per item, with a bootstrap 95 % CI (in the units of the scores)."""
    bm = [sum(v) / len(b) for v in zip(*b)]
    d = [x - y for x, y in zip(a, bm)]
    if not d:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    return {"mean": sum(d) / len(d), **bootstrap_mean(d, n_boot, 0), "n": len(d)}


def vqa_per_question(ev: dict) -> tuple[list[float], list[float]]:
    """Closed correctness and open recall per question from :func:`medvl.eval.suites.evaluate_vqa`."""
    per = ev["per_sample"]
    return ([float(x["closed_correct"]) for x in per if x["answer_type"] == "CLOSED"],
            [float(x["recall"]) for x in per if x["answer_type"] == "OPEN"])


def vqa_gap(a: dict, b: Sequence[dict], n_boot: int = 2000) -> dict:
    """Paired closed / open gaps between an evaluation and one or several others of the same questions."""
    ca, oa = vqa_per_question(a)
    return {"closed": paired_gap(ca, [vqa_per_question(x)[0] for x in b], n_boot),
            "open": paired_gap(oa, [vqa_per_question(x)[1] for x in b], n_boot)}


def exact_by_category(samples: Sequence[Sample], preds: dict[str, str],
                      category: Callable[[Sample], str] = lambda s: s.labels.get("category", "all")) -> dict:
    """Exact-match accuracy of normalised answers, overall and per category, plus per-item scores."""
    per, by = [], defaultdict(list)
    for s in samples:
        ok = float(normalise_answer(preds.get(s.id, "")) == normalise_answer(s.conversation[-1].text))
        per.append(ok)
        by[category(s)].append(ok)
    return {"accuracy": sum(per) / max(len(per), 1), "n": len(per), "per_item": per,
            "by_category": {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(by.items())}}
