"""Classification, retrieval and grounding metrics (NumPy only; sklearn is the reference
in the tests).

* :func:`classification_scores` — accuracy, balanced accuracy (mean per-class recall,
  clip_benchmark's ``mean_per_class_recall``), macro-F1, the confusion matrix, and with
  class scores one-vs-rest ROC-AUC per class / macro / micro (Mann-Whitney with average
  ranks for ties, = ``sklearn.metrics.roc_auc_score``) and top-5 accuracy.
* :func:`multilabel_scores` — per-label ROC-AUC and average precision
  (= ``sklearn.metrics.average_precision_score``), their means, micro AUC (CheXzero style).
* :func:`retrieval_scores` — image->text and text->image Recall@K, mean and median rank
  from a similarity matrix; with several positives per query a hit is *any* positive in
  the top K (the CLIP-paper convention clip_benchmark uses); with 1:1 pairs this equals
  open_clip's ``get_clip_metrics``.
* :func:`grounding_scores` — IoU of predicted and reference boxes, accuracy at IoU >= 0.5
  overall and per modality (BiRD's convention), boxes parsed from model text in the
  syntaxes of :mod:`medvl.data.boxes` or as a bare ``[x1, y1, x2, y2]`` list.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

import numpy as np

# ---- ranking helpers -------------------------------------------------------------------------


def _rankdata(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties share their mean rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=float)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    return ranks


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Binary ROC-AUC; NaN when only one class is present."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _rankdata(np.asarray(s, dtype=float))
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """Step-wise AP over distinct score thresholds (sklearn's definition)."""
    y = np.asarray(y).astype(bool)
    if y.sum() == 0:
        return float("nan")
    order = np.argsort(-np.asarray(s, dtype=float), kind="mergesort")
    ys, ss = y[order], np.asarray(s, dtype=float)[order]
    tp = np.cumsum(ys)
    last = np.r_[np.nonzero(np.diff(ss))[0], len(ss) - 1]  # end of each tie group
    prec = tp[last] / (last + 1)
    rec = tp[last] / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, rec]) * prec))


# ---- classification ---------------------------------------------------------------------------

def classification_scores(y_true: Sequence, y_pred: Sequence | None = None, scores: np.ndarray | None = None,
                          classes: Sequence | None = None) -> dict:
    """Single-label metrics. ``scores`` is ``[N, C]`` in the order of ``classes``; without
    ``y_pred`` the argmax of ``scores`` is the prediction."""
    if classes is None:
        classes = sorted(set(y_true) | set(y_pred or []))
    classes = list(classes)
    idx = {c: k for k, c in enumerate(classes)}
    t = np.array([idx[c] for c in y_true])
    if y_pred is None:
        if scores is None:
            raise ValueError("give y_pred or scores")
        p = np.asarray(scores).argmax(axis=1)
    else:
        p = np.array([idx.get(c, -1) for c in y_pred])
    C = len(classes)
    cm = np.zeros((C, C), dtype=int)
    for a, b in zip(t, p):
        if b >= 0:
            cm[a, b] += 1
    support = cm.sum(axis=1)
    recall = np.divide(np.diag(cm), support, out=np.zeros(C), where=support > 0)
    predicted = cm.sum(axis=0)
    precision = np.divide(np.diag(cm), predicted, out=np.zeros(C), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(C), where=(precision + recall) > 0)
    present = support > 0
    out = {"n": int(len(t)), "accuracy": float((t == p).mean()) if len(t) else 0.0,
           "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
           "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
           "classes": [str(c) for c in classes], "confusion_matrix": cm.tolist(),
           "per_class": {str(c): {"precision": float(precision[k]), "recall": float(recall[k]),
                                  "f1": float(f1[k]), "support": int(support[k])} for k, c in enumerate(classes)}}
    if scores is not None:
        S = np.asarray(scores, dtype=float)
        aucs = [roc_auc(t == k, S[:, k]) for k in range(C)]
        out["auc_per_class"] = {str(c): a for c, a in zip(classes, aucs)}
        valid = [a for a in aucs if a == a]
        out["auc_macro"] = float(np.mean(valid)) if valid else float("nan")
        if C >= 5:
            top5 = np.argsort(-S, axis=1)[:, :5]
            out["top5_accuracy"] = float(np.mean([t[i] in top5[i] for i in range(len(t))]))
    return out


