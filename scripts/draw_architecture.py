"""Draw the house from the code's own imports: docs/img/architecture.png.

    python scripts/draw_architecture.py [--out docs/img/architecture.png]

Layers bottom to top; an arrow A -> B means modules of A import modules of B, labelled with
the number of such imports. The same import graph is checked by tests/test_architecture.py
(no circles; models, data, distill and generate import nothing above them).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_architecture import _edges, _layer, _modules  # noqa: E402

ROWS = [["errors", "registry"], ["data"], ["models", "losses"], ["eval"], ["generate", "distill"], ["harness"], ["train"],
        ["serve", "quickstart", "medvl", "cli"]]
NOTES = {"data": "schema, formats, image I/O,\ntransforms, collate, pairs", "models": "towers, connectors, VLM,\nnative, CLIP, answer logits",
         "losses": "contrastive, MMKD,\nlogit KD", "eval": "metrics, suites,\nreport HTML", "harness": "image controls,\nzero-shot", "generate": "batched decoding,\npipeline, SASG",
         "distill": "teachers, pseudo-labels,\ncorrections", "train": "engine/ + recipes\n(clip, vlm, reflect)",
         "serve": "HTTP API, page", "cli": "one module per\ncommand group", "medvl": "medvl.load", "quickstart": "main job",
         "errors": "", "registry": ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "img" / "architecture.png"))
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    count: Counter = Counter()
    for a, bs in _edges(_modules()).items():
        for b in bs:
            if _layer(a) != _layer(b):
                count[(_layer(a), _layer(b))] += 1
    pos = {}
    for r, row in enumerate(ROWS):
        for c, name in enumerate(row):
            pos[name] = ((c + 0.5) * 10.0 / len(row), r * 1.6)
    fig, ax = plt.subplots(figsize=(10, 9.5))
    for (a, b), n in sorted(count.items()):
        if a not in pos or b not in pos or b in ("errors", "registry"):  # everyone imports these
            continue
        (x0, y0), (x1, y1) = pos[a], pos[b]
        up = y1 > y0
        ax.add_patch(FancyArrowPatch((x0, y0 - 0.35), (x1, y1 + 0.35), arrowstyle="-|>", mutation_scale=10,
                                     color="crimson" if up else "0.55", lw=0.6 + 0.15 * min(n, 10),
                                     connectionstyle="arc3,rad=0.08", alpha=0.8))
    for name, (x, y) in pos.items():
        ax.add_patch(FancyBboxPatch((x - 1.05, y - 0.33), 2.1, 0.66, boxstyle="round,pad=0.02",
                                    fc="#dbe9f6" if name != "train" else "#fde4c8", ec="0.3"))
        ax.text(x, y + 0.12, name, ha="center", va="center", fontsize=10, weight="bold")
        ax.text(x, y - 0.13, NOTES.get(name, ""), ha="center", va="center", fontsize=6.5)
    ax.set_xlim(-0.3, 10.3)
    ax.set_ylim(-0.7, (len(ROWS) - 1) * 1.6 + 0.7)
    ax.axis("off")
    upward = sum(1 for (a, b) in count if a in pos and b in pos and pos[b][1] > pos[a][1])
    ax.set_title(f"medvl: layers and their imports (arrow = imports; {upward} upward; arrows to errors/registry omitted)", fontsize=11)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
