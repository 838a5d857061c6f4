"""The canonical sample: one schema that every reader produces and every writer consumes.

A :class:`Sample` is one training or evaluation example::

    {"id": "vqa-rad-1",
     "images": [{"path": "images/synpic54610.jpg", "kind": "image", "modality": "MRI"}],
     "conversation": [{"role": "user", "text": "<image>\\nAre regions of the brain infarcted?"},
                      {"role": "assistant", "text": "Yes"}],
     "boxes": [],                      # structured boxes, see Box
     "labels": {"answer_type": "CLOSED", "organ": "HEAD"},
     "teacher_features": {},           # feature key -> "file" or "file#key"
     "meta": {"source": "vqa-rad", "qid": 1}}

Design choices:

* **One placeholder per image, in order.** ``<image>`` marks where each entry of
  ``images`` goes, for 2D images and 3D volumes alike (the entry's ``kind`` says which);
  format writers translate to their own markers (MedM-VL's ``<image3d>``, Qwen2-VL's
  vision tokens). The count of placeholders must equal the count of images.
* **Boxes live in structured fields, not in the text.** The text keeps a ``<box/>``
  marker where a box was written, and ``boxes[k]`` holds the k-th marker's coordinates,
  in ``xyxy`` order (left, top, right, bottom) in a stated coordinate ``space``:
  ``pixel`` (of the referenced image), ``norm1`` ([0, 1]) or ``norm1000`` (integers in
  [0, 1000), the Qwen-VL / Qwen2-VL and Med-GRIT convention). Referring phrases stay in the
  text as ``<ref>phrase</ref>``, and the box records the phrase that precedes it.
* **Images are paths (or in-memory arrays).** Paths are stored as written by the source;
  relative paths resolve against an image root (by default the JSONL file's folder).
  Arrays are for in-memory use; they are not written to JSONL.
* **Nothing is thrown away.** Fields of a source format that have no canonical home go
  to ``meta`` so that writing back to the same format restores them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from medvl.data.textfile import read_text
from medvl.errors import MedvlUserError

IMAGE_TOKEN = "<image>"
BOX_TOKEN = "<box/>"
ROLES = ("system", "user", "assistant")
MEDIA_KINDS = ("image", "volume")
BOX_SPACES = ("pixel", "norm1", "norm1000")

_IMAGE_RE = re.compile(re.escape(IMAGE_TOKEN))


@dataclass
class Media:
    """One image or volume of a sample.

    ``kind`` is ``"image"`` (2D) or ``"volume"`` (3D). ``modality`` is a free tag (CT, MR,
    CR, US, XR, ...). ``array`` holds decoded pixels for in-memory samples; it is never
    serialised.
    """

    path: str | None = None
    kind: str = "image"
    modality: str | None = None
    array: Any = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"path": self.path, "kind": self.kind}
        if self.modality is not None:
            d["modality"] = self.modality
        return d


@dataclass
class Turn:
    """One message of the conversation: ``role`` in system / user / assistant."""

    role: str
    text: str

    def to_dict(self) -> dict:
        return {"role": self.role, "text": self.text}


@dataclass
class Box:
    """An axis-aligned box ``[x1, y1, x2, y2]`` (left, top, right, bottom).

    ``space`` states the coordinate convention (see the module docstring); ``image`` is
    the index of the image it refers to; ``turn`` the conversation turn whose text holds
    its ``<box/>`` marker; ``phrase`` the referring expression, when the source had one.
    """

    bbox: list[float]
    space: str = "norm1000"
    image: int = 0
    turn: int | None = None
    phrase: str | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"bbox": list(self.bbox), "space": self.space, "image": self.image}
        if self.turn is not None:
            d["turn"] = self.turn
        if self.phrase is not None:
            d["phrase"] = self.phrase
        return d


@dataclass
class Sample:
    """One canonical example; see the module docstring for the JSON form."""

    id: str
    images: list[Media] = field(default_factory=list)
    conversation: list[Turn] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    labels: dict[str, Any] = field(default_factory=dict)
    teacher_features: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- convenience -------------------------------------------------------------
    def turns(self, role: str) -> list[Turn]:
        return [t for t in self.conversation if t.role == role]

    def qa_pairs(self) -> list[tuple[str, str]]:
        """(user text, assistant text) pairs in order; unpaired turns are left out."""
        pairs, pending = [], None
        for t in self.conversation:
            if t.role == "user":
                pending = t.text
            elif t.role == "assistant" and pending is not None:
                pairs.append((pending, t.text))
                pending = None
        return pairs

    def to_dict(self) -> dict:
        d: dict[str, Any] = {
            "id": self.id,
            "images": [m.to_dict() for m in self.images],
            "conversation": [t.to_dict() for t in self.conversation],
        }
        if self.boxes:
            d["boxes"] = [b.to_dict() for b in self.boxes]
        if self.labels:
            d["labels"] = self.labels
        if self.teacher_features:
            d["teacher_features"] = self.teacher_features
        if self.meta:
            d["meta"] = self.meta
        return d

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "") -> "Sample":
        """Build a sample from its JSON form; raises MedvlUserError on a wrong shape.

        Only the structure is checked here (types, required keys); :func:`validate`
        checks the meaning (placeholders, boxes, roles) and reports every problem.
        """
        if not isinstance(d, dict):
            raise MedvlUserError(f"{where}a sample must be a JSON object, got {type(d).__name__}")
        try:
            images = []
            for m in d.get("images") or []:
                if isinstance(m, str):
                    m = {"path": m}
                images.append(Media(path=m.get("path"), kind=m.get("kind", "image"),
                                    modality=m.get("modality")))
            conv = [Turn(role=t["role"], text=t["text"]) for t in d.get("conversation") or []]
            boxes = [Box(bbox=list(b["bbox"]), space=b.get("space", "norm1000"),
                         image=b.get("image", 0), turn=b.get("turn"), phrase=b.get("phrase"))
                     for b in d.get("boxes") or []]
        except (KeyError, TypeError, AttributeError) as e:
            raise MedvlUserError(f"{where}malformed sample field ({e!r})") from None
        return cls(id=d.get("id"), images=images, conversation=conv, boxes=boxes,
                   labels=d.get("labels") or {}, teacher_features=d.get("teacher_features") or {},
                   meta=d.get("meta") or {})


def count_placeholders(text: str) -> int:
    return len(_IMAGE_RE.findall(text))


# ---- validation ------------------------------------------------------------------

@dataclass
class Problem:
    """One validation finding, located by record index (0-based) and id."""

    index: int
    id: str | None
    message: str

    def __str__(self) -> str:
        return f"record {self.index} (id={self.id!r}): {self.message}"


def validate_sample(s: Sample, index: int = 0, *, image_root: Path | None = None,
                    check_files: bool = False, data_root: Path | None = None) -> list[Problem]:
    """Every problem of one sample (an empty list when it is valid). Image paths resolve against
    ``image_root``, teacher feature files against ``data_root`` (the data file's folder; default
    ``image_root``)."""
    out: list[Problem] = []

    def bad(msg: str) -> None:
        out.append(Problem(index, s.id if isinstance(s.id, str) else repr(s.id), msg))

    if not isinstance(s.id, str) or not s.id:
        bad("missing or empty 'id' (a non-empty string is required)")
    if not s.conversation:
        bad("empty conversation")
    n_ph = 0
    for i, t in enumerate(s.conversation):
        if t.role not in ROLES:
            bad(f"turn {i}: unknown role {t.role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(t.text, str):
            bad(f"turn {i}: text must be a string, got {type(t.text).__name__}")
            continue
        n_ph += count_placeholders(t.text)
    if n_ph != len(s.images):
        bad(f"{n_ph} '{IMAGE_TOKEN}' placeholder(s) in the conversation but "
            f"{len(s.images)} image(s)")
    for j, m in enumerate(s.images):
        if m.kind not in MEDIA_KINDS:
            bad(f"image {j}: unknown kind {m.kind!r} (expected image or volume)")
        if m.path is None and m.array is None:
            bad(f"image {j}: neither a path nor an array")
        elif m.path is not None and not isinstance(m.path, str):
            bad(f"image {j}: path must be a string")
        elif check_files and m.path is not None:
            p = resolve_path(m.path, image_root)
            if not p.exists():
                bad(f"image {j}: file not found: {p}")
    n_box_markers = sum(t.text.count(BOX_TOKEN) for t in s.conversation if isinstance(t.text, str))
    if s.boxes and n_box_markers not in (0, len(s.boxes)):
        bad(f"{n_box_markers} '{BOX_TOKEN}' marker(s) in the text but {len(s.boxes)} box(es)")
    for k, b in enumerate(s.boxes):
        if len(b.bbox) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in b.bbox):
            bad(f"box {k}: bbox must be 4 finite numbers [x1, y1, x2, y2], got {b.bbox!r}")
            continue
        x1, y1, x2, y2 = b.bbox
        if x2 < x1 or y2 < y1:
            bad(f"box {k}: x2 < x1 or y2 < y1 in {b.bbox!r} (convention is xyxy)")
        if b.space not in BOX_SPACES:
            bad(f"box {k}: unknown space {b.space!r} (expected {', '.join(BOX_SPACES)})")
        else:
            hi = {"norm1": 1.0, "norm1000": 1000.0}.get(b.space)
            if hi is not None and (min(b.bbox) < 0 or max(b.bbox) > hi):
                bad(f"box {k}: coordinates {b.bbox!r} outside [0, {hi:g}] for space {b.space}")
        if not (0 <= b.image < max(len(s.images), 1)):
            bad(f"box {k}: refers to image {b.image} but the sample has {len(s.images)} image(s)")
        if b.turn is not None and not (0 <= b.turn < len(s.conversation)):
            bad(f"box {k}: refers to turn {b.turn} but the conversation has {len(s.conversation)}")
    if not isinstance(s.labels, dict):
        bad("'labels' must be an object")
    if not isinstance(s.teacher_features, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in s.teacher_features.items()):
        bad("'teacher_features' must map feature names to file references (strings)")
    else:
        clips = (s.meta or {}).get("available_clips") if isinstance(s.meta, dict) else None
        if clips and not s.teacher_features:
            bad(f"lists teachers {', '.join(map(str, clips))} but no teacher feature file was found for it")
        if check_files:
            for f in sorted({v.partition("#")[0] for v in s.teacher_features.values()}):
                p = resolve_path(f, data_root if data_root is not None else image_root)
                if not p.exists():
                    bad(f"teacher feature file not found: {p}")
    if not isinstance(s.meta, dict):
        bad("'meta' must be an object")
    return out


def validate(samples: Iterable[Sample], *, image_root: Path | None = None,
             check_files: bool = False, data_root: Path | None = None) -> list[Problem]:
    """Every problem of every sample, including duplicate ids."""
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for i, s in enumerate(samples):
        problems += validate_sample(s, i, image_root=image_root, check_files=check_files, data_root=data_root)
        if isinstance(s.id, str):
            if s.id in seen:
                problems.append(Problem(i, s.id, f"duplicate id (first used by record {seen[s.id]})"))
            else:
                seen[s.id] = i
    return problems


def resolve_path(path: str, root: Path | None) -> Path:
    p = Path(path)
    if p.is_absolute() or root is None:
        return p
    return Path(root) / p


# ---- JSONL ----------------------------------------------------------------------

def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict | Exception]]:
    """Yield (line number, parsed object or the parse error) for each non-blank line."""
    path = Path(path)
    if path.is_dir():
        raise MedvlUserError("is a folder, not a .jsonl file (give the file, or data.format for a dataset folder)",
                             path=path)
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, e
        except RecursionError:
            yield lineno, json.JSONDecodeError("nested too deeply", line, 0)


def read_jsonl(path: str | Path, *, strict: bool = True) -> list[Sample]:
    """Read a canonical JSONL file. With ``strict``, the first malformed line raises
    a MedvlUserError naming the file and line; otherwise malformed lines are skipped
    (use :func:`load_jsonl_report` to get them counted)."""
    samples, errors = load_jsonl_report(path)
    if errors and strict:
        raise MedvlUserError(errors[0][1], path=path, record=f"at line {errors[0][0]}")
    return samples


def load_jsonl_report(path: str | Path) -> tuple[list[Sample], list[tuple[int, str]]]:
    """Samples plus a list of (line number, error) for lines that could not be read."""
    samples: list[Sample] = []
    errors: list[tuple[int, str]] = []
    for lineno, obj in iter_jsonl(path):
        if isinstance(obj, Exception):
            errors.append((lineno, f"malformed JSON ({obj.msg} at column {obj.colno})"))
            continue
        try:
            samples.append(Sample.from_dict(obj))
        except MedvlUserError as e:
            errors.append((lineno, str(e)))
    return samples, errors


def write_jsonl(samples: Iterable[Sample], path: str | Path) -> int:
    """Write samples as canonical JSONL (UTF-8, one object per line); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    return n
