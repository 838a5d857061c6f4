"""``medvl zero-shot`` and ``medvl clip extract-features``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from medvl.errors import MedvlUserError

DEFAULT_MODEL = "medclip-r10t-minilm"


def add_parser(sub: argparse._SubParsersAction) -> None:
    z = sub.add_parser("zero-shot", help="zero-shot classification of images with a CLIP")
    z.add_argument("images", nargs="+", help="image files (PNG/JPEG, DICOM, NIfTI middle slice, .npy)")
    z.add_argument("--model", default=DEFAULT_MODEL, help=f"CLIP name or folder (default: the shipped {DEFAULT_MODEL})")
    z.add_argument("--labels", nargs="+", required=True, help="class names, a comma list, or @file")
    z.add_argument("--template", action="append", help="prompt template with {} (repeat for an ensemble)")
    z.add_argument("--window", help="DICOM window preset (lung, bone, ...) or 'file'")
    z.add_argument("--top", type=int, default=3)
    z.add_argument("--json", action="store_true")
    z.set_defaults(func=cmd_zero_shot)

    c = sub.add_parser("clip", help="CLIP utilities")
    csub = c.add_subparsers(dest="command", metavar="COMMAND")
    csub.required = True
    e = csub.add_parser("extract-features", help="cache teacher CLIP features in the MMKD-CLIP layout")
    e.add_argument("--teacher", action="append", required=True, metavar="NAME=MODEL",
                   help="teacher name and CLIP (name, folder, open_clip name:tag or hf-hub id); repeatable")
    e.add_argument("--data", required=True, help="dataset with one image and one caption per sample")
    e.add_argument("--format", default="medvl")
    e.add_argument("--image-root", help="folder relative image paths resolve against")
    e.add_argument("--out", required=True, help="output folder: meta.jsonl + features/<id>.npz")
    e.set_defaults(func=cmd_extract)


def cmd_zero_shot(args: argparse.Namespace) -> int:
    import torch

    from medvl.eval.zero_shot import DEFAULT_TEMPLATES, read_labels, zero_shot
    from medvl.models.clip import MedCLIP

    labels = read_labels(args.labels)
    model = MedCLIP.from_pretrained(args.model)
    with torch.no_grad():
        res = zero_shot(model, args.images, labels, args.template or DEFAULT_TEMPLATES, window=args.window)
    rows = []
    for k, i in enumerate(res["indices"]):
        p = res["probs"][k]
        order = np.argsort(-p)[:args.top]
        rows.append({"image": args.images[i], "prediction": labels[order[0]],
                     "probs": {labels[j]: float(p[j]) for j in order}})
    if args.json:
        print(json.dumps({"results": rows, "failed": res["failed"]}, indent=1))
    else:
        for r in rows:
            print(f"{r['image']}: " + ", ".join(f"{k} {v:.1%}" for k, v in r["probs"].items()))
    for i, msg in res["failed"]:
        print(f"medvl: skipped {args.images[i]}: {msg}")
    if res["failed"]:
        print(f"medvl: {len(res['failed'])} of {len(args.images)} image(s) could not be read")
        return 2
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from medvl.data.formats import get_format
    from medvl.data.schema import resolve_path
    from medvl.models.clip import MedCLIP

    teachers = {}
    for spec in args.teacher:
        if "=" not in spec:
            raise MedvlUserError(f"--teacher {spec!r} is not NAME=MODEL")
        name, model = spec.split("=", 1)
        if not name.isidentifier():
            raise MedvlUserError(f"teacher name {name!r} must be a plain identifier (used as '{name}_img')")
        teachers[name] = MedCLIP.from_pretrained(model)
    conv = get_format(args.format).read(Path(args.data))
    root = Path(args.image_root) if args.image_root else Path(args.data).resolve().parent
    out = Path(args.out)
    (out / "features").mkdir(parents=True, exist_ok=True)
    skipped = {}
    n = 0
    with open(out / "meta.jsonl", "w", encoding="utf-8") as meta, torch.no_grad():
        for s in tqdm(conv.samples, desc="extracting", unit="sample"):
            answers = s.turns("assistant")
            if len(s.images) != 1 or not answers:
                skipped["not one image + one caption"] = skipped.get("not one image + one caption", 0) + 1
                continue
            img = resolve_path(s.images[0].path, root)
            arrays = {}
            try:
                for name, m in teachers.items():
                    x = m.preprocess(img)[None]
                    arrays[f"{name}_img"] = m.encode_image(x)[0].float().numpy()
                    arrays[f"{name}_txt"] = m.encode_text([answers[-1].text])[0].float().numpy()
            except MedvlUserError as e:
                key = f"image does not decode ({str(e)[:60]})"
                skipped[key] = skipped.get(key, 0) + 1
                continue
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in s.id)
            fpath = out / "features" / f"{safe}.npz"
            np.savez(fpath, **arrays)
            meta.write(json.dumps({"id": s.id, "imgpath": str(img), "txt": answers[-1].text,
                                   "available_clips": sorted(teachers), "featpath": str(fpath)}) + "\n")
            n += 1
    print(f"wrote {n:,} samples to {out}/meta.jsonl; skipped: " +
          (", ".join(f"{v} {k}" for k, v in skipped.items()) or "none"))
    return 0
