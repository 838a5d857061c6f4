"""A self-contained HTML page for an evaluation result: the metrics table, and plots
embedded as PNG data URIs (no external file, no CDN — the page opens offline).

Plots: per-sample score distributions, per-label / per-class / per-question-type bars, and
the confusion matrix for classification. Needs matplotlib (``medvl[viz]``).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from medvl.data.textfile import atomic_write_text
from medvl.errors import MedvlUserError


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figures(result: dict) -> list[tuple[str, str]]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: list[tuple[str, str]] = []
    per = result.get("per_sample")
    if isinstance(per, dict) and per:
        keys = [k for k, v in per.items() if isinstance(v, list) and v and isinstance(v[0], (int, float))][:8]
        if keys:
            cols = min(4, len(keys))
            rows = (len(keys) + cols - 1) // cols
            fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
            for ax, k in zip(axes.ravel(), keys):
                ax.hist(per[k], bins=20, color="#3b7bbf")
                ax.set_title(k, fontsize=8)
                ax.tick_params(labelsize=7)
            for ax in axes.ravel()[len(keys):]:
                ax.axis("off")
            figs.append(("Per-sample score distributions", _png(fig)))
    bars: dict[str, float] = {}
    title = ""
    if "chexpert" in result:
        bars = {k: v["f1"] for k, v in result["chexpert"]["per_label"].items()}
        title = f"CheXpert F1 per observation (uncertain as {result['chexpert']['uncertain_as']})"
    elif result.get("by_question_type"):
        bars = {k: v.get("overall_exact", 0.0) for k, v in result["by_question_type"].items()}
        title = "Exact match by question type"
    elif result.get("details", {}).get("per_class"):
        bars = {k: v["f1"] for k, v in result["details"]["per_class"].items()}
        title = "F1 per class"
    elif result.get("by_modality"):
        bars = {k: next(iter(x for kk, x in v.items() if kk.startswith("acc@"))) for k, v in result["by_modality"].items()}
        title = "Accuracy at IoU >= 0.5 by modality"
    if bars:
        fig, ax = plt.subplots(figsize=(7, 0.3 * len(bars) + 1))
        names = list(bars)[::-1]
        ax.barh(names, [bars[k] for k in names], color="#3b7bbf")
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=8)
        figs.append((title, _png(fig)))
    cm = result.get("details", {}).get("confusion_matrix")
    if cm:
        import numpy as np
        classes = result["details"]["classes"]
        fig, ax = plt.subplots(figsize=(1 + 0.5 * len(classes), 1 + 0.5 * len(classes)))
        ax.imshow(np.array(cm), cmap="Blues")
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("reference")
        for i, row in enumerate(cm):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
        figs.append(("Confusion matrix", _png(fig)))
    return figs


def write_html(result: dict[str, Any], path: str | Path, title: str = "medvl evaluation") -> Path:
    try:
        figs = _figures(result)
    except ImportError:
        raise MedvlUserError("--html needs matplotlib: pip install 'medvl[viz]'") from None
    rows = []
    for k, v in result.get("metrics", {}).items():
        c = result.get("ci", {}).get(k)
        ci = f"[{c['low']:.4f}, {c['high']:.4f}]" if c else ""
        val = f"{v:.6f}" if isinstance(v, float) else html.escape(str(v))
        rows.append(f"<tr><td>{html.escape(k)}</td><td>{val}</td><td>{ci}</td></tr>")
    info = {k: v for k, v in result.items() if k not in ("metrics", "ci", "per_sample", "details", "chexpert",
                                                          "by_question_type", "by_modality")}
    imgs = "\n".join(f"<h2>{html.escape(t)}</h2><img src='{src}' alt='{html.escape(t)}'>" for t, src in figs)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:960px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}}th{{background:#eef}}img{{max-width:100%}}
pre{{background:#f6f6f6;padding:8px}}</style></head><body>
<h1>{html.escape(title)}</h1>
<pre>{html.escape(json.dumps(info, indent=1, default=str))}</pre>
<table><tr><th>metric</th><th>value</th><th>95% bootstrap CI</th></tr>{''.join(rows)}</table>
{imgs}
</body></html>"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, doc)
    return path
