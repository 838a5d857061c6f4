"""``medvl serve``: the OpenAI-compatible API and the web page (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse

from medvl.errors import MedvlUserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a VLM (OpenAI chat API) and a CLIP (zero-shot, embeddings) with a web page")
    from medvl.models.hub import DEFAULT_CLIP, DEFAULT_VLM
    p.add_argument("--model", default=DEFAULT_VLM, help=f"VLM folder or shipped name (default {DEFAULT_VLM}; '' for none)")
    p.add_argument("--clip", default=DEFAULT_CLIP, help="CLIP folder or shipped name ('' for none)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 (or env MEDVL_API_KEY)")
    p.add_argument("--max-batch", type=int, default=32,
                   help="chat rows decoding at once, CLIP requests per call (1 = one request at a time)")
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="how long a CLIP batch waits to fill (default 0: it takes what is waiting when the tower is free)")
    p.add_argument("--image-cache-mb", type=float, default=256.0, help="vision tokens kept for repeated images")
    p.add_argument("--span-cache-mb", type=float, default=256.0,
                   help="KV of the image tokens kept for repeated images: a follow-up question prefills only itself (0: off)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 503")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request before 504")
    p.add_argument("--max-tokens", type=int, default=256, help="cap on max_tokens")
    p.add_argument("--max-image-mb", type=float, default=16.0)
    p.add_argument("--max-image-pixels", type=int, default=40_000_000)
    from medvl.models.precision import PRECISIONS
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="the VLM's and the CLIP's weights and compute: auto (default) = bf16 where the CPU/GPU computes it natively "
                        "(4-6x faster matmuls on AMX CPUs; answers may differ from fp32 in a few percent), else fp32")
    p.add_argument("--tower-precision", choices=["fp32", "bf16"], default="fp32",
                   help="run the vision tower under bf16 autocast (faster on CPUs with bf16 units)")
    p.add_argument("--allocator", choices=["auto", "jemalloc", "system"], default="auto",
                   help="heap allocator: auto (default) = jemalloc where the system has it (measured 8-15%% more "
                        "answers/s and a lower p99 than glibc's), else the system's")
    p.set_defaults(func=cmd_serve)


JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")


def allocator_preload(choice: str, environ: dict[str, str]) -> str | None:
    """The library to preload before serving, or None to run as is.

    jemalloc in place of glibc's malloc, as PyTorch's own CPU launcher prefers
    (``torch.backends.xeon.run_cpu``): the decoder frees and allocates tensors of new sizes every
    packed step, which glibc's arenas serve worse. Measured on the 30-block default, 16 chat
    clients, alternating A/B: 59-63 vs 53-56 answers/s, p99 687-741 vs 772-798 ms, lower RSS
    (docs/serve.md). Nothing is downloaded: only a jemalloc the system already has is used
    (Debian/Ubuntu: ``apt install libjemalloc2``); ``auto`` runs as is without one, ``jemalloc``
    without one is an error.
    """
    if choice == "system" or "jemalloc" in environ.get("LD_PRELOAD", ""):
        return None  # the user's choice, or already preloaded (by the user, or this process is the re-exec)
    import ctypes.util
    import os
    found = next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None) or ctypes.util.find_library("jemalloc")
    if found is None and choice == "jemalloc":
        raise MedvlUserError("--allocator jemalloc: no libjemalloc on this system (Debian/Ubuntu: apt install "
                             "libjemalloc2), or use --allocator system")
    return found


KERNEL_CACHE = 128
"""oneDNN kernels kept by the server (oneDNN's default: 1,024)"""


def bound_kernel_cache(capacity: int = KERNEL_CACHE) -> None:
    """Cap oneDNN's cache of compiled kernels for this process (unless the user set
    ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``). Must run before the first kernel is built.

    torch's CPU matmuls and convolutions go through oneDNN, which JIT-compiles a kernel for each
    distinct problem shape and keeps up to 1,024 of them. A packed decode step has a new token
    count almost every step, so under load that cache keeps filling for thousands of requests.
    Measured (30-block default, 16 chat clients, RSS right after each heap trim, 1,500 -> 10,000
    requests): 1,724 -> 1,955 MB with oneDNN's default, 1,531 -> 1,689 MB with 128, the same
    answers/s (51.3 / 50.8); zero-shot the same with 128 (302 / 300 requests/s), 13 % slower with
    16 (the CLIP batches' convolutions then rebuilt every batch). Not capped by default, measured:
    ideep's descriptor cache in front of it (``LRU_CACHE_CAPACITY=128``: 1,413 -> 1,512 MB, but
    7 % fewer answers/s) and PyTorch's own cache of flash-attention tile kernels (unbounded per
    thread; the math attention backend instead: flat, 20 % fewer answers/s). docs/serve.md.
    """
    import os
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))


def loaded_allocator() -> str:
    """Which allocator this process runs on: a preload that failed is reported as not there."""
    try:
        with open("/proc/self/maps") as f:
            return "jemalloc" if "libjemalloc" in f.read() else "system"
    except OSError:
        return "system"


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    import sys
    if not args.model and not args.clip:
        raise MedvlUserError("serve needs a VLM (--model) or a CLIP (--clip); both were given as ''")
    lib = allocator_preload(args.allocator, dict(os.environ))
    # restart this command with jemalloc preloaded — only when this process is the command line's `serve`
    # (a program calling medvl.cli.main(["serve", ...]) keeps its own process and allocator)
    if lib is not None and sys.platform.startswith("linux") and sys.argv[1:2] == ["serve"]:
        env = dict(os.environ, LD_PRELOAD=f"{lib} {os.environ.get('LD_PRELOAD', '')}".strip())
        os.execve(sys.executable, [sys.executable, "-m", "medvl.cli", *sys.argv[1:]], env)
    if lib is not None and args.allocator == "jemalloc":  # asked for, and this process cannot restart itself
        raise MedvlUserError(f"--allocator jemalloc: start the server as the `medvl serve` command on Linux, or "
                             f"preload it yourself (LD_PRELOAD={lib})")
    bound_kernel_cache()
    try:
        import uvicorn
    except ImportError:
        raise MedvlUserError("serving needs FastAPI and uvicorn: pip install 'medvl[serve]'") from None
    from medvl.serve.app import create_app
    from medvl.serve.server import ServeConfig
    key = args.api_key or os.environ.get("MEDVL_API_KEY")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not key:
        print(f"warning: listening on {args.host} without an API key; anyone who can reach it can use the models")
    cfg = ServeConfig(max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
                      timeout_s=args.timeout, max_tokens_cap=args.max_tokens, api_key=key,
                      max_image_bytes=int(args.max_image_mb * 2**20), max_image_pixels=args.max_image_pixels,
                      precision=args.precision, tower_precision=args.tower_precision, image_cache_mb=args.image_cache_mb,
                      span_cache_mb=args.span_cache_mb)
    app = create_app(args.model or None, args.clip or None, cfg)
    import sys
    # the event loop and the generation thread hand requests and answers to each other many times
    # per batch; Python's default 5 ms GIL switch interval would add up to that much to each handoff
    sys.setswitchinterval(0.0005)
    server = app.state.server
    if server.pipe is not None:
        print(f"medvl: {server.vlm_name} in {server.pipe.precision}")
    if server.clip is not None:
        print(f"medvl: {server.clip_name} in {server.clip_precision}")
    print(f"medvl: heap allocator {loaded_allocator()}")
    print(f"medvl: serving on http://{args.host}:{args.port}/ (API at /v1, docs at /docs)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