def multilabel_scores(Y: np.ndarray, S: np.ndarray, labels: Sequence[str]) -> dict:
    Y, S = np.asarray(Y).astype(int), np.asarray(S, dtype=float)
    aucs = [roc_auc(Y[:, k], S[:, k]) for k in range(Y.shape[1])]
    aps = [average_precision(Y[:, k], S[:, k]) for k in range(Y.shape[1])]
    ok_auc = [a for a in aucs if a == a]
    ok_ap = [a for a in aps if a == a]
    return {"auc_per_label": dict(zip(labels, aucs)), "ap_per_label": dict(zip(labels, aps)),
            "auc_macro": float(np.mean(ok_auc)) if ok_auc else float("nan"),
            "auc_micro": roc_auc(Y.ravel(), S.ravel()),
            "mean_average_precision": float(np.mean(ok_ap)) if ok_ap else float("nan")}


# ---- retrieval ----------------------------------------------------------------------------------

def _ranks(sim: np.ndarray, positives: list[set[int]]) -> np.ndarray:
    """1-based rank of the best-ranked positive for each query (row)."""
    order = np.argsort(-sim, axis=1, kind="stable")
    out = np.empty(len(sim), dtype=float)
    for i, pos in enumerate(positives):
        hits = np.nonzero(np.isin(order[i], list(pos)))[0]
        out[i] = hits[0] + 1 if len(hits) else np.inf
    return out


def retrieval_scores(sim: np.ndarray, text_to_image: Sequence[int] | None = None,
                     ks: Sequence[int] = (1, 5, 10)) -> dict:
    """``sim`` is ``[N_images, N_texts]``; ``text_to_image[j]`` is the image of text j
    (default: 1:1 pairs, text j belongs to image j)."""
    sim = np.asarray(sim, dtype=float)
    n_img, n_txt = sim.shape
    t2i = list(range(n_txt)) if text_to_image is None else list(text_to_image)
    img_pos: list[set[int]] = [set() for _ in range(n_img)]
    for j, i in enumerate(t2i):
        img_pos[i].add(j)
    out = {}
    for name, ranks in (("image_to_text", _ranks(sim, img_pos)),
                        ("text_to_image", _ranks(sim.T, [{i} for i in t2i]))):
        for k in ks:
            out[f"{name}_R@{k}"] = float(np.mean(ranks <= k))
        out[f"{name}_mean_rank"] = float(np.mean(ranks))
        out[f"{name}_median_rank"] = float(np.floor(np.median(ranks)))
    return out


# ---- grounding ----------------------------------------------------------------------------------

_BOX_TEXT = re.compile(
    r"<\|box_start\|>\s*\(?\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\)?\s*,\s*\(?\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\)?\s*<\|box_end\|>"
    r"|<box_start>\s*\(?\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\)?\s*,\s*\(?\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\)?\s*<box_end>"
    r"|<box>\s*\(?\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\)?\s*,\s*\(?\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\)?\s*</box>"
    r"|\[\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\]"
    # bare corners: Qwen2-VL's box once a decoder skips its special tokens (<|box_start|> is one)
    r"|\(\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\)\s*,\s*\(\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\)")


def parse_boxes_from_text(text: str) -> list[list[float]]:
    """Every box in model output, in order: Qwen2-VL / Med-GRIT / Qwen-VL syntax, ``[x1, y1, x2, y2]``, or
    bare ``(x1,y1),(x2,y2)`` corners."""
    out = []
    for m in _BOX_TEXT.finditer(text or ""):
        nums = [g for g in m.groups() if g is not None]
        try:
            out.append([float(v) for v in nums[:4]])
        except ValueError:
            continue
    return out


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def grounding_scores(ref_boxes: Sequence[Sequence[float]], pred_boxes: Sequence[Sequence[float] | None],
                     modalities: Sequence[str | None] | None = None, threshold: float = 0.5) -> dict:
    """A missing prediction (None) scores IoU 0 and is counted in ``n_unparsed``."""
    ious = [iou(r, p) if p is not None else 0.0 for r, p in zip(ref_boxes, pred_boxes)]
    hits = [v >= threshold for v in ious]
    out = {"n": len(ious), "n_unparsed": sum(p is None for p in pred_boxes),
           "mean_iou": float(np.mean(ious)) if ious else 0.0,
           f"acc@{threshold:g}": float(np.mean(hits)) if hits else 0.0, "per_sample": {"iou": ious}}
    if modalities is not None:
        groups: dict[str, list[bool]] = defaultdict(list)
        for m, h in zip(modalities, hits):
            groups[m or "unknown"].append(h)
        out["by_modality"] = {m: {"n": len(v), f"acc@{threshold:g}": float(np.mean(v))} for m, v in sorted(groups.items())}
    return out
