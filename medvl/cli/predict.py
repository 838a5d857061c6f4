"""``medvl predict`` (a dataset, resumable) and ``medvl chat`` (one image, one question)."""

from __future__ import annotations

import argparse
from pathlib import Path

from medvl.models.hub import DEFAULT_VLM


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="answer every question of a dataset with a VLM (resumable)")
    p.add_argument("--model", default=DEFAULT_VLM, help=f"a VLM folder or shipped name (default {DEFAULT_VLM})")
    p.add_argument("--data", required=True, help="dataset file, or a bundled name (vqa-rad/test)")
    p.add_argument("--format", default="medvl", help="format of --data (any of `medvl data formats`)")
    p.add_argument("--opt", dest="read_opt", action="append", default=[], metavar="KEY=VALUE",
                   help="reader option, as for `medvl data convert`")
    p.add_argument("--image-root", help="folder relative image paths resolve against (default: the data file's)")
    p.add_argument("--out", required=True, help="predictions JSONL; existing ids are kept and skipped")
    p.add_argument("--pred-format", choices=["medvl", "llava-med"], default="medvl",
                   help="medvl: {id, question, prediction}; llava-med: LLaVA-Med's answer file "
                        "{question_id, prompt, text, answer_id, model_id}")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    _precision(p)
    p.add_argument("--tower-precision", choices=["fp32", "bf16"], default="fp32",
                   help="run the vision tower under bf16 autocast (faster on CPUs with bf16 units; answers may "
                        "differ slightly: 99.1%% unchanged on VQA-RAD for medvl-vqarad-small)")
    p.add_argument("--sasg", type=int, default=0, metavar="N",
                   help="semantic-aware selective generation: sample N answers, keep the one that agrees most "
                        "with the others (MiniLM sentence embeddings)")
    p.add_argument("--sasg-temperature", type=float, default=0.7)
    p.add_argument("--image-control", choices=["shuffled", "blank"],
                   help="a control for 'does the image matter': answer each question with another sample's image "
                        "(seeded by --seed, never its own) or a blank one; score it with medvl eval vqa beside the "
                        "real run (write it to its own --out)")
    _decoding(p)
    p.set_defaults(func=cmd_predict)

    c = sub.add_parser("chat", help="ask a VLM one question about one image (PNG/JPEG, DICOM, NIfTI)")
    c.add_argument("question")
    c.add_argument("--model", default=DEFAULT_VLM, help=f"a VLM folder or shipped name (default {DEFAULT_VLM})")
    c.add_argument("--image", help="image file (omit for a text-only question)")
    c.add_argument("--max-new-tokens", type=int, default=64)
    _precision(c)
    _decoding(c)
    c.set_defaults(func=cmd_chat)


def _precision(p: argparse.ArgumentParser) -> None:
    from medvl.models.precision import PRECISIONS
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="the model's weights and compute (default fp32, as the model cards report; bf16 is 4-6x "
                        "faster per matmul on CPUs with AMX / AVX512-BF16, answers may differ in a few percent; "
                        "auto = bf16 where native, as medvl serve does)")


def _decoding(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding (default: greedy)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--num-beams", type=int, default=1, help="beam search width")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=0)


def _gen_kwargs(args: argparse.Namespace, tokenizer) -> dict:
    import torch
    torch.manual_seed(args.seed)
    kw = {"do_sample": args.sample, "num_beams": args.num_beams}
    if args.sample:
        kw.update(temperature=args.temperature, top_p=args.top_p)
    if args.stop:
        kw.update(stop_strings=list(args.stop), tokenizer=tokenizer)
    return kw


def cmd_predict(args: argparse.Namespace) -> int:
    from medvl.cli.data import load_for_stats
    from medvl.generate.pipeline import load

    from medvl.cli.data import parse_kv
    from medvl.data.textfile import check_output_path
    check_output_path(args.out)  # before the model loads
    samples = load_for_stats(args.data, args.format, parse_kv(args.read_opt), image_root=args.image_root)
    if args.image_control:
        from medvl.data.controls import image_control
        samples = image_control(samples, args.image_control, seed=args.seed)
        print(f"control: {args.image_control} images for {sum(bool(s.images) for s in samples)} sample(s)")
    pipe = load(args.model, precision=args.precision)
    if args.sasg:
        n = pipe.predict_sasg(samples, args.out, n=args.sasg, temperature=args.sasg_temperature, top_p=args.top_p,
                              batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, seed=args.seed,
                              layout=args.pred_format)
        print(f"wrote {n} new SASG answer(s) ({args.sasg} candidates each) to {args.out}")
        return 0
    n = pipe.predict(samples, args.out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                     tower_precision=args.tower_precision, layout=args.pred_format, **_gen_kwargs(args, pipe.tokenizer))
    print(f"wrote {n} new answer(s) to {args.out} ({len(samples) - n} already there)")
    if pipe.collator is not None and pipe.collator.stats.dropped:
        print(f"note: {pipe.collator.stats.dropped}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from medvl.generate.pipeline import load

    pipe = load(args.model, precision=args.precision)
    if args.image and not Path(args.image).exists():
        from medvl.errors import MedvlUserError
        raise MedvlUserError("image file not found", path=args.image)
    print(pipe.answer(args.image, args.question, max_new_tokens=args.max_new_tokens, **_gen_kwargs(args, pipe.tokenizer)))
    return 0
