"""Distillation step cost: live teacher vs cached top-k teacher logits, same run.

    python benchmarks/bench_distill.py [--samples 1024] [--topk 32]

Teacher: the shipped ``medvl-vqarad-small``; student: its tower and connector with a Qwen2
of 2 layers x 128 (scripts/distill_experiment.py's student). One epoch over the first
``--samples`` VQA-RAD training questions, batch 32, bf16 autocast, in three child processes
so each peak resident memory is its own: CE only (no teacher), KD with the live teacher, KD
from the cached top-k logits (written first, by ``cache_teacher``; its time is reported
separately — it is paid once per dataset, not per epoch or per student).
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def child(mode: str, samples: int, cache: str) -> None:
    from distill_experiment import STUDENT_LLM

    from medvl.data.bundled import load_bundled
    from medvl.train.vlm import VLMTrainConfig, train_vlm
    distill = {"live": {"teacher": "medvl-vqarad-small", "alpha": 0.5, "temperature": 0.5},
               "cached": {"teacher_cache": cache, "alpha": 0.5, "temperature": 0.5}, "ce": {}}[mode]
    cfg = VLMTrainConfig(llm=STUDENT_LLM, epochs=1, warmup_steps=10, log_every=1000, distill=distill,
                         output_dir=tempfile.mkdtemp(prefix=f"medvl-bench-kd-{mode}-"))
    res = train_vlm(cfg, load_bundled("vqa-rad", "train")[:samples], progress=False)
    print(json.dumps({"samples_per_s": res["samples_per_s"], "seconds": res["seconds"],
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--child", choices=["live", "cached", "ce"])
    ap.add_argument("--cache", default="")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "distill.json"))
    args = ap.parse_args()
    if args.child:
        child(args.child, args.samples, args.cache)
        return 0

    from medvl.data.bundled import load_bundled
    from medvl.distill.teacher import cache_teacher
    cache = Path(tempfile.mkdtemp(prefix="medvl-bench-kd-cache-"))
    t0 = time.perf_counter()
    info = cache_teacher("medvl-vqarad-small", load_bundled("vqa-rad", "train")[:args.samples], cache,
                         topk=args.topk, progress=False)
    results: dict = {"samples": args.samples, "topk": args.topk, "cache_seconds": time.perf_counter() - t0,
                     "cache_mb": sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20,
                     "mean_missing_mass": info["mean_missing_mass"]}
    for mode in ("ce", "live", "cached"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--samples", str(args.samples),
                              "--cache", str(cache)], capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    r = results
    saved = r["live"]["peak_rss_mb"] - r["cached"]["peak_rss_mb"]
    r["memory_saved_mb"] = saved
    r["speedup_cached_vs_live"] = r["cached"]["samples_per_s"] / r["live"]["samples_per_s"]
    print(f"{args.samples} samples, batch 32, bf16, student Qwen2 2x128, teacher medvl-vqarad-small:")
    for mode, label in (("ce", "CE only (no teacher)"), ("live", "KD, live teacher"),
                        ("cached", f"KD, cached top-{args.topk}")):
        print(f"  {label:<24} {r[mode]['samples_per_s']:7.1f} samples/s   peak RSS {r[mode]['peak_rss_mb']:6.0f} MB")
    print(f"cached vs live: {r['speedup_cached_vs_live']:.2f}x samples/s, {saved:.0f} MB less peak memory; the cache "
          f"took {r['cache_seconds']:.1f} s once and holds {r['cache_mb']:.1f} MB; teacher mass outside the top "
          f"{args.topk}: {r['mean_missing_mass']:.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
