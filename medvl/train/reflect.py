"""Reflective correction rounds (ClinKD) over the vlm recipe: train, let the student answer its
training questions, turn its mistakes into correction samples (:mod:`medvl.distill.reflect`)
and continue training from the previous round's weights on original + corrections. Composed
models continue with ``init_from``; native Hugging Face VLMs (ClinKD's Qwen2-VL) answer through
their own processor and ``generate`` and continue from the folder the previous round saved."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from medvl.data.schema import Sample
from medvl.distill.reflect import correction_samples


def run_reflective(cfg, train: Sequence[Sample], progress: bool = True) -> dict:
    """Round 0 trains as configured; each of ``cfg.reflect['rounds']`` later rounds answers the
    training set, builds corrections, and continues training on original + corrections."""
    from medvl.generate.batched import generate_answers
    from medvl.data.loading import strip_images
    from medvl.models.vlm import image_loader_for
    from medvl.train.vlm import train_vlm

    r = {"rounds": 1, "epochs": max(1, cfg.epochs // 3), "task": "vqa", "f1_threshold": 0.5,
         "semantic_threshold": 0.0}
    unknown = sorted(set(cfg.reflect) - set(r))
    if unknown:
        from medvl.errors import MedvlUserError
        raise MedvlUserError(f"reflect: unknown key(s) {', '.join(unknown)}; known: {', '.join(r)}")
    if cfg.reflect.get("task", "vqa") not in ("vqa", "grounding"):
        from medvl.errors import MedvlUserError
        raise MedvlUserError(f"reflect.task must be vqa or grounding, got {cfg.reflect['task']!r}")
    r.update(cfg.reflect)
    base = Path(cfg.output_dir)
    res = train_vlm(replace(cfg, reflect={}, output_dir=str(base / "round0")), train, progress=progress)
    log = []
    data = strip_images(train) if cfg.question_only else list(train)
    native = bool(cfg.native)
    for k in range(1, int(r["rounds"]) + 1):
        model, collator = res["model"], res["collator"]
        if native:  # a NativeVLM: its processor and generate; the next round loads the folder it saved
            preds = dict(zip([s.id for s in data], model.generate(data, batch_size=16, max_new_tokens=32)))
        else:
            preds = dict(generate_answers(model, collator, data, image_loader_for(model), batch_size=64,
                                          max_new_tokens=32, progress=progress))
        fixes, counts = correction_samples(data, preds, k, r["task"], float(r["f1_threshold"]),
                                           float(r["semantic_threshold"]))
        rec = {"round": k, **counts, "train_accuracy": 1 - counts["wrong_by_metric"] / max(1, counts["answered"]),
               "corrections": len(fixes)}
        log.append(rec)
        if progress:
            print(f"reflect round {k}: {counts['wrong_by_metric']} of {counts['answered']} training answers wrong "
                  f"by the metric, {counts['wrong_by_meaning']} by meaning -> {len(fixes)} correction samples")
        prev = str(base / f"round{k - 1}" / "model")
        start = {"native": prev} if native else {"init_from": prev}  # continue from the previous round's weights
        res = train_vlm(replace(cfg, reflect={}, **start, epochs=int(r["epochs"]),
                                warmup_steps=min(cfg.warmup_steps, 10), output_dir=str(base / f"round{k}")),
                        list(train) + fixes, progress=progress)
    (base / "reflection.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (base / "reflection.jsonl").write_text("".join(json.dumps(x) + "\n" for x in log))
    res["reflection"] = log
    return res
