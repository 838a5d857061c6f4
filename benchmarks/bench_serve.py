"""Load test of `medvl serve` on loopback: batching on vs one request at a time, same model, same run.

    python benchmarks/bench_serve.py [--requests 256] [--memory-requests 1000]

The server runs in its own process (``medvl serve --model medvl-vqarad-small --clip ''``),
started twice: ``--max-batch 32`` (dynamic batching, 10 ms window) and ``--max-batch 1``
(one request at a time). Clients are threads with one keep-alive ``httpx`` connection each,
sending VQA-RAD test questions with their image as a JPEG data URI, greedy, ``max_tokens`` 8,
through the OpenAI chat endpoint. Reported per server: answers/s with 16 concurrent clients,
p50 / p99 latency at 1 and at 16 clients, the error count, and the server's resident memory
(VmRSS from /proc) every 100 requests over ``--memory-requests`` requests (16 clients,
batching on) — flat memory means no leak per request (uploads are deleted, caches bounded).
Counts and time are bounded: each phase stops at its request count or after 300 s.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(max_batch: int, tower: str = "fp32", wait_ms: float = 10.0) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "medvl.cli", "serve", "--model", "medvl-vqarad-small", "--clip", "",
                             "--port", str(port), "--max-batch", str(max_batch), "--max-queue", "256",
                             "--tower-precision", tower, "--batch-wait-ms", str(wait_ms)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import httpx
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bodies() -> list[dict]:
    from medvl.data.bundled import load_bundled
    out = []
    for s in load_bundled("vqa-rad", "test"):
        uri = "data:image/jpeg;base64," + base64.b64encode(Path(s.images[0].path).read_bytes()).decode()
        q = s.conversation[0].text.replace("<image>\n", "")
        out.append({"model": "medvl-vqarad-small", "max_tokens": 8,
                    "messages": [{"role": "user", "content": [{"type": "text", "text": q},
                                                               {"type": "image_url", "image_url": {"url": uri}}]}]})
    return out


def load(url: str, reqs: list[dict], clients: int, n: int, on_done=None, limit_s: float = 300.0) -> dict:
    import httpx
    lat: list[float] = []
    errors = [0]
    counter = [0]
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
                    r = c.post(url + "/v1/chat/completions", json=reqs[k % len(reqs)])
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    errors[0] += not ok
                    if on_done:
                        on_done(len(lat))
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {"clients": clients, "requests": len(lat), "errors": errors[0], "answers_per_s": len(lat) / wall,
            "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--memory-requests", type=int, default=1000)
    ap.add_argument("--tower-precision", choices=["fp32", "bf16"], default="fp32", help="for both servers")
    ap.add_argument("--batch-wait-ms", type=float, default=10.0, help="the batching window of the batched server")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "serve.json"))
    args = ap.parse_args()
    reqs = bodies()
    results: dict = {"tower_precision": args.tower_precision}
    for name, mb in (("batched", 32), ("one_at_a_time", 1)):
        proc, url = start(mb, args.tower_precision, args.batch_wait_ms if mb > 1 else 0.0)
        try:
            load(url, reqs, 4, 16)  # warm-up
            import httpx
            before = httpx.get(url + "/ready").json()
            r16 = load(url, reqs, 16, args.requests)
            after = httpx.get(url + "/ready").json()
            if after["batches"] > before["batches"]:
                r16["mean_batch"] = ((after["batched_requests"] - before["batched_requests"])
                                     / (after["batches"] - before["batches"]))
            r1 = load(url, reqs, 1, min(64, args.requests))
            results[name] = {"c16": r16, "c1": r1}
            if name == "batched":
                mem = [(0, rss_mb(proc.pid))]

                def sample(done: int) -> None:
                    if done % 100 == 0:
                        mem.append((done, rss_mb(proc.pid)))
                rm = load(url, reqs, 16, args.memory_requests, on_done=sample)
                results["memory"] = {"requests": rm["requests"], "errors": rm["errors"], "rss_mb": mem}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    b, s = results["batched"], results["one_at_a_time"]
    results["throughput_ratio_16_clients"] = b["c16"]["answers_per_s"] / s["c16"]["answers_per_s"]
    for name in ("batched", "one_at_a_time"):
        for c in ("c1", "c16"):
            r = results[name][c]
            print(f"{name:<14} {r['clients']:>2} client(s): {r['answers_per_s']:6.1f} answers/s  p50 {r['p50_ms']:7.1f} ms  "
                  f"p99 {r['p99_ms']:7.1f} ms  errors {r['errors']} of {r['requests']}"
                  + (f"  mean batch {r['mean_batch']:.1f}" if "mean_batch" in r else ""))
    m = results["memory"]
    print(f"batching on vs one at a time, 16 clients: {results['throughput_ratio_16_clients']:.2f}x answers/s")
    print(f"server RSS over {m['requests']} requests (errors {m['errors']}): "
          + ", ".join(f"{n}: {v:.0f} MB" for n, v in m["rss_mb"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
