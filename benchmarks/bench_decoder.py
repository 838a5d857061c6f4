"""The serving decoder without HTTP: what continuous batching and the model's precision buy,
measured in process on the VQA-RAD test questions, each configuration in a fresh process.

    python benchmarks/bench_decoder.py [--model medvl-vqarad-smollm2] [--requests 128]
                                       [--precisions fp32 bf16] [--batches 1 32] [--repeats 2]

A configuration is (precision, max_batch): the decoder of ``medvl serve``
(:class:`medvl.generate.continuous.ContinuousDecoder`, prompt-prefix, image-span and vision caches on)
loaded as the server loads it, warmed up on 16 requests, then given ``--requests`` VQA-RAD
test questions (with their images, greedy, 8 new tokens) all at once: ms per answer is the
wall-clock over the answers. ``max_batch 1`` is one request at a time (the load test's
baseline); ``32`` is continuous batching. Each runs in its own process (a decoder made after
another one was closed in the same process ran ~45 % slower, which would bias the order).
The answers of every configuration are compared with the same precision one at a time (greedy
answers under load should equal answers served alone) and with fp32 one at a time (what a
precision changes): the shares that are identical are printed beside the speed.
Results: ``benchmarks/results/decoder.json``.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_one(model: str, precision: str, max_batch: int, n: int) -> dict:
    """One configuration in this process: ms per answer and the answers."""
    import torch

    from medvl.data.bundled import load_bundled
    from medvl.data.schema import Sample, Turn
    from medvl.generate.continuous import content_key
    from medvl.serve.server import ServeConfig, Server
    from medvl.serve.uploads import UploadStore

    server = Server(model, None, ServeConfig(max_batch=max_batch, max_queue=4096, precision=precision))
    test = load_bundled("vqa-rad", "test")
    store = UploadStore(16 * 2**20, 40_000_000)
    reqs = []
    for s in test[: n + 16]:
        uri = "data:image/jpeg;base64," + base64.b64encode(Path(s.images[0].path).read_bytes()).decode()
        media, _ = store.decode(uri)  # as the server decodes an upload
        q = s.conversation[0].text
        sample = Sample(s.id, [media], [Turn("user", q if q.startswith("<image>") else "<image>\n" + q)])
        reqs.append((s.id, sample, content_key(uri.encode())))

    def submit(batch):
        futs = []
        for sid, sample, key in batch:
            settings = {"max_new_tokens": 8, "stop": [], "seed": None, "image_keys": [key]}
            futs.append((sid, server.decoder.submit(server.gen_request(sample, sample.images, settings))))
        return {sid: f.result() for sid, f in futs}

    submit(reqs[:16])  # warm-up: first calls, prefix KV
    server.decoder.vision_cache.clear()  # the timed requests encode their images as they would cold
    server.decoder.prompt_kv.spans.clear()  # and compute their image spans: only repeats within them hit
    t = time.perf_counter()
    answers = submit(reqs[16:16 + n])
    wall = time.perf_counter() - t
    stats = server.decoder.stats()
    server.close()
    return {"precision": precision, "max_batch": max_batch, "requests": n, "ms_per_answer": 1e3 * wall / n,
            "answers_per_s": n / wall, "mean_rows_per_step": stats["mean_rows_per_step"],
            "threads": torch.get_num_threads(), "answers": answers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="medvl-vqarad-smollm2")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=2, help="rounds over all configurations (interleaved)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decoder.json"))
    ap.add_argument("--child", nargs=2, metavar=("PRECISION", "MAX_BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.model, args.child[0], int(args.child[1]), args.requests)))
        return 0
    runs = []
    for rep in range(args.repeats):
        for prec in args.precisions:
            for mb in args.batches:
                out = subprocess.run([sys.executable, __file__, "--model", args.model, "--requests", str(args.requests),
                                      "--child", prec, str(mb)], capture_output=True, text=True, cwd=ROOT)
                if out.returncode:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r["round"] = rep
                runs.append(r)
                print(f"round {rep}  {prec:5s} max_batch {mb:3d}: {r['ms_per_answer']:7.1f} ms/answer "
                      f"({r['answers_per_s']:5.1f}/s, {r['mean_rows_per_step']:.1f} rows/step)", flush=True)
    def same(a: dict | None, b: dict) -> float | None:
        return sum(b[k] == v for k, v in a.items()) / len(a) if a else None

    def answers_of(prec: str, mb: int) -> dict | None:
        return next((r["answers"] for r in runs if r["precision"] == prec and r["max_batch"] == mb), None)

    summary = []
    for prec in args.precisions:
        for mb in args.batches:
            rs = [r for r in runs if r["precision"] == prec and r["max_batch"] == mb]
            summary.append({"precision": prec, "max_batch": mb,
                            "best_ms_per_answer": min(r["ms_per_answer"] for r in rs),
                            "all_ms_per_answer": [r["ms_per_answer"] for r in rs],
                            "same_as_fp32_alone": same(answers_of("fp32", 1), rs[0]["answers"]),
                            "same_as_alone": same(answers_of(prec, 1), rs[0]["answers"])})
    for prec in args.precisions:
        one = next(s for s in summary if s["precision"] == prec and s["max_batch"] == min(args.batches))
        for s in summary:
            if s["precision"] == prec and s is not one:
                s["speedup_over_one_at_a_time"] = one["best_ms_per_answer"] / s["best_ms_per_answer"]
    print("\nprecision  max_batch  ms/answer (best of rounds)  x one at a time  = alone  = fp32 alone")
    fmt = lambda x: "" if x is None else format(x, ".3f")  # noqa: E731
    for s in summary:
        print(f"{s['precision']:9s}  {s['max_batch']:9d}  {s['best_ms_per_answer']:26.1f}  "
              f"{s.get('speedup_over_one_at_a_time', 1.0):15.2f}  {fmt(s['same_as_alone']):>7s}  "
              f"{fmt(s['same_as_fp32_alone']):>11s}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "requests": args.requests, "summary": summary,
                                          "runs": [{k: v for k, v in r.items() if k != "answers"} for r in runs]},
                                         indent=2))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
