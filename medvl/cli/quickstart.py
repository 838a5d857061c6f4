"""``medvl quickstart``: the README's main job (train a small VLM on the bundled VQA-RAD, score it
with and without images)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quickstart", help="train a small VLM on the bundled VQA-RAD and evaluate it (with and without images)")
    q.add_argument("--out", default="medvl-quickstart")
    q.add_argument("--lm", default="smollm2", choices=["smollm2", "small"],
                   help="smollm2: SmolLM2-135M-Instruct cut to 4 blocks (fetched once, ~100 MB); small: a 4-layer "
                        "LM trained from scratch, nothing to fetch")
    q.add_argument("--epochs", type=int, default=None, help="default: 8 (smollm2), 15 (small)")
    q.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from medvl.quickstart import run_quickstart
    return run_quickstart(Path(args.out), args.epochs, lm=args.lm)
