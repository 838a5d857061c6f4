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
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from medvl.data.schema import IMAGE_TOKEN, Sample, Turn
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
    text = path.read_text(encoding="utf-8-sig")
    try:
        return json.loads(text)
    except json.JSONDecodeError as first:
        rows = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
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


def dump_json(obj: Any, path: Path, *, lines: bool = False) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if lines:
            for row in obj:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            json.dump(obj, f, ensure_ascii=False, indent=1)
            f.write("\n")


def read_csv(path: Path, *, delimiter: str | None = None) -> list[dict[str, str]]:
    """Rows of a CSV/TSV file (delimiter sniffed from the header when not given)."""
    path = require_exists(path)
    opener = open
    if path.suffix == ".gz":
        import gzip
        opener = gzip.open  # type: ignore[assignment]
    with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
        head = f.readline()
        if delimiter is None:
            delimiter = "\t" if head.count("\t") > head.count(",") else ","
        f.seek(0)
        try:
            return list(csv.DictReader(f, delimiter=delimiter))
        except csv.Error as e:
            raise MedvlUserError(f"malformed CSV ({e})", path=path) from None


def write_csv(rows: list[dict[str, Any]], path: Path, columns: list[str], *, delimiter: str = ",") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, delimiter=delimiter, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


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
