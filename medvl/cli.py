"""The ``medvl`` command line.

Each command group lives beside the code it drives (``medvl data ...`` in
:mod:`medvl.data.commands`, ``medvl eval ...`` in :mod:`medvl.eval.commands`) and registers its sub-parsers here. User errors
(:class:`MedvlUserError`) print one line ``medvl: error: ...`` and exit with code 2, with
no traceback; set ``MEDVL_DEBUG=1`` to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import os
import sys

from medvl import __version__
from medvl.errors import MedvlUserError


def build_parser() -> argparse.ArgumentParser:
    from medvl.data import commands as data_commands
    from medvl.distill import commands as distill_commands
    from medvl.serve import commands as serve_commands
    from medvl.eval import commands as eval_commands
    from medvl.generate import commands as generate_commands
    from medvl.models import commands as model_commands
    from medvl.train import commands as train_commands

    p = argparse.ArgumentParser(prog="medvl", description="Medical vision-language models: data, "
                                "training, distillation, evaluation and serving.")
    p.add_argument("--version", action="version", version=f"medvl {__version__}")
    sub = p.add_subparsers(dest="group", metavar="COMMAND")
    sub.required = True
    data_commands.add_parser(sub)
    eval_commands.add_parser(sub)
    train_commands.add_parser(sub)
    model_commands.add_parser(sub)
    generate_commands.add_parser(sub)
    distill_commands.add_parser(sub)
    serve_commands.add_parser(sub)
    q = sub.add_parser("quickstart", help="train a small VLM on the bundled VQA-RAD and evaluate it (with and without images)")
    q.add_argument("--out", default="medvl-quickstart")
    q.add_argument("--lm", default="smollm2", choices=["smollm2", "small"],
                   help="smollm2: SmolLM2-135M-Instruct cut to 4 blocks (fetched once, ~100 MB); small: a 4-layer "
                        "LM trained from scratch, nothing to fetch")
    q.add_argument("--epochs", type=int, default=None, help="default: 8 (smollm2), 15 (small)")
    q.set_defaults(func=lambda a: __import__("medvl.quickstart", fromlist=["run_quickstart"]).run_quickstart(
        __import__("pathlib").Path(a.out), a.epochs, lm=a.lm))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MedvlUserError as e:
        if os.environ.get("MEDVL_DEBUG"):
            raise
        print(f"medvl: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("medvl: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a path the user gave that cannot be read or written, a full disk
        line = _os_error_line(e)
        if line is None or os.environ.get("MEDVL_DEBUG"):
            raise
        print(f"medvl: error: {line}", file=sys.stderr)
        return 2


def _os_error_line(e: OSError) -> str | None:
    """One line for an operating-system error about a user's file; None for anything that points at
    medvl's own files (a bug, which keeps its traceback)."""
    import errno
    from pathlib import Path
    if e.errno == errno.ENOSPC:
        return f"{e.filename or 'output'}: the disk is full; free space or write elsewhere"
    if e.filename is None or not isinstance(e, (PermissionError, IsADirectoryError, NotADirectoryError,
                                                FileNotFoundError, FileExistsError)):
        return None
    package = Path(__file__).resolve().parent
    try:
        if package in Path(str(e.filename)).resolve().parents:
            return None
    except (OSError, RuntimeError):
        pass
    return f"{e.filename}: {e.strerror or type(e).__name__}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
