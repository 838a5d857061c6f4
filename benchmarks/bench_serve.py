"""Load test of `medvl serve` on loopback: continuous batching vs one request at a time, same
server build, same run — closed-loop clients, open-loop Poisson arrivals, zero-shot, memory.

    python benchmarks/bench_serve.py [--requests 256] [--memory-requests 10000]
                                     [--model medvl-vqarad-small] [--clip medclip-r10t-minilm]
                                     [--baseline-src PATH] [--pin] [--precision auto|fp32|bf16]
    python benchmarks/bench_serve.py --rounds 5 ...   # only the 16-client ratios, interleaved
    python benchmarks/bench_serve.py --memory-only ...  # only the server's RSS over 10,000 requests
    python benchmarks/bench_serve.py --zero-shot-ceiling ...  # in process: what batching can give zero-shot
    python benchmarks/bench_serve.py --ab /tmp/medvl-old . ...  # builds side by side, chat phases alternating

Each server runs in its own process (``medvl serve --model MODEL --clip CLIP``; by default the
first shipped VLM and CLIP, which the earlier builds can serve too — ``--model
medvl-vqarad-smollm2 --clip medclip-r10t-minilm-v2`` measures today's defaults), started as
``--max-batch 32`` (continuous batching) and ``--max-batch 1`` (one request at a time: the same code with one row in flight and CLIP
batches of one). ``--baseline-src PATH`` adds a third server started from another checkout
of medvl (e.g. ``git worktree add /tmp/medvl-old <commit>``), to compare with an earlier
build side by side.

Chat requests are VQA-RAD test questions with their image as a JPEG data URI, greedy,
``max_tokens`` 8, through the OpenAI chat endpoint, in test-set order (so consecutive
questions often share an image, as a radiologist asks several about one study).

* closed loop: N client threads, one keep-alive connection each, a new request as soon as
  the previous answer arrives; answers/s, p50 / p99 latency, errors; at 1 and 16 clients.
* open loop: requests sent at Poisson-distributed times at a set rate, whatever the server's
  state (a client never waits for an answer before sending the next), at rising rates until
  p99 passes ``--p99-limit`` or errors appear; latency counts from the scheduled send time.
* zero-shot: 16 closed-loop clients on ``/v1/zero-shot`` with the three organ labels.
* memory: the server's VmRSS every 500 requests over ``--memory-requests`` chat requests at
  16 clients (continuous server only).

With ``--pin`` the server runs on CPU 1 and the load generator on CPU 0 (``taskset``; torch
gets one thread) — each side has one core and cannot steal the other's; without it both
float over the 2 cores (the server's torch uses 2 threads). Results go to
``benchmarks/results/serve.json`` and the latency plot to ``docs/img/serve_latency.png``.

``--rounds N`` measures only the 16-client chat and zero-shot ratios, with both servers up at
once (the ``--baseline-src`` one too, for its p99 side by side) and their phases alternating for
N rounds, and reports the median and range: on a shared
2-core machine one server's phases can land in a slow spell (seen: a one-at-a-time server at
6.2 answers/s in one full run and 11.6-12.6 in others), which a single sequential run cannot tell
from a real difference.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(max_batch: int, model: str, clip: str, src: Path | None = None,
          pin: bool = False, precision: str | None = None, extra: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    cmd = [sys.executable, "-m", "medvl.cli", "serve", "--model", model, "--clip", clip,
           "--port", str(port), "--max-batch", str(max_batch), "--max-queue", "512"]
    if precision and src is None:  # another checkout may predate --precision: it runs its own default
        cmd += ["--precision", precision]
    if extra and src is None:
        cmd += extra
    if pin:
        env["OMP_NUM_THREADS"] = "1"
        cmd = ["taskset", "-c", "1"] + cmd
    proc = subprocess.Popen(cmd, env=env, cwd=str(src or ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import httpx
    url = f"http://127.0.0.1:{port}"
    for _ in range(900):
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def chat_bodies(model: str) -> list[dict]:
    from medvl.data.bundled import load_bundled
    out = []
    for s in load_bundled("vqa-rad", "test"):
        uri = "data:image/jpeg;base64," + base64.b64encode(Path(s.images[0].path).read_bytes()).decode()
        q = s.conversation[0].text.replace("<image>\n", "")
        out.append({"model": Path(model).name, "max_tokens": 8,
                    "messages": [{"role": "user", "content": [{"type": "text", "text": q},
                                                               {"type": "image_url", "image_url": {"url": uri}}]}]})
    return out


def zero_shot_bodies() -> list[dict]:
    from medvl.data.bundled import load_bundled
    seen, out = set(), []
    for s in load_bundled("vqa-rad", "test"):
        p = s.images[0].path
        if p not in seen:
            seen.add(p)
            out.append({"image": "data:image/jpeg;base64," + base64.b64encode(Path(p).read_bytes()).decode(),
                        "labels": ["head", "chest", "abdomen"]})
    return out


def summarise(lat: list[float], errors: int, wall: float, **extra) -> dict:
    lat = sorted(lat)
    if not lat:
        return {"requests": 0, "errors": errors, **extra}
    return {"requests": len(lat), "errors": errors, "answers_per_s": (len(lat) - errors) / wall,
            "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            **extra}


def closed_loop(url: str, path: str, reqs: list[dict], clients: int, n: int, on_done=None,
                limit_s: float = 300.0) -> dict:
    import httpx
    lat: list[float] = []
    errors, counter = [0], [0]
    lock = threading.Lock()
    t_end = time.monotonic() + limit_s

    def client():
        with httpx.Client(timeout=120) as c:
            while time.monotonic() < t_end:
                with lock:
                    k = counter[0]
                    if k >= n:
                        return
                    counter[0] += 1
                t0 = time.perf_counter()
                try:
                    ok = c.post(url + path, json=reqs[k % len(reqs)]).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    lat.append(time.perf_counter() - t0)
                    errors[0] += not ok
                    if on_done:
                        on_done(len(lat))
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarise(lat, errors[0], time.perf_counter() - t0, clients=clients)


def open_loop(url: str, reqs: list[dict], rate: float, seconds: float, seed: int = 0) -> dict:
    """Poisson arrivals at ``rate`` per second for ``seconds``; latency from the scheduled time."""
    import httpx

    async def run() -> dict:
        rng = random.Random(seed)
        lat: list[float] = []
        errors = [0]
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=120, limits=limits) as c:
            async def one(k: int, at: float) -> None:
                try:
                    ok = (await c.post(url + "/v1/chat/completions", json=reqs[k % len(reqs)])).status_code == 200
                except httpx.HTTPError:
                    ok = False
                lat.append(time.perf_counter() - at)
                errors[0] += not ok
            tasks, t0, t, k = [], time.perf_counter(), 0.0, 0
            while True:
                t += rng.expovariate(rate)
                if t > seconds:
                    break
                delay = t0 + t - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(k, t0 + t)))
                k += 1
            await asyncio.gather(*tasks)
            return summarise(lat, errors[0], time.perf_counter() - t0, offered_per_s=rate)
    return asyncio.run(run())


def bench_server(name: str, url: str, proc, chat: list[dict], zs: list[dict], args) -> dict:
    import httpx
    closed_loop(url, "/v1/chat/completions", chat, 4, 32)  # warm-up
    closed_loop(url, "/v1/zero-shot", zs, 4, 16)
    out: dict = {}
    out["c1"] = closed_loop(url, "/v1/chat/completions", chat, 1, min(64, args.requests))
    before = httpx.get(url + "/ready").json()
    out["c16"] = closed_loop(url, "/v1/chat/completions", chat, 16, args.requests)
    after = httpx.get(url + "/ready").json()
    if "chat" in after:  # this build's continuous decoder
        b, a = before["chat"], after["chat"]
        out["c16"]["mean_rows_per_step"] = (a["row_steps"] - b["row_steps"]) / max(1, a["steps"] - b["steps"])
        out["vision_cache"] = a["vision_cache"]
        out["image_span_cache"] = a.get("image_span_cache")
    out["zero_shot_c16"] = closed_loop(url, "/v1/zero-shot", zs, 16, args.requests)
    out["zero_shot_c1"] = closed_loop(url, "/v1/zero-shot", zs, 1, min(64, args.requests))
    out["open_loop"] = []
    for rate in args.rates:
        r = open_loop(url, chat, rate, args.open_seconds)
        out["open_loop"].append(r)
        print(f"  {name}: offered {rate:5.1f}/s -> {r.get('answers_per_s', 0):5.1f} answers/s, p50 "
              f"{r.get('p50_ms', 0):7.1f} ms, p99 {r.get('p99_ms', 0):7.1f} ms, errors {r['errors']}", flush=True)
        if r["errors"] or r.get("p99_ms", 0) > args.p99_limit:
            break
    out["rss_mb_end"] = rss_mb(proc.pid)
    return out


def server_args(args) -> list[str]:
    return [] if args.span_cache_mb is None else ["--span-cache-mb", str(args.span_cache_mb)]


def ab(args, chat) -> dict:
    """Builds side by side: one server per ``--ab`` checkout ("." = this one) up at once, their
    16-client chat phases of ``--ab-requests`` alternating for ``--ab-phases`` phases; answers/s,
    p99, errors, RSS and the after-trim floor per phase. Alternating phases put the machine's
    drifts on every build alike."""
    import httpx
    servers = {}
    try:
        for src in args.ab:
            path = None if src == "." else Path(src)
            servers[src] = start(32, args.model, args.clip, path, args.pin, args.precision, server_args(args))
        for _, url in servers.values():
            closed_loop(url, "/v1/chat/completions", chat, 4, 32)  # warm-up
        phases = []
        for k in range(args.ab_phases):
            row = {}
            for src, (proc, url) in servers.items():
                r = closed_loop(url, "/v1/chat/completions", chat, 16, args.ab_requests)
                floor = httpx.get(url + "/ready", timeout=5).json().get("chat", {}).get("rss_after_trim_mb")
                row[src] = {"answers_per_s": r["answers_per_s"], "p99_ms": r["p99_ms"], "errors": r["errors"],
                            "rss_mb": rss_mb(proc.pid), "rss_after_trim_mb": floor}
            phases.append(row)
            print(f"phase {k}: " + "; ".join(f"{src}: {x['answers_per_s']:.1f}/s p99 {x['p99_ms']:.0f} ms err "
                                            f"{x['errors']} rss {x['rss_mb']:.0f} MB" for src, x in row.items()), flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    return {"ab": {"builds": args.ab, "requests_per_phase": args.ab_requests, "phases": phases}}


def memory_only(args, chat: list[dict]) -> dict:
    """The continuous server's VmRSS every 500 requests over ``--memory-requests`` chat requests at 16
    clients, after the usual warm-up."""
    proc, url = start(32, args.model, args.clip, None, args.pin, args.precision, server_args(args))
    try:
        closed_loop(url, "/v1/chat/completions", chat, 4, 32)
        import httpx
        mem, floor = [(0, rss_mb(proc.pid))], []

        def sample(done: int) -> None:
            if done % 500 == 0:
                mem.append((done, rss_mb(proc.pid)))
                try:  # the server's own RSS right after its last heap trim: no trim-phase swing
                    floor.append((done, httpx.get(url + "/ready", timeout=10).json()["chat"].get("rss_after_trim_mb")))
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
        rm = closed_loop(url, "/v1/chat/completions", chat, 16, args.memory_requests, on_done=sample, limit_s=1800)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"server RSS over {rm['requests']} requests (errors {rm['errors']}, {rm['answers_per_s']:.1f}/s): "
          + ", ".join(f"{n}: {v:.0f}" for n, v in mem) + " MB")
    print("right after the last trim: " + ", ".join(f"{n}: {v:.0f}" for n, v in floor if v) + " MB")
    return {"memory": {"requests": rm["requests"], "errors": rm["errors"], "answers_per_s": rm["answers_per_s"],
                       "rss_mb": mem, "rss_after_trim_mb": floor}}


def zero_shot_ceiling(args, zs: list[dict]) -> dict:
    """In process, no HTTP: what one zero-shot request costs at batch 1 and in a batch of 16 — the
    upload's decode + preprocessing (paid per request either way) and the image tower per image —
    and the ratio the batch could give if HTTP and the clients cost nothing."""
    import torch

    from medvl.models.clip import load_clip
    from medvl.models.precision import for_inference
    from medvl.serve.clip_batch import ClipRunner
    from medvl.serve.uploads import UploadStore
    clip = load_clip(args.clip).eval()
    prec = for_inference(clip, args.precision)
    runner, store = ClipRunner(clip), UploadStore(16 * 2**20, 40_000_000)

    def prepare(body):
        media, img = store.decode(body["image"])
        store.release(media)
        return runner.pixels([img])  # [1, 3, S, S]

    def per_call_ms(fn, n_items: int, seconds: float = 3.0) -> float:
        fn()
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            fn()
            k += 1
        return 1000 * (time.perf_counter() - t0) / (k * n_items)
    px = [prepare(b) for b in zs[:16]]
    items = [{"kind": "zero-shot", "pixels": p, "labels": ["head", "chest", "abdomen"]} for p in px]
    with torch.no_grad():
        out = {"precision": prec,
               "prepare_ms": per_call_ms(lambda: [prepare(b) for b in zs[:16]], 16),
               "tower_b1_ms": per_call_ms(lambda: clip.encode_image(px[0]), 1),
               "tower_b16_ms": per_call_ms(lambda: clip.encode_image(torch.cat(px)), 16),
               "runner_b1_ms": per_call_ms(lambda: runner(items[:1]), 1),
               "runner_b16_ms": per_call_ms(lambda: runner(items), 16)}
    out["tower_ratio"] = out["tower_b1_ms"] / out["tower_b16_ms"]
    out["ceiling_ratio"] = (out["prepare_ms"] + out["runner_b1_ms"]) / (out["prepare_ms"] + out["runner_b16_ms"])
    print(f"zero-shot in process ({prec}): decode + preprocess {out['prepare_ms']:.2f} ms/request; tower "
          f"{out['tower_b1_ms']:.2f} ms alone, {out['tower_b16_ms']:.2f} ms/image in 16 ({out['tower_ratio']:.2f}x); "
          f"runner {out['runner_b1_ms']:.2f} / {out['runner_b16_ms']:.2f} ms; with the per-request work "
          f"{out['ceiling_ratio']:.2f}x at most (one core each; HTTP and clients not counted)")
    return {"zero_shot_ceiling": out}


def interleaved(args, chat: list[dict], zs: list[dict]) -> dict:
    """Both of this build's servers up at once (an idle one costs no CPU), 16-client closed-loop
    chat and zero-shot phases alternating between them for ``--rounds`` rounds: a burst of noise on
    the shared machine then lands on both sides, and the ratio comes with its spread."""
    runs = [("continuous", 32, None), ("one_at_a_time", 1, None)]
    if args.baseline_src:  # a third server from another checkout, in the same rounds
        runs.append((args.baseline_name, 32, Path(args.baseline_src)))
    procs = {name: start(mb, args.model, args.clip, src, args.pin, args.precision, server_args(args))
             for name, mb, src in runs}
    out: dict = {"rounds": []}
    try:
        for _, url in procs.values():  # warm-up
            closed_loop(url, "/v1/chat/completions", chat, 4, 32)
            closed_loop(url, "/v1/zero-shot", zs, 4, 16)
        for k in range(args.rounds):
            rnd = {}
            for name, (_, url) in procs.items():
                rnd[name] = {"chat": closed_loop(url, "/v1/chat/completions", chat, 16, args.requests),
                             "zero_shot": closed_loop(url, "/v1/zero-shot", zs, 16, args.requests)}
            c, o = rnd["continuous"], rnd["one_at_a_time"]
            rnd["chat_ratio"] = c["chat"]["answers_per_s"] / o["chat"]["answers_per_s"]
            rnd["zero_shot_ratio"] = c["zero_shot"]["answers_per_s"] / o["zero_shot"]["answers_per_s"]
            out["rounds"].append(rnd)
            print(f"round {k}: chat {c['chat']['answers_per_s']:.1f} vs {o['chat']['answers_per_s']:.1f}/s = "
                  f"{rnd['chat_ratio']:.2f}x, zero-shot {c['zero_shot']['answers_per_s']:.1f} vs "
                  f"{o['zero_shot']['answers_per_s']:.1f}/s = {rnd['zero_shot_ratio']:.2f}x", flush=True)
            if args.baseline_src:
                b = rnd[args.baseline_name]
                print(f"  chat p99 {c['chat']['p99_ms']:.0f} ms vs {b['chat']['p99_ms']:.0f} ms ({args.baseline_name}, "
                      f"{b['chat']['answers_per_s']:.1f}/s); zero-shot p99 {c['zero_shot']['p99_ms']:.0f} vs "
                      f"{b['zero_shot']['p99_ms']:.0f} ms", flush=True)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(timeout=30)
    for key in ("chat_ratio", "zero_shot_ratio"):
        xs = sorted(r[key] for r in out["rounds"])
        out[key] = {"median": statistics.median(xs), "min": xs[0], "max": xs[-1]}
    for name in procs:
        xs = sorted(r[name]["chat"]["p99_ms"] for r in out["rounds"])
        out.setdefault("chat_p99_ms", {})[name] = {"median": statistics.median(xs), "min": xs[0], "max": xs[-1]}
    print(f"median over {args.rounds} rounds: chat {out['chat_ratio']['median']:.2f}x "
          f"[{out['chat_ratio']['min']:.2f}, {out['chat_ratio']['max']:.2f}], zero-shot "
          f"{out['zero_shot_ratio']['median']:.2f}x [{out['zero_shot_ratio']['min']:.2f}, "
          f"{out['zero_shot_ratio']['max']:.2f}]")
    return out


def plot(results: dict, png: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for k, (name, r) in enumerate(results["servers"].items()):
        pts = [x for x in r["open_loop"] if x.get("requests")]
        if not pts:
            continue
        off, color = [x["offered_per_s"] for x in pts], f"C{k}"
        ax1.plot(off, [x["p99_ms"] for x in pts], "o-", color=color, label=f"{name} p99")
        ax1.plot(off, [x["p50_ms"] for x in pts], "s--", color=color, label=f"{name} p50", alpha=0.5)
        ax2.plot(off, [x["answers_per_s"] for x in pts], "o-", color=color, label=name)
    ax1.set_xlabel("offered load (requests/s, Poisson)")
    ax1.set_ylabel("latency (ms)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=7)
    ax2.plot([0, max(results["rates"])], [0, max(results["rates"])], ":", color="0.6", label="= offered")
    ax2.set_xlabel("offered load (requests/s)")
    ax2.set_ylabel("answers/s")
    ax2.legend(fontsize=7)
    model = Path(results.get("model", "medvl-vqarad-small")).name
    pinned = " (server and load pinned apart)" if results["pinned"] else ""
    fig.suptitle(f"medvl serve ({model}), VQA-RAD chat with images, 2 CPU cores{pinned}", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--memory-requests", type=int, default=10_000)
    ap.add_argument("--rates", type=float, nargs="+", default=[5, 10, 20, 40, 60, 80, 120, 160])
    ap.add_argument("--open-seconds", type=float, default=8.0, help="seconds of arrivals per open-loop rate")
    ap.add_argument("--p99-limit", type=float, default=3000.0, help="stop raising the rate past this p99 (ms)")
    ap.add_argument("--model", default="medvl-vqarad-small", help="VLM the servers load")
    ap.add_argument("--clip", default="medclip-r10t-minilm", help="CLIP the servers load")
    ap.add_argument("--baseline-src", help="another medvl checkout to start a third server from")
    ap.add_argument("--baseline-name", default="windowed_baseline", help="its name in the results and the plot")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="this build's servers' --precision (auto: bf16 on CPUs with AMX / AVX512-BF16)")
    ap.add_argument("--pin", action="store_true", help="server on CPU 1, load generator on CPU 0 (taskset)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "img" / "serve_latency.png"))
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from --out")
    ap.add_argument("--span-cache-mb", type=float, default=None,
                    help="this build's servers' --span-cache-mb (0: no image-span KV reuse; default: the server's)")
    ap.add_argument("--memory-only", action="store_true", help="only the continuous server's RSS over --memory-requests")
    ap.add_argument("--zero-shot-ceiling", action="store_true",
                    help="only the in-process costs of a zero-shot request, alone and in a batch of 16 (no server)")
    ap.add_argument("--ab", nargs="+", metavar="SRC",
                    help="only alternating 16-client chat phases between builds: checkouts ('.' = this one)")
    ap.add_argument("--ab-phases", type=int, default=4)
    ap.add_argument("--ab-requests", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=0,
                    help="only the 16-client ratios: both servers up, phases alternating for N rounds (median, range)")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads(Path(args.out).read_text()), Path(args.plot))
        return 0
    if args.pin:
        if not shutil.which("taskset") or (os.cpu_count() or 1) < 2:
            raise SystemExit("--pin needs taskset and 2 CPUs")
        os.sched_setaffinity(0, {0})
    chat, zs = chat_bodies(args.model), zero_shot_bodies()
    if args.rounds or args.memory_only or args.zero_shot_ceiling or args.ab:
        part = ab(args, chat) if args.ab else memory_only(args, chat) if args.memory_only else \
            zero_shot_ceiling(args, zs) if args.zero_shot_ceiling else interleaved(args, chat, zs)
        res = {"model": args.model, "clip": args.clip, "precision": args.precision, "pinned": args.pin,
               "span_cache_mb": args.span_cache_mb, **part}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
        return 0
    results: dict = {"pinned": args.pin, "rates": args.rates, "model": args.model, "clip": args.clip,
                     "precision": args.precision, "servers": {}}
    runs = [("continuous", 32, None), ("one_at_a_time", 1, None)]
    if args.baseline_src:
        runs.append((args.baseline_name, 32, Path(args.baseline_src)))
    for name, mb, src in runs:
        print(f"{name}: starting", flush=True)
        proc, url = start(mb, args.model, args.clip, src, args.pin, args.precision, server_args(args))
        try:
            import httpx
            prec = httpx.get(url + "/ready", timeout=5).json().get("chat", {}).get("precision", "fp32")
            print(f"{name}: precision {prec}", flush=True)
            results["servers"][name] = r = bench_server(name, url, proc, chat, zs, args)
            r["precision"] = prec
            if name == "continuous" and args.memory_requests:
                mem = [(0, rss_mb(proc.pid))]

                def sample(done: int) -> None:
                    if done % 500 == 0:
                        mem.append((done, rss_mb(proc.pid)))
                rm = closed_loop(url, "/v1/chat/completions", chat, 16, args.memory_requests, on_done=sample,
                                 limit_s=900)
                r["memory"] = {"requests": rm["requests"], "errors": rm["errors"], "rss_mb": mem}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    S = results["servers"]
    c, o = S["continuous"], S["one_at_a_time"]
    results["chat_ratio_16_clients"] = c["c16"]["answers_per_s"] / o["c16"]["answers_per_s"]
    results["zero_shot_ratio_16_clients"] = c["zero_shot_c16"]["answers_per_s"] / o["zero_shot_c16"]["answers_per_s"]
    for name, r in S.items():
        for key in ("c1", "c16", "zero_shot_c1", "zero_shot_c16"):
            x = r[key]
            print(f"{name:<18} {key:<14} {x['answers_per_s']:7.1f}/s  p50 {x['p50_ms']:7.1f} ms  p99 {x['p99_ms']:7.1f} ms"
                  f"  errors {x['errors']} of {x['requests']}"
                  + (f"  rows/step {x['mean_rows_per_step']:.1f}" if "mean_rows_per_step" in x else ""))
    print(f"continuous vs one at a time, 16 clients: chat {results['chat_ratio_16_clients']:.2f}x, "
          f"zero-shot {results['zero_shot_ratio_16_clients']:.2f}x")
    if args.baseline_src:
        w = S[args.baseline_name]
        print(f"vs the baseline build at 16 clients: chat {c['c16']['answers_per_s'] / w['c16']['answers_per_s']:.2f}x, "
              f"p99 {c['c16']['p99_ms']:.0f} vs {w['c16']['p99_ms']:.0f} ms")
    if "memory" in c:
        m = c["memory"]
        print(f"server RSS over {m['requests']} requests (errors {m['errors']}): "
              + ", ".join(f"{n}: {v:.0f}" for n, v in m["rss_mb"]) + " MB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    plot(results, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
