"""The interface every format module implements, and the helpers they share.

A format converts between files in its own layout and canonical :class:`Sample` lists.
Design choices:

* ``read`` and ``write`` never drop a record silently: what they cannot convert is
  returned in ``skipped`` with the record's index, id and a reason, and the command line
  prints the counts grouped by reason.
* Options are declared per format (name -> help) and unknown options are an error, so a
  misspelt ``--opt`` never goes unnoticed.
* Input that cannot be read at all (missing file, malformed JSON) raises
  :class:`MedvlUserError` naming the file and record.
"""

from __future__ import annotations

import abc
import collections
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from medvl.data.schema import IMAGE_TOKEN, Sample, Turn
from medvl.data.textfile import atomic_write_text, check_input_file, decode_text, read_text
from medvl.registry import Registry
from medvl.errors import MedvlUserError


@dataclass
class Skipped:
    """A record that a conversion left out, and why."""

    index: int
    id: str | None
    reason: str


@dataclass
class Conversion:
    """What a read or write produced: the samples (or count written) and what was skipped."""

    samples: list[Sample] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    written: int = 0
    notes: list[str] = field(default_factory=list)

    def skip(self, index: int, id: Any, reason: str) -> None:
        self.skipped.append(Skipped(index, None if id is None else str(id), reason))

    def skip_summary(self) -> list[tuple[str, int]]:
        return collections.Counter(s.reason for s in self.skipped).most_common()


class Format(abc.ABC):
    """Base class; subclasses set ``name``, ``description`` and implement read/write."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: what IN / OUT are for this format (a file, a folder, ...), shown by `data formats`
    layout: ClassVar[str] = ""
    read_options: ClassVar[dict[str, str]] = {}
    write_options: ClassVar[dict[str, str]] = {}
    #: OUT is a folder (a dataset root) rather than a file: paths written are relative to it
    writes_folder: ClassVar[bool] = False

    @abc.abstractmethod
    def read(self, path: Path, **options: Any) -> Conversion:
        """Read IN into canonical samples; unreadable records go to ``skipped``."""

    @abc.abstractmethod
    def write(self, samples: list[Sample], path: Path, **options: Any) -> Conversion:
        """Write samples to OUT; samples the format cannot hold go to ``skipped``."""

    # ---- option checking ---------------------------------------------------------
    @classmethod
    def check_options(cls, options: dict[str, Any], mode: str) -> None:
        known = cls.read_options if mode == "read" else cls.write_options
        for k in options:
            if k not in known:
                listed = ", ".join(sorted(known)) or "none"
                raise MedvlUserError(
                    f"format {cls.name!r} has no {mode} option {k!r} (its {mode} options: {listed})")


# ---- shared helpers -----------------------------------------------------------------

def require_exists(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise MedvlUserError("file not found", path=path)
    return path


def load_json(path: Path) -> Any:
    """Parse a JSON file; a JSON Lines file (one object per line) is accepted too."""
    path = require_exists(path)
    text = read_text(path)  # regular file, UTF-8 (the encoding named when not)
    try:
        return json.loads(text)
    except RecursionError:
        raise MedvlUserError("JSON nested too deeply", path=path) from None
    except json.JSONDecodeError as first:
        rows = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError):
                raise MedvlUserError(
                    f"malformed JSON ({first.msg} at line {first.lineno}, column {first.colno})",
                    path=path) from None
        return rows


def load_json_list(path: Path, *, list_keys: tuple[str, ...] = ()) -> list:
    """A JSON file holding a list of records (or an object with one of ``list_keys``)."""
    data = load_json(path)
    if isinstance(data, dict):
        for k in list_keys:
            if isinstance(data.get(k), list):
                return data[k]
        raise MedvlUserError("expected a JSON list of records, got an object", path=path)
    if not isinstance(data, list):
        raise MedvlUserError(f"expected a JSON list of records, got {type(data).__name__}", path=path)
    return data


FORMATS: Registry[type[Format]] = Registry("data format")
"""every dataset format by its exact name (``medvl data formats`` prints it)"""


def register_format(cls: type[Format]) -> type[Format]:
    """Class decorator: put a :class:`Format` in :data:`FORMATS` under its ``name``. A new format is one
    module in ``medvl/data/formats/`` with a decorated class; the package imports every module in it."""
    FORMATS.register(cls.name, cls)
    return cls


def dump_json(obj: Any, path: Path, *, lines: bool = False) -> None:
    """JSON (or JSON Lines) written atomically: never a half-written file under ``path``."""
    if lines:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in obj)
    else:
        text = json.dumps(obj, ensure_ascii=False, indent=1) + "\n"
    atomic_write_text(path, text)


def read_csv(path: Path, *, delimiter: str | None = None) -> list[dict[str, str]]:
    """Rows of a CSV/TSV file (delimiter sniffed from the header when not given)."""
    path = require_exists(path)
    if path.suffix == ".gz":
        import gzip
        try:
            text = decode_text(gzip.decompress(check_input_file(path).read_bytes()), path)
        except (OSError, EOFError) as e:
            raise MedvlUserError(f"not a readable gzip file ({e})", path=path) from None
    else:
        text = read_text(path)
    head = text.split("\n", 1)[0]
    if delimiter is None:
        delimiter = "\t" if head.count("\t") > head.count(",") else ","
    try:
        rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True))
    except csv.Error as e:
        raise MedvlUserError(f"malformed CSV ({e})", path=path) from None
    for i, r in enumerate(rows):
        if None in r:  # more fields than the header: an unbalanced quote merged or split rows
            raise MedvlUserError(f"{len(r[None]) + len(r) - 1} fields where the header has {len(r) - 1} (an unbalanced "
                                 "quote or a stray delimiter?)", path=path, record=f"row {i + 2}")
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path, columns: list[str], *, delimiter: str = ",") -> None:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=columns, delimiter=delimiter, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())


class CannotWrite(Exception):
    """Raised by a writer's ``to_row`` for a sample its format cannot hold; the message says why."""


