"""``medvl quickstart``: train a small medical VLM on the bundled VQA-RAD and evaluate it.

The shipped CLIP's resnet10t tower (frozen, its tokens cached), an ``mlp2x_gelu``
connector and a small Qwen2-architecture LM trained from scratch with a BPE tokenizer
built from the training texts (no pretrained LM is reachable offline). It is trained
twice — with the image, and on the question alone — and both are scored on the VQA-RAD
test split with medvl's VQA metrics, so the table shows what the image adds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from medvl.data.bundled import load_bundled


def run_quickstart(out: Path, epochs: int = 15, progress: bool = True) -> int:
    from medvl.eval.suites import evaluate_vqa
    from medvl.generate.batched import generate_answers
    from medvl.data.loading import strip_images
    from medvl.models.vlm import image_loader_for
    from medvl.train.vlm import VLMTrainConfig, train_vlm

    t_all = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_bundled("vqa-rad", "train"), load_bundled("vqa-rad", "test")
    rows = {}
    for name, q_only in (("image + question", False), ("question only", True)):
        cfg = VLMTrainConfig(stage="sft", question_only=q_only, epochs=epochs,
                             output_dir=str(out / ("question-only" if q_only else "vlm")))
        res = train_vlm(cfg, train, progress=progress)
        model, collator = res["model"], res["collator"]
        samples = strip_images(test) if q_only else test
        t0 = time.perf_counter()
        preds = dict(generate_answers(model, collator, samples, image_loader_for(model), batch_size=64,
                                      max_new_tokens=16, progress=progress))
        gen_s = time.perf_counter() - t0
        ev = evaluate_vqa([s.conversation[-1].text for s in test], [preds[s.id] for s in test],
                          [s.labels.get("answer_type") for s in test], [s.labels.get("question_type") for s in test])
        (Path(cfg.output_dir) / "predictions.jsonl").write_text(
            "\n".join(json.dumps({"id": s.id, "prediction": preds[s.id]}) for s in test) + "\n")
        rows[name] = {**ev["metrics"], "train_seconds": res["seconds"], "train_samples_per_s": res["samples_per_s"],
                      "answers_per_s": len(test) / gen_s}
    print("\nVQA-RAD test (451 questions; closed = yes/no, whole-word, every question counted)")
    print(f"{'model':<18} {'closed acc':>10} {'open recall':>12} {'open exact':>11} {'train s':>8} {'answers/s':>10}")
    for name, r in rows.items():
        print(f"{name:<18} {r['closed_accuracy']:>10.3f} {r['open_recall']:>12.3f} {r['open_exact']:>11.3f} "
              f"{r['train_seconds']:>8.0f} {r['answers_per_s']:>10.1f}")
    (out / "report.json").write_text(json.dumps(rows, indent=1))
    print(f"\nmodels in {out}/vlm/model and {out}/question-only/model; report {out}/report.json; "
          f"total {time.perf_counter() - t_all:.0f} s")
    return 0
