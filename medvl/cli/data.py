"""``medvl data ...``: formats, convert, validate, stats and the data tour.

Every command prints what it skipped and why (grouped counts, first examples), and exits
with code 2 when the input is at fault (see :mod:`medvl.cli`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from medvl.data.formats import FORMATS, Conversion, get_format
from medvl.data.schema import Problem, Sample, load_jsonl_report, resolve_path, validate
from medvl.errors import MedvlUserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="convert, validate and inspect datasets")
    dsub = p.add_subparsers(dest="command", metavar="COMMAND")
    dsub.required = True

    f = dsub.add_parser("formats", help="list the dataset formats medvl reads and writes")
    f.add_argument("--verbose", "-v", action="store_true", help="show each format's options")
    f.set_defaults(func=cmd_formats)

    c = dsub.add_parser("convert", help="convert a dataset between formats")
    c.add_argument("--from", dest="src", required=True, metavar="FMT")
    c.add_argument("--to", dest="dst", required=True, metavar="FMT")
    c.add_argument("input", metavar="IN")
    c.add_argument("output", metavar="OUT")
    c.add_argument("--opt", "--read-opt", dest="read_opt", action="append", default=[], metavar="KEY=VALUE",
                   help="reader option (see `medvl data formats -v`); repeatable")
    c.add_argument("--write-opt", action="append", default=[], metavar="KEY=VALUE", help="writer option")
    c.add_argument("--image-root", help="folder the input's relative image paths resolve against (default: the "
                                        "input's folder); the output's paths are written relative to the output")
    c.add_argument("--keep-invalid", action="store_true",
                   help="write records that fail validation instead of skipping them")
    c.add_argument("--skipped", metavar="FILE", help="write every skipped record (index, id, reason) as JSONL")
    c.add_argument("--strict", action="store_true", help="exit with code 2 if any record was skipped")
    c.add_argument("--dataset", help="the entry of a LLaMA-Factory dataset_info.json to read (--from sharegpt)")
    c.set_defaults(func=cmd_convert)

    v = dsub.add_parser("validate", help="check a dataset and report every problem")
    v.add_argument("file")
    v.add_argument("--format", default="medvl", help="format of FILE (default: medvl canonical JSONL)")
    v.add_argument("--opt", dest="read_opt", action="append", default=[], metavar="KEY=VALUE")
    v.add_argument("--image-root", help="folder relative image paths resolve against (default: FILE's folder)")
    v.add_argument("--dataset", help="the entry of a LLaMA-Factory dataset_info.json to check")
    v.add_argument("--no-files", action="store_true", help="do not check that image files exist")
    v.add_argument("--decode", action="store_true", help="also decode every image (finds corrupt files)")
    v.add_argument("--max-problems", type=int, default=50, help="problems printed (all are counted)")
    v.set_defaults(func=cmd_validate)

    s = dsub.add_parser("stats", help="statistics of a dataset file or a bundled dataset")
    s.add_argument("file", help="a file, or a bundled dataset name (vqa-rad, vqa-rad/test)")
    s.add_argument("--format", default=None, help="format of FILE (default: medvl canonical JSONL)")
    s.add_argument("--opt", dest="read_opt", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--plot", metavar="PNG", help="also draw the distributions (needs medvl[viz])")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=cmd_stats)

    t = dsub.add_parser("tour", help="the bundled VQA-RAD end to end: validate, decode, convert, stats")
    t.add_argument("--out", default="medvl-tour", help="output folder (default: ./medvl-tour)")
    t.set_defaults(func=cmd_tour)


# ---- helpers ------------------------------------------------------------------------

def parse_kv(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        if "=" not in it:
            raise MedvlUserError(f"option {it!r} is not KEY=VALUE")
        k, v = it.split("=", 1)
        out[k.strip()] = v
    return out


def read_any(path: str, fmt_name: str, options: dict[str, str]) -> tuple[Conversion, Any]:
    fmt = get_format(fmt_name)
    fmt.check_options(options, "read")
    return fmt.read(Path(path), **options), fmt


def print_skips(conv: Conversion, what: str, examples: int = 3) -> None:
    if not conv.skipped:
        return
    print(f"  skipped {len(conv.skipped):,} record(s) on {what}:")
    for reason, n in conv.skip_summary()[:20]:
        ex = [s for s in conv.skipped if s.reason == reason][:examples]
        ids = ", ".join(f"#{s.index}" + (f" ({s.id})" if s.id is not None else "") for s in ex)
        print(f"    {n:>7,} × {reason}   e.g. {ids}")


def input_base(path: str | Path, image_root: str | None = None) -> Path:
    """The folder a data file's relative paths resolve against: ``--image-root`` when given (relative to the
    working directory), else the folder the file lies in (a folder input: the folder itself)."""
    if image_root:
        return Path(image_root).resolve()
    p = Path(path).resolve()
    return p if p.is_dir() else p.parent


def resolve_images(samples: list[Sample], base: Path) -> None:
    """Make every relative image path absolute against ``base``."""
    for s in samples:
        for m in s.images:
            if m.path and not Path(m.path).is_absolute():
                m.path = str(base / m.path)


def _rebase(samples: list[Sample], base: Path, out_dir: Path) -> None:
    """Rewrite image paths so the output file resolves them from where it lies: each path, read relative
    to the input (``base``), is written relative to the output's folder; one rule for every command."""
    import os
    for s in samples:
        for m in s.images:
            if m.path:
                target = Path(m.path) if Path(m.path).is_absolute() else base / m.path
                m.path = Path(os.path.relpath(target, out_dir)).as_posix()


