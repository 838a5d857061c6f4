"""Train and evaluate the small VLM shipped in medvl/pretrained/ (what `medvl chat` uses by default).

    python scripts/build_shipped_vlm.py [--epochs 15] [--out medvl/pretrained/medvl-vqarad-small]

Same recipe as `medvl quickstart`'s image model: the shipped CLIP's resnet10t tower (frozen),
mlp2x_gelu connector, a 4-layer Qwen2-architecture LM trained from scratch with a BPE
vocabulary built from the VQA-RAD training texts, SFT on the bundled VQA-RAD train split,
then VQA metrics on its test split (written to results.json beside the weights).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from medvl.data.bundled import load_bundled
from medvl.eval.suites import evaluate_vqa
from medvl.generate.batched import generate_answers
from medvl.models.vlm import image_loader_for
from medvl.train.vlm import VLMTrainConfig, train_vlm

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", default=str(REPO / "medvl" / "pretrained" / "medvl-vqarad-small"))
    ap.add_argument("--work", default="runs/shipped-vlm")
    args = ap.parse_args()
    train, test = load_bundled("vqa-rad", "train"), load_bundled("vqa-rad", "test")
    cfg = VLMTrainConfig(stage="sft", epochs=args.epochs, output_dir=args.work)
    t0 = time.perf_counter()
    res = train_vlm(cfg, train)
    model, coll = res["model"], res["collator"]
    preds = dict(generate_answers(model, coll, test, image_loader_for(model), batch_size=64, max_new_tokens=16))
    ev = evaluate_vqa([s.conversation[-1].text for s in test], [preds[s.id] for s in test],
                      [s.labels.get("answer_type") for s in test], [s.labels.get("question_type") for s in test])
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(Path(args.work) / "model", out)
    results = {"metrics": ev["metrics"], "by_question_type": ev["by_question_type"], "train_seconds": res["seconds"],
               "total_seconds": time.perf_counter() - t0, "epochs": args.epochs,
               "train_samples_per_s": res["samples_per_s"]}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(ev["metrics"], indent=1))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"shipped to {out} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
