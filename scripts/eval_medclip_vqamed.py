"""Zero-shot evaluation of a medvl CLIP on held-out VQA-Med 2019 images, as a user asks it.

    python scripts/eval_medclip_vqamed.py --data ../shared/data/vqa_med_2019_train \
        [--model medclip-r10t-minilm] [--holdout 0.15 --seed 0] [--out results.json --plot cm.png]

The held-out part is the one the CLIP recipe leaves out with the same ``data.holdout`` /
``data.holdout_seed`` (:mod:`medvl.data.splits`, by image). Labels are the **plain answers**
(what a user types: ``--labels "skull and contents" gastrointestinal ...``) and the prompts
are medvl's default templates — no per-task prompt engineering. Tasks:

* organ — the ten VQA-Med organ-system answers;
* modality — the modality word of the image's modality answer (CT, MRI, X-ray, ultrasound,
  ...; yes/no and contrast-only answers carry no modality and are left out, counted);
* plane — the plane answers with at least 5 held-out images.

Reports accuracy, balanced accuracy, macro AUC, the majority-class rate, confusion matrices,
and a linear probe on the same frozen features (fit on the training part) as the ceiling
the text side is measured against.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from medvl.data.formats import get_format
from medvl.data.describe import MODALITY_WORDS
from medvl.data.splits import in_holdout
from medvl.eval.classification import classification_scores
from medvl.harness.zero_shot import DEFAULT_TEMPLATES, class_embeddings, embed_images, linear_probe
from medvl.models.clip import MedCLIP

TASKS = ("organ", "modality", "plane")


def modality_word(answer: str) -> str | None:
    hits = [w for pat, w in MODALITY_WORDS if re.search(pat, answer)]
    return hits[0] if hits else None


def per_image_labels(data: Path) -> dict[str, dict[str, str]]:
    conv = get_format("vqa-med-2019").read(data)
    root = data / "images" if (data / "images").is_dir() else data
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for s in conv.samples:
        cat, ans = s.labels.get("category"), s.conversation[-1].text.strip().lower()
        path = str(Path(s.images[0].path) if Path(s.images[0].path).is_absolute() else root / s.images[0].path)
        if cat == "organ":
            out[path]["organ"] = ans
        elif cat == "plane":
            out[path]["plane"] = ans
        elif cat == "modality" and ans not in ("yes", "no") and modality_word(ans):
            out[path]["modality"] = modality_word(ans)
    return dict(out)


def plot_confusions(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 5.6))
    for ax, (task, r) in zip(np.atleast_1d(axes), results.items()):
        cm = np.array(r["confusion_matrix"], dtype=float)
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        C = len(r["classes"])
        ax.set_xticks(range(C), r["classes"], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(C), [f"{c} ({int(n)})" for c, n in zip(r["classes"], cm.sum(1))], fontsize=7)
        for i in range(C):
            for j in range(C):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
        ax.set_title(f"{task}: acc {r['accuracy']:.2f}, balanced {r['balanced_accuracy']:.2f}", fontsize=9)
        ax.set_xlabel("predicted")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the VQA-Med 2019 training folder")
    ap.add_argument("--model", default="medclip-r10t-minilm-v2")
    ap.add_argument("--holdout", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    ap.add_argument("--plot", default="")
    args = ap.parse_args()
    model = MedCLIP.from_pretrained(args.model).eval()
    labels = per_image_labels(Path(args.data))
    paths = sorted(labels)
    held = [p for p in paths if in_holdout(p, args.holdout, args.seed)]
    train = [p for p in paths if not in_holdout(p, args.holdout, args.seed)]
    t0 = time.perf_counter()
    X, ok, failed = embed_images(model, held)
    Xtr, ok_tr, _ = embed_images(model, train)
    held, train = [held[i] for i in ok], [train[i] for i in ok_tr]
    dt = time.perf_counter() - t0
    results = {}
    for task in TASKS:
        idx = [i for i, p in enumerate(held) if task in labels[p]]
        y = [labels[held[i]][task] for i in idx]
        counts = Counter(y)
        classes = sorted(c for c, n in counts.items() if task != "plane" or n >= 5)
        idx = [i for i, v in zip(idx, y) if v in classes]
        y = [v for v in y if v in classes]
        with torch.no_grad():
            W = class_embeddings(model, classes, DEFAULT_TEMPLATES)  # [C, D], the plain answers as labels
            probs = (model.logit_scale.exp().float() * X[idx] @ W.T.float()).softmax(-1).numpy()  # [n, C]
        sc = classification_scores(y, None, probs, classes)
        tr_idx = [i for i, p in enumerate(train) if labels[p].get(task) in classes]
        probe = linear_probe(Xtr[tr_idx].numpy(), [labels[train[i]][task] for i in tr_idx], X[idx].numpy())
        probe_acc = float(np.mean([a == b for a, b in zip(probe["pred"], y)]))
        results[task] = {"n_images": len(y), "classes": classes, "support": {c: y.count(c) for c in classes},
                         "accuracy": sc["accuracy"], "balanced_accuracy": sc["balanced_accuracy"],
                         "auc_macro": sc["auc_macro"], "majority": max(counts[c] for c in classes) / len(y),
                         "linear_probe_accuracy": probe_acc, "confusion_matrix": sc["confusion_matrix"],
                         "left_out": len([p for p in held if task not in labels[p]]) + sum(
                             n for c, n in counts.items() if c not in classes)}
        print(f"{task:<9} n={len(y):>4}  zero-shot acc {sc['accuracy']:.3f}  balanced {sc['balanced_accuracy']:.3f}  "
              f"AUC {sc['auc_macro']:.3f}  majority {results[task]['majority']:.3f}  linear probe {probe_acc:.3f}")
    meta = {"model": args.model, "holdout": args.holdout, "seed": args.seed, "held_out_images": len(held),
            "train_images": len(train), "failed": len(failed), "templates": list(DEFAULT_TEMPLATES),
            "embed_seconds": round(dt, 1)}
    print(json.dumps(meta))
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, **results}, indent=1))
    if args.plot:
        plot_confusions(results, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
