"""``medvl predict`` (a dataset, resumable) and ``medvl chat`` (one image, one question)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="answer every question of a dataset with a VLM (resumable)")
    p.add_argument("--model", required=True, help="a VLM folder (medvl quickstart / train output)")
    p.add_argument("--data", required=True, help="dataset file, or a bundled name (vqa-rad/test)")
    p.add_argument("--format", default="medvl")
    p.add_argument("--out", required=True, help="predictions JSONL; existing ids are kept and skipped")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=cmd_predict)

    c = sub.add_parser("chat", help="ask a VLM one question about one image (PNG/JPEG, DICOM, NIfTI)")
    c.add_argument("question")
    c.add_argument("--model", required=True)
    c.add_argument("--image", help="image file (omit for a text-only question)")
    c.add_argument("--max-new-tokens", type=int, default=64)
    c.set_defaults(func=cmd_chat)


def cmd_predict(args: argparse.Namespace) -> int:
    from medvl.data.commands import load_for_stats
    from medvl.generate.pipeline import load

    samples = load_for_stats(args.data, args.format, {})
    pipe = load(args.model)
    n = pipe.predict(samples, args.out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    print(f"wrote {n} new answer(s) to {args.out} ({len(samples) - n} already there)")
    if pipe.collator.stats.dropped:
        print(f"note: {pipe.collator.stats.dropped}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from medvl.generate.pipeline import load

    pipe = load(args.model)
    if args.image and not Path(args.image).exists():
        from medvl.errors import MedvlUserError
        raise MedvlUserError("image file not found", path=args.image)
    print(pipe.answer(args.image, args.question, max_new_tokens=args.max_new_tokens))
    return 0
