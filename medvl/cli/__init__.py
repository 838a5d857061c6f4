"""The ``medvl`` command line.

One module per command group, named as the command: ``medvl data ...`` in
:mod:`medvl.cli.data`, ``medvl eval ...`` in :mod:`medvl.cli.eval`, ``medvl zero-shot`` and
``medvl clip ...`` in :mod:`medvl.cli.clip`, ``medvl predict`` and ``medvl chat`` in
:mod:`medvl.cli.predict`; each registers its sub-parsers here. This package is the top layer:
it may import any other, nothing imports it. User errors
(:class:`MedvlUserError`) print one line ``medvl: error: ...`` and exit with code 2, with
no traceback; set ``MEDVL_DEBUG=1`` to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import os
import sys

from medvl import __version__
from medvl.cli import clip, data, distill, eval, lm, predict, quickstart, serve, train
from medvl.errors import MedvlUserError

GROUPS = (data, eval, train, clip, lm, predict, distill, serve, quickstart)
"""the command groups, in the order ``medvl --help`` lists them"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medvl", description="Medical vision-language models: data, "
                                "training, distillation, evaluation and serving.")
    p.add_argument("--version", action="version", version=f"medvl {__version__}")
    sub = p.add_subparsers(dest="group", metavar="COMMAND")
    sub.required = True
    for group in GROUPS:
        group.add_parser(sub)
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
    package = Path(__file__).resolve().parent.parent
    try:
        if package in Path(str(e.filename)).resolve().parents:
            return None
    except (OSError, RuntimeError):
        pass
    return f"{e.filename}: {e.strerror or type(e).__name__}"
