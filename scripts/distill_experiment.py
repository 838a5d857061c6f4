"""ClinKD on VQA-RAD, rerunnable on a 2-core CPU (about 15 minutes):

    python scripts/distill_experiment.py [--epochs 10] [--out runs/distill-exp]

Teacher: the shipped ``medvl-vqarad-small`` (the quickstart model: shipped CLIP tower,
mlp2x_gelu, Qwen2 4 layers x 256, 15 epochs). Student: the same tower and connector with a
Qwen2 of 2 layers x 128 (about a quarter of the LM), the teacher's tokenizer. Every student
gets the same number of epochs over the same 3,064 training questions:

1. CE only (no teacher);
2. logit KD with ClinKD's settings (alpha 0.5, T 0.5, forward KL), live teacher;
3. row 2 + one round of reflective correction (3 more epochs on the training set plus the
   correction samples: *more* budget, which is how ClinKD uses it);
4. the control for row 3: row 2 + the same 3 more epochs on the training set alone;
and each model is scored on the 451 test questions greedy and with SASG (5 samples, T 0.7).
Writes ``results.json`` and ``results.md`` (the table in docs/distill.md comes from it).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

STUDENT_LLM = {"model_type": "qwen2", "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
               "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True,
               "max_position_embeddings": 512}


def score(model, collator, test, sasg: bool) -> dict:
    from medvl.eval.suites import evaluate_vqa
    from medvl.generate.batched import generate_answers
    from medvl.generate.sasg import sasg_answers
    from medvl.models.vlm import image_loader_for
    load = image_loader_for(model)
    if sasg:
        preds = dict(sasg_answers(model, collator, test, load, n=5, temperature=0.7, top_p=0.9, batch_size=64,
                                  max_new_tokens=16))
    else:
        preds = dict(generate_answers(model, collator, test, load, batch_size=64, max_new_tokens=16))
    ev = evaluate_vqa([s.conversation[-1].text for s in test], [preds[s.id] for s in test],
                      [s.labels.get("answer_type") for s in test], [s.labels.get("question_type") for s in test])
    m = ev["metrics"]
    return {"closed_accuracy": m["closed_accuracy"], "open_recall": m["open_recall"], "open_exact": m["open_exact"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--teacher", default="medvl-vqarad-small")
    ap.add_argument("--out", default="runs/distill-exp")
    ap.add_argument("--rows", type=int, nargs="*", help="run only these student rows (1-4), keeping the others "
                    "from an earlier results.json")
    args = ap.parse_args()

    from medvl.data.bundled import load_bundled
    from medvl.train.reflect import run_reflective
    from medvl.generate.pipeline import load
    from medvl.train.vlm import VLMTrainConfig, train_vlm

    out = Path(args.out)
    train, test = load_bundled("vqa-rad", "train"), load_bundled("vqa-rad", "test")
    rows: dict = {}
    if args.rows and (out / "results.json").exists():  # keep the rows not rerun
        rows = json.loads((out / "results.json").read_text())
    n_params = lambda m: sum(p.numel() for p in m.llm.parameters())
    if "teacher (medvl-vqarad-small)" not in rows:
        teacher = load(args.teacher)
        rows["teacher (medvl-vqarad-small)"] = {"epochs": "15", "llm_params": n_params(teacher.model),
                                                "greedy": score(teacher.model, teacher.collator, test, False),
                                                "sasg5": score(teacher.model, teacher.collator, test, True)}
    base = VLMTrainConfig(llm=STUDENT_LLM, epochs=args.epochs, warmup_steps=50, output_dir="")
    kd = {"teacher": args.teacher, "alpha": 0.5, "temperature": 0.5, "kind": "forward"}
    # the CE-only student trains the same BPE tokenizer the teacher has (deterministic, same texts)
    plans = [("student, CE only", base, None),
             ("student, KD (alpha 0.5, T 0.5)", replace(base, distill=kd), None),
             ("student, KD + reflective correction", replace(base, distill=kd), {"rounds": 1, "epochs": 3}),
             ("student, KD + 3 epochs without corrections (control)",
              replace(base, distill=kd, epochs=3, warmup_steps=10, init_from=str(out / "kd" / "model")), None)]
    if args.rows:
        plans = [plans[i - 1] for i in args.rows]
    for name, cfg, reflect in plans:
        t0 = time.perf_counter()
        tag = name.split(",")[1].strip().split(" ")[0].lower() + ("-reflect" if reflect else "")
        tag += "-control" if "control" in name else ""
        cfg = replace(cfg, output_dir=str(out / tag))
        if reflect:
            res = run_reflective(replace(cfg, reflect=reflect), train)
            extra = f"{args.epochs} + {reflect['epochs']}"
        else:
            res = train_vlm(cfg, train)
            extra = f"{args.epochs} + 3" if cfg.init_from else str(args.epochs)
        model, collator = res["model"], res["collator"]
        rows[name] = {"epochs": extra, "llm_params": n_params(model), "train_seconds": time.perf_counter() - t0,
                      "greedy": score(model, collator, test, False), "sasg5": score(model, collator, test, True)}
        if reflect:
            rows[name]["reflection"] = res["reflection"]
        print(name, json.dumps(rows[name]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = ["| model | epochs | LM params | closed acc (greedy) | open recall (greedy) | closed acc (SASG 5) | "
             "open recall (SASG 5) |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        g, s = r["greedy"], r["sasg5"]
        lines.append(f"| {name} | {r['epochs']} | {r['llm_params'] / 1e6:.2f} M | {g['closed_accuracy']:.3f} | "
                     f"{g['open_recall']:.3f} | {s['closed_accuracy']:.3f} | {s['open_recall']:.3f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
