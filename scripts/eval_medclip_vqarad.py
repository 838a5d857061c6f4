"""Zero-shot evaluation of a medvl CLIP on VQA-RAD (bundled copy), for the model card.

    python scripts/eval_medclip_vqarad.py [--model medclip-r10t-minilm] [--out results.json]

Tasks (VQA-RAD images were left out of the shipped model's training data):
* organ — every VQA-RAD image, labelled by ``image_organ``: head / chest / abdomen;
* modality — images whose open MODALITY question answers name CT, MRI or X-ray
  (also "is this a CT/MRI/x-ray?" questions answered yes);
* plane — images whose open PLANE question answers name axial, coronal or sagittal
  (or PA / AP / lateral for radiographs, reported separately as "radiograph view").
Scores: accuracy, balanced accuracy, macro one-vs-rest AUC, from medvl.eval.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from medvl.data.bundled import load_bundled
from medvl.eval.classification import classification_scores
from medvl.harness.zero_shot import zero_shot
from medvl.models.clip import MedCLIP

ORGANS = {"HEAD": "head", "CHEST": "chest", "ABD": "abdomen"}
MODALITY = [(r"\bct\b|computed tomography", "CT"), (r"\bmri?\b|magnetic|t1|t2|flair", "MRI"),
            (r"x-?ray|radiograph|plain film", "X-ray")]
PLANE = [(r"axial|transverse", "axial"), (r"coronal", "coronal"), (r"sagittal", "sagittal")]
PROMPTS = {
    "organ": ["a radiology image of the {}.", "an image of the {}.", "a scan of the {}.", "{}."],
    "modality": ["a {} image.", "a {} scan.", "{}."],
    "plane": ["{} plane.", "an {} image.", "a {} view."],
}
CLASS_TEXT = {"CT": "CT", "MRI": "MRI", "X-ray": "X-ray (plain film)", "axial": "axial", "coronal": "coronal",
              "sagittal": "sagittal", "head": "head, brain", "chest": "chest, lungs", "abdomen": "abdomen"}


def _match(answer: str, table) -> str | None:
    hits = {lab for pat, lab in table if re.search(pat, answer)}
    return hits.pop() if len(hits) == 1 else None


def labelled_images() -> dict[str, dict[str, str]]:
    samples = load_bundled("vqa-rad", "train") + load_bundled("vqa-rad", "test")
    labels: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for s in samples:
        path = s.images[0].path
        labels[path]["organ"].add(ORGANS[s.labels["organ"]])
        q = s.conversation[0].text.lower()
        a = s.conversation[1].text.lower()
        qt = s.labels.get("question_type", "")
        if "MODALITY" in qt:
            if s.labels.get("answer_type") == "OPEN":
                m = _match(a, MODALITY)
            elif a == "yes":
                m = _match(q, MODALITY)
            else:
                m = None
            if m:
                labels[path]["modality"].add(m)
        if "PLANE" in qt and s.labels.get("answer_type") == "OPEN":
            p = _match(a, PLANE)
            if p:
                labels[path]["plane"].add(p)
    # keep a task label only when the image's questions agree on it
    return {path: {t: next(iter(v)) for t, v in d.items() if len(v) == 1} for path, d in labels.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="medclip-r10t-minilm")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    model = MedCLIP.from_pretrained(args.model)
    per_image = labelled_images()
    results = {}
    for task in ("organ", "modality", "plane"):
        items = [(p, d[task]) for p, d in sorted(per_image.items()) if task in d]
        classes = sorted({lab for _, lab in items})
        t0 = time.perf_counter()
        with torch.no_grad():
            res = zero_shot(model, [p for p, _ in items], [CLASS_TEXT[c] for c in classes], PROMPTS[task])
        dt = time.perf_counter() - t0
        y = [items[i][1] for i in res["indices"]]
        pred = [classes[int(k)] for k in np.argmax(res["probs"], axis=1)]
        sc = classification_scores(y, pred, res["probs"], classes)
        results[task] = {"n_images": len(y), "classes": classes, "support": {c: y.count(c) for c in classes},
                         "accuracy": sc["accuracy"], "balanced_accuracy": sc["balanced_accuracy"],
                         "auc_macro": sc["auc_macro"], "confusion_matrix": sc["confusion_matrix"],
                         "images_per_s": len(y) / dt, "failed": len(res["failed"])}
        print(f"{task:<9} n={len(y):>3}  acc {sc['accuracy']:.3f}  balanced {sc['balanced_accuracy']:.3f}  "
              f"AUC {sc['auc_macro']:.3f}  classes {results[task]['support']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
