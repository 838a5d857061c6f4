"""The Python API of evaluation: one function per task, each returning a plain dict.

``evaluate_reports(refs, hyps, metrics=[...])`` runs metrics selected by exact name from the
registry :data:`medvl.eval.report_metrics.REPORT_METRICS`. Every n-gram score is labelled with its text normalisation
(``bleu4[r2gen]``) and every model-based score with its model, so numbers computed under
different conventions cannot be confused. Defaults: BLEU-1..4, ROUGE-L, CIDEr-D, METEOR
(the jar when Java and pycocoevalcap are installed, else ``meteor_native`` — the key
says which), and the CheXpert clinical-efficacy scores with uncertain counted as
positive; normalisation ``r2gen`` (R2Gen's cleaning, the most used in report-generation
papers).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from medvl.errors import MedvlUserError
from medvl.eval.bootstrap import bootstrap_ci, bootstrap_mean
from medvl.eval.classification import (classification_scores, grounding_scores, parse_boxes_from_text,
                                       retrieval_scores)
from medvl.eval.report_metrics import DEFAULT_REPORT_METRICS, REPORT_METRICS, MetricInput
from medvl.eval.text import normalise
from medvl.eval.vqa import vqa_scores



def _check_lengths(refs: Sequence, hyps: Sequence) -> None:
    if len(refs) != len(hyps):
        raise MedvlUserError(f"{len(hyps)} predictions but {len(refs)} references: the lists must align")
    if not refs:
        raise MedvlUserError("nothing to evaluate: no predictions")


def _refuse_empty_references(refs: Sequence) -> None:
    """An empty reference is never scored: n-gram metrics would score any prediction against nothing,
    a labeler would call it "No Finding". The command line skips them on request (--empty-refs skip)."""
    empty = [k for k, r in enumerate(refs) if isinstance(r, str) and not r.strip()]
    if empty:
        raise MedvlUserError(f"{len(empty)} reference(s) are empty (e.g. position {empty[0]}); leave them out "
                             "(medvl eval ... --empty-refs skip) or fill them in")


def evaluate_reports(refs: Sequence[str], hyps: Sequence[str], metrics: Sequence[str] = DEFAULT_REPORT_METRICS,
                     normalisation: str = "r2gen", uncertain: str = "positive",
                     bertscore_model: str | None = None, bertscore_layers: int | None = None,
                     bertscore_idf: bool = False, bootstrap: int = 0, seed: int = 0,
                     progress: bool = False) -> dict[str, Any]:
    """Each metric of ``metrics`` by its registered name (:data:`REPORT_METRICS`); with ``bootstrap``,
    95 % intervals: a metric's own where its corpus score is not a mean over samples (BLEU,
    CheXpert), else from resampling its per-sample values."""
    _check_lengths(refs, hyps)
    _refuse_empty_references(refs)
    unknown = [m for m in metrics if m not in REPORT_METRICS]
    if unknown:
        raise MedvlUserError(f"unknown report metric(s) {', '.join(unknown)}; known: {', '.join(REPORT_METRICS)}")
    x = MetricInput(list(refs), list(hyps), normalise(list(refs), normalisation), normalise(list(hyps), normalisation),
                    f"[{normalisation}]", bootstrap, seed, progress, uncertain, bertscore_model, bertscore_layers,
                    bertscore_idf)
    scores: dict[str, float] = {}
    per: dict[str, list[float]] = {}
    ci: dict[str, dict] = {}
    extra: dict[str, Any] = {}
    for m in metrics:
        got = REPORT_METRICS.get(m).compute(x)
        scores.update(got.scores)
        per.update(got.per_sample)
        ci.update(got.ci)
        extra.update(got.extra)
    if bootstrap:  # metrics that are a mean over samples: resample the per-sample values
        for k, v in per.items():
            if k in scores and k not in ci and not k.startswith(("bleu", "meteor")):
                ci[k] = bootstrap_mean(v, bootstrap, seed)
    return {"task": "report", "n": len(refs), "normalisation": normalisation, "metrics": scores, "ci": ci,
            "per_sample": per, "n_empty_predictions": sum(1 for h in hyps if not str(h).strip()), **extra}


def evaluate_vqa(refs: Sequence[str], preds: Sequence[str], answer_types: Sequence[str | None] | None = None,
                 question_types: Sequence[str | None] | None = None, bootstrap: int = 0, seed: int = 0) -> dict:

    _check_lengths(refs, preds)
    _refuse_empty_references(refs)
    res = vqa_scores([str(r) for r in refs], [str(p) for p in preds],
                     list(answer_types) if answer_types else [None] * len(refs), question_types)
    per = res.pop("per_sample")
    metrics = {k: v for k, v in res.items() if isinstance(v, float)}
    out = {"task": "vqa", "n": len(refs), "metrics": metrics, "counts": {k: v for k, v in res.items() if isinstance(v, int)},
           "by_question_type": res["by_question_type"], "per_sample": per, "ci": {}}
    if bootstrap:
        closed = [x["closed_correct"] for x in per if x["answer_type"] == "CLOSED"]
        opened = [x["recall"] for x in per if x["answer_type"] == "OPEN"]
        if closed:
            out["ci"]["closed_accuracy"] = bootstrap_mean(closed, bootstrap, seed)
        if opened:
            out["ci"]["open_recall"] = bootstrap_mean(opened, bootstrap, seed)
    return out


def evaluate_classification(y_true: Sequence, y_pred: Sequence | None = None, scores: np.ndarray | None = None,
                            classes: Sequence | None = None, bootstrap: int = 0, seed: int = 0) -> dict:

    res = classification_scores(y_true, y_pred, scores, classes)
    out = {"task": "classification", "n": res["n"],
           "metrics": {k: res[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "auc_macro", "top5_accuracy")
                       if k in res}, "details": res, "ci": {}}
    if bootstrap:
        yt = list(y_true)
        yp = None if y_pred is None else list(y_pred)
        S = None if scores is None else np.asarray(scores)
        for k in ("accuracy", "balanced_accuracy", "macro_f1"):
            out["ci"][k] = bootstrap_ci(
                lambda idx, k=k: classification_scores([yt[i] for i in idx], None if yp is None else [yp[i] for i in idx],
                                                       None if S is None else S[idx], res["classes"] if classes is None else classes)[k],
                len(yt), bootstrap, seed)
    return out


def evaluate_retrieval(sim: np.ndarray, text_to_image: Sequence[int] | None = None,
                       ks: Sequence[int] = (1, 5, 10)) -> dict:
    sim = np.asarray(sim, dtype=float)
    if sim.ndim != 2:
        raise MedvlUserError(f"the similarity matrix must be 2-D [images, texts], got shape {sim.shape}")
    if not np.isfinite(sim).all():
        raise MedvlUserError(f"the similarity matrix holds {int((~np.isfinite(sim)).sum())} NaN/inf value(s)")
    return {"task": "retrieval", "n_images": sim.shape[0], "n_texts": sim.shape[1],
            "metrics": retrieval_scores(sim, text_to_image, ks)}


def evaluate_grounding(ref_boxes, pred_texts_or_boxes, modalities=None, threshold: float = 0.5) -> dict:
    preds = []
    for p in pred_texts_or_boxes:
        if isinstance(p, str):
            b = parse_boxes_from_text(p)
            preds.append(b[0] if b else None)
        else:
            preds.append(None if p is None else list(p))
    res = grounding_scores(ref_boxes, preds, modalities, threshold)
    per = res.pop("per_sample")
    metrics = {k: v for k, v in res.items() if isinstance(v, float)}
    return {"task": "grounding", "n": res["n"], "n_unparsed": res["n_unparsed"], "metrics": metrics,
            "by_modality": res.get("by_modality", {}), "per_sample": per}
