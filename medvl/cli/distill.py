"""``medvl distill pseudo-label`` and ``medvl distill cache-teacher`` (ClinKD's data side)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="teacher-side distillation tools: pseudo-labels, cached teacher logits")
    dsub = p.add_subparsers(dest="distill_cmd", metavar="TOOL")
    dsub.required = True

    pl = dsub.add_parser("pseudo-label", help="the teacher answers the questions; confident answers become targets")
    pl.add_argument("--teacher", required=True, help="a VLM folder or shipped name")
    pl.add_argument("--data", required=True, help="questions: a dataset file (any format) or bundled name")
    pl.add_argument("--format", default="medvl")
    pl.add_argument("--out", required=True, help="canonical JSONL with the teacher's answers")
    pl.add_argument("--min-confidence", type=float, default=0.0,
                    help="keep answers whose geometric-mean token probability is at least this")
    pl.add_argument("--agreement", type=int, default=0, help="also sample N answers per question (self-consistency)")
    pl.add_argument("--min-agreement", type=float, default=0.5,
                    help="keep answers that at least this share of the N samples repeat")
    pl.add_argument("--max-new-tokens", type=int, default=32)
    pl.add_argument("--batch-size", type=int, default=32)
    pl.add_argument("--seed", type=int, default=0)
    pl.set_defaults(func=cmd_pseudo_label)

    ct = dsub.add_parser("cache-teacher", help="store a teacher's top-k logits at every answer token")
    ct.add_argument("--teacher", required=True, help="a VLM folder or shipped name")
    ct.add_argument("--data", required=True, help="the student's training data (any format) or bundled name")
    ct.add_argument("--format", default="medvl")
    ct.add_argument("--out", required=True, help="cache folder (use as distill.teacher_cache)")
    ct.add_argument("--topk", type=int, default=32)
    ct.add_argument("--max-length", type=int, default=128, help="the student's max_length (same truncation)")
    ct.add_argument("--batch-size", type=int, default=32)
    ct.set_defaults(func=cmd_cache_teacher)


def cmd_pseudo_label(args: argparse.Namespace) -> int:
    from medvl.cli.data import load_for_stats
    from medvl.data.schema import write_jsonl
    from medvl.distill.pseudo import pseudo_label

    samples = load_for_stats(args.data, args.format, {})
    kept, rep = pseudo_label(args.teacher, samples, min_confidence=args.min_confidence, agreement=args.agreement,
                             min_agreement=args.min_agreement, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens, seed=args.seed)
    write_jsonl(kept, args.out)
    print(f"kept {rep['kept']} of {rep['questions']} question(s) -> {args.out}; left out: "
          f"{rep['low_confidence']} below confidence {args.min_confidence}, {rep['low_agreement']} below agreement "
          f"{args.min_agreement}, {rep['empty_answer']} empty answer(s)")
    if rep["kept_with_reference"]:
        print(f"kept pseudo-labels equal to the original answer: {rep['kept_equal_to_reference']} of "
              f"{rep['kept_with_reference']} ({rep['kept_equal_to_reference'] / rep['kept_with_reference']:.1%})")
    return 0


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    from medvl.cli.data import load_for_stats
    from medvl.distill.teacher import cache_teacher

    samples = load_for_stats(args.data, args.format, {})
    info = cache_teacher(args.teacher, samples, args.out, topk=args.topk, max_length=args.max_length,
                         batch_size=args.batch_size)
    print(json.dumps(info))
    print(f"cached top-{args.topk} teacher logits for {info['answer_tokens']} answer token(s) of {info['samples']} "
          f"sample(s) in {args.out}; mean teacher probability outside the top {args.topk}: "
          f"{info['mean_missing_mass']:.4f}")
    return 0