def collect_rows(samples: list[Sample], to_row, cannot: str = "") -> tuple[list, Conversion]:
    """The per-record loop every writer shares: ``to_row(sample)`` returns the record to write (a dict,
    a line), or ``None`` / raises :class:`CannotWrite` for a sample the format cannot hold — skipped,
    counted and reported (``cannot``, or the exception's reason), never silently dropped. Returns
    (records, the Conversion with ``written`` set)."""
    out = Conversion()
    rows = []
    for i, s in enumerate(samples):
        try:
            row = to_row(s)
        except CannotWrite as e:
            out.skip(i, s.id, str(e) or cannot)
            continue
        if row is None:
            out.skip(i, s.id, cannot)
            continue
        rows.append(row)
    out.written = len(rows)
    return rows, out


def one_image_qa(sample: Sample, what: str) -> tuple[str, str]:
    """(question, answer) of a sample with exactly one image and one exchange; else :class:`CannotWrite`
    saying that ``what`` (e.g. "VQA-RAD") holds one image and one question-answer pair per record."""
    qa = single_qa(sample)
    if qa is None or len(sample.images) != 1:
        raise CannotWrite(f"{what} holds one image and one question-answer pair per record")
    return qa


def single_qa(sample: Sample) -> tuple[str, str] | None:
    """(question, answer) of a one-image, one-exchange sample, placeholders stripped."""
    pairs = sample.qa_pairs()
    if len(pairs) != 1:
        return None
    q, a = pairs[0]
    return strip_image_tokens(q), a


def strip_image_tokens(text: str) -> str:
    return text.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "").strip()


def qa_conversation(question: str, answer: str, n_images: int = 1) -> list[Turn]:
    """The canonical two-turn conversation for a single-image question and its answer.

    Placeholders go first, each followed by a newline, as in LLaVA's data.
    """
    return [Turn("user", (IMAGE_TOKEN + "\n") * n_images + question), Turn("assistant", answer)]


def as_text(value: Any) -> str:
    """Answers that published files store as numbers (VQA-RAD's ``4``) become strings."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}