def _progress(it, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, unit="img", disable=None, leave=False)


# ---- commands ------------------------------------------------------------------------

def cmd_formats(args: argparse.Namespace) -> int:
    width = max(len(n) for n in FORMATS)
    for name in FORMATS:
        cls = FORMATS.get(name)
        print(f"{name:<{width}}  {cls.description}")
        if args.verbose:
            print(f"{'':<{width}}  layout: {cls.layout}")
            for mode, opts in (("read", cls.read_options), ("write", cls.write_options)):
                for k, doc in opts.items():
                    print(f"{'':<{width}}  {mode} option {k}: {doc}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    read_opts, write_opts = parse_kv(args.read_opt), parse_kv(args.write_opt)
    args.src, read_opts = dataset_info_defaults(args.input, args.src, read_opts, args.dataset)
    dst = get_format(args.dst)
    dst.check_options(write_opts, "write")
    from medvl.data.textfile import check_output_path
    check_output_path(args.output, folder=dst.writes_folder)  # before any reading: a bad output fails at once
    conv, _ = read_any(args.input, args.src, read_opts)
    n_read = len(conv.samples) + len(conv.skipped)
    print(f"read {args.input} as {args.src}: {n_read:,} record(s), {len(conv.samples):,} converted")
    for note in conv.notes:
        print(f"  note: {note}")
    print_skips(conv, "read")
    out_dir = Path(args.output).resolve() if dst.writes_folder else Path(args.output).resolve().parent
    _rebase(conv.samples, input_base(args.input, args.image_root), out_dir)
    samples = conv.samples
    if not args.keep_invalid:
        bad = {p.index: p for p in validate(samples)}  # structure only: files are checked by `data validate`
        if bad:
            keep = []
            for i, s in enumerate(samples):
                if i in bad:
                    conv.skip(i, s.id, f"invalid: {bad[i].message}")
                else:
                    keep.append(s)
            print(f"  {len(bad):,} converted record(s) fail validation and are skipped "
                  "(--keep-invalid writes them anyway):")
            print_skips(Conversion(skipped=conv.skipped[-len(bad):]), "validation")
            samples = keep
    if n_read and not samples:  # every record lost: never a success, and no empty output file
        raise MedvlUserError(f"none of the {n_read:,} record(s) read could be converted ({len(conv.skipped):,} "
                             "skipped, reasons above); nothing was written — check --from and the options",
                             path=args.input)
    wconv = dst.write(samples, Path(args.output), **write_opts)
    print(f"wrote {args.output} as {args.dst}: {wconv.written:,} record(s)"
          f" in {time.perf_counter() - t0:.1f}s")
    for note in wconv.notes:
        print(f"  note: {note}")
    print_skips(wconv, "write")
    all_skipped = conv.skipped + wconv.skipped
    if args.skipped:
        Path(args.skipped).parent.mkdir(parents=True, exist_ok=True)
        with open(args.skipped, "w", encoding="utf-8") as f:
            for s in all_skipped:
                f.write(json.dumps({"index": s.index, "id": s.id, "reason": s.reason}, ensure_ascii=False) + "\n")
    if all_skipped and args.strict:
        print(f"medvl: error: {len(all_skipped)} record(s) skipped (--strict)", file=sys.stderr)
        return 2
    if n_read and not wconv.written:  # every record lost: never a success, whatever --strict says
        print(f"medvl: error: none of the {n_read:,} record(s) read from {args.input} was written "
              f"({len(all_skipped):,} skipped, reasons above); check --from and the options", file=sys.stderr)
        return 2
    return 0


def collect_problems(path: str, fmt: str, read_opts: dict, *, image_root: str | None,
                     check_files: bool, decode: bool) -> tuple[list[Sample], list[str]]:
    """All problems of a dataset file, as printable lines."""
    lines: list[str] = []
    if fmt == "medvl":
        samples, errors = load_jsonl_report(path)
        lines += [f"line {ln}: {err}" for ln, err in errors]
    else:
        conv, _ = read_any(path, fmt, read_opts)
        samples = conv.samples
        lines += [f"record {s.index}" + (f" (id={s.id!r})" if s.id is not None else "") + f": {s.reason}"
                  for s in conv.skipped]
    root = input_base(path, image_root)
    problems: list[Problem] = validate(samples, image_root=root, check_files=check_files,
                                       data_root=Path(path).resolve().parent)
    lines += [str(p) for p in problems]
    if decode:
        from medvl.data.imageio import load_medical

        errors: dict[Path, str | None] = {}  # each file is decoded once, reported per record
        paths = {resolve_path(m.path, root) for s in samples for m in s.images if m.path}
        for p in _progress(sorted(paths), len(paths), "decoding"):
            if not p.exists():
                errors[p] = None if check_files else f"file not found: {p}"
                continue
            try:
                load_medical(p)
                errors[p] = None
            except MedvlUserError as e:
                errors[p] = str(e)
        for i, s in enumerate(samples):
            for j, m in enumerate(s.images):
                err = errors.get(resolve_path(m.path, root)) if m.path else None
                if err:
                    lines.append(str(Problem(i, s.id, f"image {j}: {err}")))
    return samples, lines


def dataset_info_defaults(path: str, fmt: str | None, read_opts: dict, dataset: str | None) -> tuple[str | None, dict]:
    """LLaMA-Factory's dataset_info.json is read as ShareGPT (its entry named by ``--dataset``)."""
    if dataset:
        read_opts = {**read_opts, "dataset": dataset}
    if Path(path).name == "dataset_info.json" and fmt in (None, "medvl"):
        fmt = "sharegpt"
    return fmt, read_opts


def cmd_validate(args: argparse.Namespace) -> int:
    args.format, opts = dataset_info_defaults(args.file, args.format, parse_kv(args.read_opt), args.dataset)
    samples, lines = collect_problems(args.file, args.format, opts,
                                      image_root=args.image_root, check_files=not args.no_files,
                                      decode=args.decode)
    n_img = sum(len(s.images) for s in samples)
    if not lines:
        checks = "structure" + ("" if args.no_files else ", files") + (", decoding" if args.decode else "")
        print(f"OK {args.file}: {len(samples):,} samples, {n_img:,} images; checked {checks}")
        return 0
    for ln in lines[:args.max_problems]:
        print(f"{args.file}: {ln}", file=sys.stderr)
    if len(lines) > args.max_problems:
        print(f"... and {len(lines) - args.max_problems:,} more", file=sys.stderr)
    print(f"medvl: error: {args.file}: {len(lines):,} problem(s) found in {len(samples):,} readable samples",
          file=sys.stderr)
    return 2


def load_for_stats(name: str, fmt: str | None, read_opts: dict, image_root: str | None = None) -> list[Sample]:
    """Samples of a bundled split or a file in any format, image paths made absolute (against
    ``image_root`` or the file's folder), as training and `data validate` resolve them."""
    from medvl.data.bundled import BUNDLED, bundled_split, load_bundled

    if (named := bundled_split(name)) is not None:
        return load_bundled(*named)
    if not Path(name).exists():
        raise MedvlUserError("file not found (and not a bundled dataset name: "
                             f"{', '.join(BUNDLED)})", path=name)
    if fmt is None or fmt == "medvl":
        samples, errors = load_jsonl_report(name)
        if errors:
            raise MedvlUserError(f"{errors[0][1]} (run `medvl data validate` for all problems)",
                                 path=name, record=f"at line {errors[0][0]}")
    else:
        conv, _ = read_any(name, fmt, read_opts)
        print_skips(conv, "read")
        samples = conv.samples
    resolve_images(samples, input_base(name, image_root))
    return samples


def cmd_stats(args: argparse.Namespace) -> int:
    from medvl.data.stats import compute_stats, format_stats, plot_stats

    samples = load_for_stats(args.file, args.format, parse_kv(args.read_opt))
    st = compute_stats(samples)
    print(json.dumps(st, indent=1, ensure_ascii=False) if args.json else format_stats(st))
    if args.plot:
        print(f"plot: {plot_stats(st, args.plot, title=args.file)}")
    return 0


def cmd_tour(args: argparse.Namespace) -> int:
    from medvl.data.tour import run_tour

    return run_tour(Path(args.out))
