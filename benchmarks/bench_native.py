"""Native Hugging Face VLMs in the trainer engine, measured against references in the same run.

    python benchmarks/bench_native.py [--samples 256] [--batch 16] [--parts lora,kd,dist]

A Qwen2-VL built offline from a config (text: width 256, 4 layers, an embedding table of
Qwen2-VL-2B's 151,936 rows — ``--vocab`` — of which the offline BPE tokenizer uses the first
~1k; vision: depth 2, width 128; the 56 x 56-pixel image grid gives 4 image tokens) on VQA-RAD
training questions:

* ``lora`` — LoRA SFT (r 16 on q/k/v/o of the LM, vision frozen, merger trained), bf16, one
  epoch: medvl's ``vlm`` recipe against the same model wrapped by ``peft`` and trained by the
  plain Hugging Face ``Trainer`` over the *same encoded samples* and collation; samples/s from
  each one's wall time for the epoch (the first step included on both sides).
* ``kd`` — ClinKD logit distillation of that student from a wider Qwen2-VL teacher (width 512)
  over the same tokenizer: a live teacher vs its cached top-32 logits; samples/s and the peak
  resident memory of each run (separate processes).
* ``dist`` — SFT (merger and LM fully trained: FSDP takes no LoRA) on 2 CPU processes under
  torchrun with DDP, FSDP2 and DeepSpeed ZeRO-2, the same global batch, tokens/s against 1 process (the 2 cores bound it: the point is that each runs and
  agrees).

Results: ``benchmarks/results/native.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)$"}


def build(folder: Path, width: int, seed: int, vocab: int) -> None:
    """A random Qwen2-VL of this width: 4 decoder blocks, 8 heads, a 2-block vision tower, the embedding table
    padded to ``vocab`` rows (medvl.models.tiny_native)."""
    from medvl.models.tiny_native import tiny_qwen2vl
    tiny_qwen2vl(width, seed, layers=4, heads=8, kv_heads=4, vision_depth=2, vision_width=128, vision_heads=4,
                 vocab_size=vocab, tokenizer_vocab=1024, tokenizer_split="train").save(folder)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_medvl(args, out: Path, **kw) -> dict:
    from medvl.data.bundled import load_bundled
    from medvl.train.vlm import VLMTrainConfig, train_vlm
    cfg = VLMTrainConfig(native=str(args.model), freeze={"llm": "lora"}, lora=LORA, epochs=1, batch_size=args.batch,
                         precision="bf16", warmup_steps=5, log_every=1000, output_dir=str(out), max_length=256,
                         save_every_epochs=10**6, **kw)  # the end-of-run checkpoint is timed apart below
    samples = load_bundled("vqa-rad", "train")[:args.samples]
    t0 = time.perf_counter()
    res = train_vlm(cfg, samples, progress=False)
    wall = time.perf_counter() - t0
    # samples/s over the training loop, its first step included (as the HF Trainer's figure), the final
    # checkpoint write after it not (the Trainer here saves nothing); the whole call is reported too
    return {"samples_per_s": len(samples) / res["seconds"], "steady_samples_per_s": res["samples_per_s"],
            "whole_call_s": wall,
            "steps": res["steps"], "peak_rss_mb": rss_mb(), "last": res["log"][-1] if res["log"] else {}}


def run_hf(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from medvl.data.bundled import load_bundled
    from medvl.models.native import NativeVLM, module_of
    vlm = NativeVLM.from_pretrained(args.model, max_length=256)
    for n, p in vlm.model.named_parameters():
        p.requires_grad = module_of(n) == "connector"
    full = {n for n, p in vlm.model.named_parameters() if p.requires_grad}
    model = get_peft_model(vlm.model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                 target_modules=LORA["target_modules"]))
    for n, p in model.named_parameters():
        if n.removeprefix("base_model.model.") in full:
            p.requires_grad = True
    data = [e for e in (vlm.encode(s) for s in load_bundled("vqa-rad", "train")[:args.samples]) if e is not None]

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data[i]
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=args.batch, num_train_epochs=1,
                                  learning_rate=1e-3, warmup_steps=5, bf16=True, use_cpu=True, report_to=[],
                                  save_strategy="no", logging_strategy="no", remove_unused_columns=False,
                                  dataloader_num_workers=0, disable_tqdm=True)
        out = Trainer(model=model, args=targs, train_dataset=DS(), data_collator=vlm.collate).train()
    return {"samples_per_s": out.metrics["train_samples_per_second"], "peak_rss_mb": rss_mb()}


def child(args) -> int:
    """One measurement in its own process (peak memory per run)."""
    out = Path(args.work) / args.child
    if args.child == "medvl_lora":
        r = run_medvl(args, out)
    elif args.child == "hf_lora":
        r = run_hf(args)
    elif args.child == "kd_live":
        r = run_medvl(args, out, distill={"teacher": str(args.teacher), "alpha": 0.5, "temperature": 0.5})
    elif args.child == "make_cache":
        from medvl.data.bundled import load_bundled
        from medvl.distill.teacher import cache_teacher
        t0 = time.perf_counter()
        cache_teacher(args.teacher, load_bundled("vqa-rad", "train")[:args.samples], Path(args.work) / "cache", topk=32,
                      max_length=256, batch_size=args.batch, progress=False)
        r = {"cache_seconds": time.perf_counter() - t0, "peak_rss_mb": rss_mb()}
    elif args.child == "kd_cached":
        r = run_medvl(args, out, distill={"teacher_cache": str(Path(args.work) / "cache"), "alpha": 0.5,
                                          "temperature": 0.5})
    else:
        raise SystemExit(f"unknown child {args.child}")
    Path(args.result).write_text(json.dumps(r))
    return 0


def spawn(args, name: str) -> dict:
    res = Path(args.work) / f"{name}.json"
    cmd = [sys.executable, __file__, "--child", name, "--result", str(res), "--work", str(args.work), "--model",
           str(args.model), "--teacher", str(args.teacher), "--samples", str(args.samples), "--batch", str(args.batch)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{name} failed:\n{r.stderr[-3000:]}")
    return json.loads(res.read_text())


def dist_runs(args) -> dict:
    from medvl.data.bundled import load_bundled
    from medvl.data.schema import write_jsonl
    data = Path(args.work) / "d.jsonl"
    write_jsonl(load_bundled("vqa-rad", "train")[:args.samples], data)
    recipe = str(ROOT / "recipes" / "vlm-sft-vqarad.yaml")  # full fine-tuning of merger + LM (FSDP takes no LoRA)
    out = {}
    for name, nproc, extra in (("1 process", 1, []), ("DDP", 2, ["distributed=ddp"]),
                               ("FSDP2 (ZeRO-3)", 2, ["distributed=fsdp"]),
                               ("DeepSpeed ZeRO-2", 2, ["distributed=deepspeed"])):
        run_dir = Path(args.work) / f"dist-{nproc}-{name.split()[0]}"
        launch = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=29601"]
                  if nproc > 1 else [sys.executable])
        batch = args.batch // nproc  # the same global batch
        cmd = launch + ["-m", "medvl.cli", "train", recipe, f"native={args.model}", f"data.path={data}", "epochs=1",
                        f"batch_size={batch}", "precision=bf16", f"output_dir={run_dir}", "log_every=1",
                        "warmup_steps=5", "max_length=256", *extra]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(2 // nproc)})
        if r.returncode:
            raise RuntimeError(f"{name} failed:\n{r.stderr[-3000:]}")
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        out[name] = {"tokens_per_s": rows[-1]["tokens_per_s"], "wall_s": time.perf_counter() - t0,
                     "final_loss": rows[-1]["loss"]}
        print(f"  {name}: {out[name]['tokens_per_s']:.0f} tokens/s, final loss {out[name]['final_loss']:.3f}", flush=True)
    base = out["1 process"]["tokens_per_s"]
    for v in out.values():
        v["vs_1_process"] = v["tokens_per_s"] / base
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--parts", default="lora,kd,dist")
    ap.add_argument("--vocab", type=int, default=151_936,
                    help="LM embedding rows (default Qwen2-VL-2B's 151,936; the tokenizer uses the first ~1k)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "native.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--teacher", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    parts = set(args.parts.split(","))
    results: dict = {"samples": args.samples, "batch": args.batch, "vocab": args.vocab}
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        args.model, args.teacher = Path(work) / "student", Path(work) / "teacher"
        build(args.model, 256, 0, args.vocab)
        build(args.teacher, 512, 1, args.vocab)
        if "lora" in parts:
            m, h = spawn(args, "medvl_lora"), spawn(args, "hf_lora")
            results["lora"] = {"medvl": m, "hf_trainer_peft": h, "ratio": m["samples_per_s"] / h["samples_per_s"]}
            print(f"LoRA SFT: medvl {m['samples_per_s']:.1f} samples/s, peft + HF Trainer {h['samples_per_s']:.1f} "
                  f"-> {results['lora']['ratio']:.2f}x", flush=True)
        if "kd" in parts:
            live, made, cached = spawn(args, "kd_live"), spawn(args, "make_cache"), spawn(args, "kd_cached")
            cached["cache_seconds"] = made["cache_seconds"]
            results["kd"] = {"live": live, "cached": cached, "caching": made,
                             "speed_ratio": cached["samples_per_s"] / live["samples_per_s"]}
            print(f"KD: live teacher {live['samples_per_s']:.1f} samples/s (peak {live['peak_rss_mb']:.0f} MB), cached "
                  f"top-32 {cached['samples_per_s']:.1f} samples/s (peak {cached['peak_rss_mb']:.0f} MB; caching took "
                  f"{cached['cache_seconds']:.1f} s) -> {results['kd']['speed_ratio']:.2f}x", flush=True)
        if "dist" in parts:
            results["dist"] = dist_runs(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
