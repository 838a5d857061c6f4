"""Where user files enter and leave: text files read with one set of checks, outputs checked
before work starts and written atomically.

Design choice: every command reads its JSON / JSONL / CSV / YAML inputs through
:func:`read_text` and writes its text outputs through :func:`atomic_write_text`, so the same
input mistake gets the same one-line :class:`medvl.errors.MedvlUserError` everywhere instead of
a different traceback per command (``UnicodeDecodeError``, ``IsADirectoryError``,
``RecursionError``, a FIFO that blocks forever, ``/dev/zero`` that fills memory):

* only regular files are read (a directory, FIFO, socket or device is refused before it is
  opened, so nothing blocks), up to :data:`MAX_TEXT_BYTES`;
* text must be UTF-8 (a BOM is accepted); other encodings are named when recognisable
  (UTF-16 by its BOM or zero bytes, binary by NUL bytes, otherwise "Latin-1 / Windows-1252?")
  with the byte and line of the first bad byte and what to do;
* JSON nested past Python's recursion limit is refused with one line (the parser's
  ``RecursionError`` is caught where the text is parsed);
* an output's folder is created and probed for writability before any work, and the output is
  written to a temporary file beside it and renamed into place, so a failed or interrupted
  write never leaves a half-written file under the final name (a full disk included).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from medvl.errors import MedvlUserError

#: the largest text input read (JSON, JSONL, CSV, YAML): 4 GiB
MAX_TEXT_BYTES = 4 << 30


def check_input_file(path: str | Path, max_bytes: int = MAX_TEXT_BYTES) -> Path:
    """``path`` if it is a readable regular file no larger than ``max_bytes``; else a clear error."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise MedvlUserError("file not found", path=p) from None
    except PermissionError:
        raise MedvlUserError("permission denied: cannot read it", path=p) from None
    except OSError as e:
        raise MedvlUserError(f"cannot read it ({e.strerror})", path=p) from None
    if stat.S_ISDIR(st.st_mode):
        raise MedvlUserError("is a folder, not a file", path=p)
    if not stat.S_ISREG(st.st_mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device")
        raise MedvlUserError(f"is {kind}, not a regular file", path=p)
    if st.st_size > max_bytes:
        raise MedvlUserError(f"{st.st_size:,} bytes: larger than the {max_bytes:,} accepted", path=p)
    return p


def _describe_encoding(raw: bytes) -> str:
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(raw) >= 4 and raw[1:4:2] == b"\x00\x00"):
        return "it looks like UTF-16"
    if b"\x00" in raw[:4096]:
        return "it looks binary, not text"
    return "perhaps Latin-1 / Windows-1252"


def decode_text(raw: bytes, path: str | Path) -> str:
    """UTF-8 text of ``raw`` (a leading BOM dropped), or an error naming the first bad byte."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise MedvlUserError("not UTF-8 text (it starts with a UTF-16 byte-order mark); re-save the file as UTF-8",
                             path=path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise MedvlUserError(f"not UTF-8 text ({_describe_encoding(raw)}; first bad byte {e.start}, line {line}); "
                             "re-save the file as UTF-8", path=path) from None
    if "\x00" in text[:4096]:
        raise MedvlUserError("not a text file (it holds NUL bytes: binary data?)", path=path)
    return text


def read_text(path: str | Path, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a user's input file, through every check of the module docstring."""
    p = check_input_file(path, max_bytes)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise MedvlUserError(f"cannot read it ({e.strerror})", path=p) from None
    return decode_text(raw, p)


def loads_json(text: str, path: str | Path, where: str | None = None) -> Any:
    """``json.loads`` with errors that name the file (and record); nesting past Python's recursion limit
    (~1,000 levels; real data sets nest a few) is refused, not a ``RecursionError``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MedvlUserError(f"malformed JSON ({e.msg} at line {e.lineno} column {e.colno})", path=path,
                             record=where) from None
    except RecursionError:
        raise MedvlUserError("JSON nested too deeply", path=path, record=where) from None


def check_output_path(path: str | Path, *, folder: bool = False) -> Path:
    """Create the output's folder and prove it writable before any work starts; refuse an output file
    that is an existing folder (or an output folder that is a file)."""
    p = Path(path)
    target_dir = p if folder else p.parent
    if not folder and p.is_dir():
        raise MedvlUserError("the output is an existing folder; give a file name", path=p)
    if folder and p.exists() and not p.is_dir():
        raise MedvlUserError("the output folder is an existing file", path=p)
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".medvl-probe-", dir=target_dir)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise MedvlUserError("cannot create the output's folder: a file is in the way", path=target_dir) from None
    except OSError as e:
        raise MedvlUserError(f"cannot write here ({e.strerror}); choose another output location",
                             path=target_dir) from None
    return p


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place: the file under the
    final name is either the old one or the complete new one, never a half-written one."""
    p = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror
        raise MedvlUserError(f"could not write the output ({why}); nothing was written under this name",
                             path=p) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
