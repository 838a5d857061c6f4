"""Dataset statistics: what a user checks before training on a file.

Counts (samples, images, unique images, volumes, turns, boxes), label distributions,
question / answer lengths in words, the most frequent answers, and, for VQA data, the
closed (yes/no) share. :func:`plot_stats` draws the same as a PNG (matplotlib, from the
``viz`` extra).
"""

from __future__ import annotations

import collections
import statistics
from pathlib import Path
from typing import Any

from medvl.data.schema import Sample


def _summary(xs: list[int]) -> dict[str, float]:
    if not xs:
        return {"min": 0, "median": 0, "mean": 0, "max": 0}
    return {"min": min(xs), "median": statistics.median(xs), "mean": round(statistics.fmean(xs), 2),
            "max": max(xs)}


def compute_stats(samples: list[Sample], top: int = 10) -> dict[str, Any]:
    images = [m for s in samples for m in s.images]
    q_len, a_len, answers = [], [], collections.Counter()
    for s in samples:
        for q, a in s.qa_pairs():
            q_len.append(len(q.replace("<image>", " ").split()))
            a_len.append(len(a.split()))
            answers[a.strip().lower()] += 1
    labels: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for s in samples:
        for k, v in s.labels.items():
            for item in (v if isinstance(v, list) else [v]):
                if isinstance(item, (str, int, bool)):
                    labels[k][str(item)] += 1
    yes_no = sum(n for a, n in answers.items() if a in ("yes", "no"))
    return {
        "samples": len(samples),
        "images": sum(1 for m in images if m.kind == "image"),
        "volumes": sum(1 for m in images if m.kind == "volume"),
        "unique_image_paths": len({m.path for m in images if m.path}),
        "turns": sum(len(s.conversation) for s in samples),
        "qa_pairs": len(q_len),
        "boxes": sum(len(s.boxes) for s in samples),
        "modalities": dict(collections.Counter(m.modality for m in images if m.modality).most_common()),
        "question_words": _summary(q_len),
        "answer_words": _summary(a_len),
        "yes_no_answers": yes_no,
        "top_answers": answers.most_common(top),
        "labels": {k: dict(c.most_common(top)) for k, c in sorted(labels.items())
                   if len(c) <= 50 or k in ("answer_type", "organ", "category")},
    }


def format_stats(st: dict[str, Any]) -> str:
    lines = [f"samples            {st['samples']:>8,}",
             f"images (2D)        {st['images']:>8,}",
             f"volumes (3D)       {st['volumes']:>8,}",
             f"unique image paths {st['unique_image_paths']:>8,}",
             f"turns              {st['turns']:>8,}",
             f"QA pairs           {st['qa_pairs']:>8,}",
             f"boxes              {st['boxes']:>8,}"]
    if st["qa_pairs"]:
        share = 100.0 * st["yes_no_answers"] / st["qa_pairs"]
        lines.append(f"yes/no answers     {st['yes_no_answers']:>8,}  ({share:.1f}%)")
        for k in ("question_words", "answer_words"):
            d = st[k]
            lines.append(f"{k.replace('_', ' '):<18} min {d['min']}  median {d['median']}  "
                         f"mean {d['mean']}  max {d['max']}")
    if st["modalities"]:
        lines.append("modalities         " + ", ".join(f"{k} {v}" for k, v in st["modalities"].items()))
    for k, c in st["labels"].items():
        lines.append(f"label {k:<12} " + ", ".join(f"{kk} {vv}" for kk, vv in c.items()))
    if st["top_answers"]:
        lines.append("top answers        " + ", ".join(f"{a!r} {n}" for a, n in st["top_answers"]))
    return "\n".join(lines)


def plot_stats(st: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Bar charts of the label distributions and top answers, saved as PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from medvl.errors import MedvlUserError
        raise MedvlUserError("plots need matplotlib: pip install 'medvl[viz]'") from None
    panels = [(f"label: {k}", c) for k, c in st["labels"].items() if c]
    if st["top_answers"]:
        panels.append(("top answers", dict(st["top_answers"])))
    n = max(1, len(panels))
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.2 * n + 0.6), squeeze=False)
    for ax, (name, counts) in zip(axes[:, 0], panels):
        keys = list(counts)[::-1]
        ax.barh(keys, [counts[k] for k in keys], color="#3b7bbf")
        ax.set_title(name, fontsize=10, loc="left")
        ax.tick_params(labelsize=8)
    fig.suptitle(title or f"{st['samples']:,} samples", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
