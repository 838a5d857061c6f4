"""Train, measure against its controls, and ship the small VLM that ``medvl chat`` uses by default.

    python scripts/build_shipped_vlm.py [--recipe recipes/vlm-sft-vqarad.yaml] [key=value ...]
                                        [--out medvl/pretrained/medvl-vqarad-small] [--no-ship]

Trains the recipe's image model and its **question-only twin** (the same recipe with
``question_only: true``), then scores, with 95 % bootstrap CIs and paired gaps
(:mod:`medvl.harness.image_controls`):

* the VQA-RAD test split (bundled): real image, another test image (3 seeds), a blank
  image, the twin;
* the held-out VQA-Med 2019 images of the recipe's ``holdout`` source (never seen by the
  CLIP tower or the VLM): exact-match accuracy per category, real vs shuffled vs twin vs the
  no-image lookup (the most common training answer to the same question); with ``describe``
  in that source, the descriptions of the held-out images (BLEU-4 / ROUGE-L / CIDEr-D against
  the ones written from their answers, and how often modality and region are right, real and
  shuffled), and ten held-out images answered beside the truth (the model card's examples).

Writes ``results.json`` and the loss curve beside the weights and copies the model to
``--out`` unless ``--no-ship``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from medvl.data.bundled import load_bundled
from medvl.data.loading import load_training_samples, strip_images
from medvl.eval.descriptions import description_scores, lookup_answers
from medvl.harness.image_controls import control_answers, answers, exact_by_category, paired_gap, vqa_gap
from medvl.eval.suites import evaluate_vqa
from medvl.train.config import load_recipe
from medvl.train.vlm import VLMTrainConfig, train_vlm

REPO = Path(__file__).resolve().parent.parent


def vqa_rad_eval(test, preds: dict) -> dict:
    return evaluate_vqa([s.conversation[-1].text for s in test], [preds[s.id] for s in test],
                        [s.labels.get("answer_type") for s in test], [s.labels.get("question_type") for s in test],
                        bootstrap=1000)


def held_out_section(cfg: VLMTrainConfig) -> dict | None:
    for sec in cfg.data.get("sources") or [cfg.data]:
        if sec.get("holdout"):
            return dict(sec, part="holdout")
    return None


def held_out_extras(model, coll, train, held: list, described: list) -> dict:
    """The lookup control, the descriptions (real and shuffled images) and ten examples of the held-out images."""
    from medvl.data.controls import image_control
    out = {"lookup": {k: v for k, v in exact_by_category(held, lookup_answers(train, held)).items() if k != "per_item"}}
    if described:
        real = answers(model, coll, described, max_new_tokens=64, progress=True)
        shuf = answers(model, coll, image_control(described, "shuffled", seed=0), max_new_tokens=64)
        out["descriptions"] = {"real": description_scores(described, real),
                               "shuffled": description_scores(described, shuf)}
        by_image: dict = {}
        for s in held:
            by_image.setdefault(s.images[0].path, []).append(s)
        picks = sorted(by_image)[:: max(1, len(by_image) // 10)][:10]
        qa = answers(model, coll, [s for p in picks for s in by_image[p]])
        out["examples"] = [{"image": Path(p).name,
                            "qa": [{"question": s.conversation[-2].text.replace("<image>", "").strip(),
                                    "truth": s.conversation[-1].text, "answer": qa[s.id]} for s in by_image[p]],
                            "description": real.get(f"{Path(p).stem}/describe", ""),
                            "reference_description": next((d.conversation[-1].text for d in described
                                                           if d.images[0].path == p), "")} for p in picks]
        out["replacement_characters"] = sum("\ufffd" in a for a in [*real.values(), *qa.values()])
    return out


def trained_run(cfg: VLMTrainConfig, work: Path) -> dict:
    """The image model of a run already trained (``--model-run``), in :func:`train_vlm`'s return shape.
    Its saved recipe must train what ``cfg`` trains (output_dir and the eval section may differ)."""
    import yaml

    from medvl.data.collate import VLMCollator
    from medvl.models.hub import load_model_tokenizer
    from medvl.models.vlm import load_vlm
    from medvl.train.config import to_dict
    model_dir = work / "model"
    if not (model_dir / "recipe.yaml").is_file():
        raise SystemExit(f"{model_dir} holds no trained model (no recipe.yaml): train it first")
    saved = yaml.safe_load((model_dir / "recipe.yaml").read_text())
    held_out = lambda e: {k: v for k, v in (e or {}).items() if k in ("holdout", "by", "seed")}  # noqa: E731
    differ = sorted(k for k, v in to_dict(cfg).items()
                    if k not in ("output_dir", "eval") and saved.get(k, v) != v)
    differ += ["eval (what it holds out of training)"] if held_out(saved.get("eval")) != held_out(cfg.eval) else []
    if differ:
        raise SystemExit(f"{model_dir} was trained with other settings ({', '.join(differ)}): "
                         "pass the recipe and overrides it was trained with")
    model = load_vlm(model_dir)
    coll = VLMCollator(load_model_tokenizer(model_dir), tokens_per_image=model.tokens_per_image,
                       max_length=cfg.max_length)
    prev = json.loads((model_dir / "results.json").read_text()) if (model_dir / "results.json").is_file() else {}
    return {"model": model, "collator": coll, "seconds": prev.get("train_seconds", float("nan")),
            "samples_per_s": prev.get("train_samples_per_s"), "validation": prev.get("validation"),
            "best": prev.get("best_epoch")}


def ship(model_dir: Path, dest: Path, dtype: str, out: dict, test, delta_bits: int = 0) -> None:
    """Copy a trained model folder to ``dest``; with ``bf16`` (and ``delta_bits``: its LM blocks as
    coded deltas against the LM source, medvl lm pack), re-save its weights and score that copy with
    its image controls — its answers are what users get — and count the test answers it changed."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(model_dir, dest, ignore=shutil.ignore_patterns("question-only"))
    if dtype == "bf16" or delta_bits:
        import torch

        from medvl.data.collate import VLMCollator
        from medvl.models.hub import load_model_tokenizer
        from medvl.models.vlm import load_vlm
        full = load_vlm(model_dir)
        full.save_vlm(dest, dtype=torch.bfloat16 if dtype == "bf16" else None, delta_bits=delta_bits)
        model = load_vlm(dest)
        coll = VLMCollator(load_model_tokenizer(dest), tokens_per_image=model.tokens_per_image, max_length=128)
        got = control_answers(model, coll, test, progress=True)
        rad = {k: [vqa_rad_eval(test, p) for p in v] for k, v in got.items()}
        before, after = answers(full, coll, test, progress=True), got["real"][0]
        same = sum(before[s.id] == after[s.id] for s in test)
        out["shipped_form"] = {"dtype": dtype, "delta_bits": delta_bits, "same_answers": same, "questions": len(test)}
        print(f"shipped copy ({dtype}{f', {delta_bits}-bit block deltas' if delta_bits else ''}): "
              f"{same} of {len(test)} VQA-RAD test answers identical to the trained model's")
        out["shipped_bf16_vqa_rad_test"] = {k: [{"metrics": e["metrics"], "ci": e["ci"]} for e in v]
                                            for k, v in rad.items()}
        out["shipped_bf16_vqa_rad_gaps"] = {"vs_shuffled": vqa_gap(rad["real"][0], rad["shuffled"]),
                                            "vs_blank": vqa_gap(rad["real"][0], rad["blank"])}
        m = rad["real"][0]["metrics"]
        print(f"shipped bf16 copy, VQA-RAD test: closed {m['closed_accuracy']:.3f} open recall {m['open_recall']:.3f}")
        if "vqa_med_held_out" in out:  # the held-out VQA-Med images too: the card's table is the shipped copy's
            cfg = load_recipe(VLMTrainConfig, out["recipe"], out.get("overrides") or [])
            held = load_training_samples(held_out_section(cfg))[0]
            described = [s for s in held if s.labels.get("category") == "describe"]
            held = [s for s in held if s.labels.get("category") != "describe"]
            med = {k: v for k, v in exact_by_category(held, answers(model, coll, held, progress=True)).items()
                   if k != "per_item"}
            out["shipped_bf16_vqa_med_held_out"] = {"real": med}
            if described:
                out["shipped_bf16_vqa_med_held_out"]["descriptions"] = description_scores(
                    described, answers(model, coll, described, max_new_tokens=64))
            print(f"shipped copy, held-out VQA-Med: {med['accuracy']:.3f} " +
                  json.dumps({k: round(v["accuracy"], 3) for k, v in med["by_category"].items()}))
    (dest / "results.json").write_text(json.dumps(out, indent=1))
    print(f"shipped to {dest} ({sum(p.stat().st_size for p in dest.rglob('*') if p.is_file()) / 1e6:.1f} MB)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "vlm-sft-vqarad.yaml"))
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--out", default=str(REPO / "medvl" / "pretrained" / "medvl-vqarad-small"))
    ap.add_argument("--no-ship", action="store_true")
    ap.add_argument("--no-twin", action="store_true")
    ap.add_argument("--no-held-out", action="store_true",
                    help="skip scoring the held-out VQA-Med images (about 8,000 answers: the slow part for a deep LM)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="weights of the shipped copy; bf16 halves it, and the copy is scored again")
    ap.add_argument("--delta-bits", type=int, choices=(0, 2, 4, 8), default=0,
                    help="ship the LM blocks as deltas against the LM source in this many bits (medvl lm pack); "
                    "0 = in full")
    ap.add_argument("--ship-run", metavar="DIR", help="ship a run this script already trained and scored (its "
                    "output_dir): no training; with --dtype bf16 the copy is scored again")
    ap.add_argument("--model-run", metavar="DIR", help="score the image model of a run already trained with this "
                    "recipe (its output_dir) instead of training it again; its twin is trained (unless --no-twin) "
                    "into DIR/question-only")
    ap.add_argument("--twin-init", default="", help="with init_from (a second stage): the previous stage's "
                    "question-only twin, which this stage's twin starts from")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.ship_run:
        run = Path(args.ship_run) / "model"
        if not (run / "results.json").is_file():
            ap.error(f"{run} has no results.json: train and score it with this script first")
        ship(run, Path(args.out), args.dtype, json.loads((run / "results.json").read_text()),
             load_bundled("vqa-rad", "test"), args.delta_bits)
        return 0
    cfg = load_recipe(VLMTrainConfig, args.recipe, args.overrides)
    if cfg.init_from and not args.no_twin and not args.twin_init:
        ap.error("init_from (a second stage) needs --twin-init: the previous stage's question-only twin")
    train, skipped = load_training_samples(cfg.data)
    print(f"training samples: {len(train):,}; left out: {skipped or 'nothing'}")
    test = load_bundled("vqa-rad", "test")
    sec = held_out_section(cfg)
    held = load_training_samples(sec)[0] if sec and not args.no_held_out else []
    described = [s for s in held if s.labels.get("category") == "describe"]
    held = [s for s in held if s.labels.get("category") != "describe"]
    work = Path(args.model_run) if args.model_run else Path(cfg.output_dir)
    res = trained_run(cfg, work) if args.model_run else train_vlm(cfg, train)
    model, coll = res["model"], res["collator"]
    rad = {k: [vqa_rad_eval(test, p) for p in v]
           for k, v in control_answers(model, coll, test, progress=True).items()}
    r0 = rad["real"][0]["metrics"]
    print(f"image model, VQA-RAD test: closed {r0['closed_accuracy']:.3f} open recall {r0['open_recall']:.3f} "
          f"({res['seconds']:.0f} s training)" + (f"; scoring {len(held):,} held-out VQA-Med questions next"
                                                  if held else ""), flush=True)
    med = {k: [exact_by_category(held, p) for p in v]
           for k, v in control_answers(model, coll, held, blank=False, progress=True).items()} if held else {}
    extras = held_out_extras(model, coll, train, held, described) if held else {}
    if not args.no_twin:
        print("training its question-only twin next", flush=True)
    twin = None
    if not args.no_twin:
        tcfg = load_recipe(VLMTrainConfig, args.recipe, [*args.overrides, "question_only=true",
                                                         f"output_dir={work}/question-only"]
                           + ([f"init_from={args.twin_init}"] if args.twin_init else []))
        tres = train_vlm(tcfg, train)
        twin = {"seconds": tres["seconds"],
                "rad": vqa_rad_eval(test, answers(tres["model"], tres["collator"], strip_images(test))),
                "med": exact_by_category(held, answers(tres["model"], tres["collator"], strip_images(held)))
                if held else None}
    real = rad["real"][0]
    out = {"recipe": str(args.recipe), "overrides": args.overrides, "train_samples": len(train), "left_out": skipped,
           "train_seconds": res["seconds"], "train_samples_per_s": res["samples_per_s"],
           **({"validation": res["validation"], "best_epoch": res["best"]} if res["validation"] else {}),
           "vqa_rad_test": {k: [{"metrics": e["metrics"], "ci": e["ci"]} for e in v] for k, v in rad.items()},
           "vqa_rad_by_question_type": real["by_question_type"],
           "vqa_rad_gaps": {"vs_shuffled": vqa_gap(real, rad["shuffled"]), "vs_blank": vqa_gap(real, rad["blank"])}}
    if twin:
        out["vqa_rad_twin"] = {"metrics": twin["rad"]["metrics"], "ci": twin["rad"]["ci"], "train_seconds": twin["seconds"]}
        out["vqa_rad_gaps"]["vs_twin"] = vqa_gap(real, [twin["rad"]])
    if held:
        strip = [{k: v for k, v in e.items() if k != "per_item"} for e in med["real"]]
        out["vqa_med_held_out"] = {"images": len({s.images[0].path for s in held}), "questions": len(held),
                                   "real": strip[0], "shuffled": [{k: v for k, v in e.items() if k != "per_item"}
                                                                 for e in med["shuffled"]],
                                   "gap_vs_shuffled": paired_gap(med["real"][0]["per_item"],
                                                                 [e["per_item"] for e in med["shuffled"]])}
        out["vqa_med_held_out"].update(extras)
        out["vqa_med_held_out"]["gap_vs_lookup"] = {"accuracy": strip[0]["accuracy"] - extras["lookup"]["accuracy"]}
        if twin:
            out["vqa_med_held_out"]["twin"] = {k: v for k, v in twin["med"].items() if k != "per_item"}
            out["vqa_med_held_out"]["gap_vs_twin"] = paired_gap(med["real"][0]["per_item"], [twin["med"]["per_item"]])
    out["total_seconds"] = time.perf_counter() - t0
    (work / "model" / "results.json").write_text(json.dumps(out, indent=1))
    if (work / "training_loss.png").exists():
        shutil.copy(work / "training_loss.png", work / "model" / "training_loss.png")
    m = lambda e: f"closed {e['metrics']['closed_accuracy']:.3f} open recall {e['metrics']['open_recall']:.3f}"  # noqa: E731
    print(f"VQA-RAD test: real {m(real)}; shuffled " + " / ".join(m(e) for e in rad["shuffled"]) +
          f"; blank {m(rad['blank'][0])}" + (f"; twin {m(twin['rad'])}" if twin else ""))
    for name, g in out["vqa_rad_gaps"].items():
        print(f"  gap {name}: closed {100 * g['closed']['mean']:+.1f} [{100 * g['closed']['low']:+.1f}, "
              f"{100 * g['closed']['high']:+.1f}]  open {100 * g['open']['mean']:+.1f} [{100 * g['open']['low']:+.1f}, "
              f"{100 * g['open']['high']:+.1f}]")
    if held:
        h = out["vqa_med_held_out"]
        print(f"VQA-Med held out ({h['questions']} questions): real {h['real']['accuracy']:.3f} " +
              json.dumps({k: round(v["accuracy"], 3) for k, v in h["real"]["by_category"].items()}) +
              f"; shuffled {sum(e['accuracy'] for e in h['shuffled']) / len(h['shuffled']):.3f}" +
              f"; lookup {h['lookup']['accuracy']:.3f}" +
              (f"; twin {h['twin']['accuracy']:.3f}" if twin else ""))
        if "descriptions" in h:
            d = h["descriptions"]
            print("descriptions of held-out images: " + "; ".join(
                f"{k} BLEU-4 {v['bleu_4']:.3f} ROUGE-L {v['rouge_l']:.3f} CIDEr-D {v['cider_d']:.3f} modality right "
                f"{v['modality_right']:.3f} region right {v['region_right']:.3f}" for k, v in d.items()))
    if not args.no_ship:
        ship(work / "model", Path(args.out), args.dtype, out, test, args.delta_bits)
    print(f"total {out['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
