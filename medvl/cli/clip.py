"""``medvl zero-shot`` and ``medvl clip ...`` (feature extraction, linear probe, retrieval)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from medvl.errors import MedvlUserError
from medvl.models.hub import DEFAULT_CLIP

DEFAULT_MODEL = DEFAULT_CLIP


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



def cmd_zero_shot(args: argparse.Namespace) -> int:
    import torch

    from medvl.harness.zero_shot import DEFAULT_TEMPLATES, read_labels, zero_shot
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
    done = _finished_features(out / "meta.jsonl", out)  # a rerun (after a kill) resumes: ids done are kept
    skipped = {}
    n = 0
    todo = [s for s in conv.samples if s.id not in done]
    with open(out / "meta.jsonl", "a", encoding="utf-8") as meta, torch.no_grad():
        for s in tqdm(todo, desc="extracting", unit="sample"):
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
            tmp = fpath.with_name(fpath.name + ".tmp")
            with open(tmp, "wb") as fh:  # the features first, whole (renamed into place), then their line
                np.savez(fh, **arrays)
            tmp.replace(fpath)
            # paths in meta.jsonl resolve wherever it is read from: the feature file relative to it, the
            # image absolute (it lies wherever the user's data is)
            meta.write(json.dumps({"id": s.id, "imgpath": str(img.resolve()), "txt": answers[-1].text,
                                   "available_clips": sorted(teachers),
                                   "featpath": fpath.relative_to(out).as_posix()}) + "\n")
            meta.flush()
            n += 1
    if done:
        print(f"resumed: {len(done):,} samples were already extracted in {out}")
    print(f"wrote {n:,} samples to {out}/meta.jsonl; skipped: " +
          (", ".join(f"{v} {k}" for k, v in skipped.items()) or "none"))
    return 0


def _finished_features(meta_path: Path, out: Path) -> set[str]:
    """Ids already extracted by an earlier run of the same command: whole lines of meta.jsonl whose
    feature file exists. A line torn by a kill is cut off, so the file holds each record once."""
    if not meta_path.is_file():
        return set()
    text = meta_path.read_text(encoding="utf-8")
    lines = text.split("\n")
    keep, done = [], set()
    for line in lines[:-1]:  # the part after the last newline is torn (or empty)
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        if not (out / rec.get("featpath", "")).is_file():
            break
        keep.append(line)
        done.add(rec["id"])
    body = "".join(x + "\n" for x in keep)
    if body != text:
        meta_path.write_text(body, encoding="utf-8")
    return done


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
    from medvl.harness.zero_shot import embed_images, linear_probe
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
    from medvl.harness.zero_shot import similarity
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
