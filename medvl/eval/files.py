"""Prediction and reference files: read, check, join by id.

Accepted: JSON Lines, a JSON list, CSV/TSV, and medvl's canonical JSONL (the reference text
is then the last assistant turn, and the sample's labels — answer_type, question_type,
organ — and boxes come along). Columns are found by name or given explicitly.

Nothing is dropped silently: a record without an id, a duplicate id, a null / NaN text
(``None``, JSON ``NaN``, CSV ``nan``), or an undecodable byte raises
:class:`MedvlUserError` naming the file and record; ids present on one side only raise an
error listing them, unless the caller allows missing ids, in which case they are counted
and reported in the result.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvl.errors import MedvlUserError

ID_KEYS = ("id", "qid", "sample_id", "study_id", "dicom_id", "image_id", "uid", "question_id")
PRED_KEYS = ("prediction", "pred", "generated", "generation", "output", "answer", "text", "report", "caption")
REF_KEYS = ("reference", "ref", "ground_truth", "gt", "answer", "report", "findings", "text", "caption", "label")


@dataclass
class Record:
    id: str
    text: Any
    extra: dict = field(default_factory=dict)


def _rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) pairs; ``where`` is "line N" or "row N" for messages."""
    if not path.exists():
        raise MedvlUserError("file not found", path=path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise MedvlUserError(f"not UTF-8 text (byte {e.start}, line {line}); re-save the file as UTF-8",
                             path=path) from None
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        delim = "\t" if suffix == ".tsv" or text.split("\n", 1)[0].count("\t") > text.split("\n", 1)[0].count(",") else ","
        reader = csv.DictReader(text.splitlines(), delimiter=delim)
        return [(f"row {i + 2}", dict(r)) for i, r in enumerate(reader)]
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MedvlUserError(f"malformed JSON ({e.msg} at line {e.lineno})", path=path) from None
        return [(f"record {i}", r) for i, r in enumerate(data)]
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"line {i}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise MedvlUserError(f"malformed JSON ({e.msg})", path=path, record=f"line {i}") from None
    return out


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and v.strip().lower() == "nan")


def read_records(path: str | Path, *, text_key: str | None = None, id_key: str | None = None,
                 candidates: tuple[str, ...] = PRED_KEYS, allow_empty_text: bool = True) -> list[Record]:
    path = Path(path)
    rows = _rows(path)
    if not rows:
        raise MedvlUserError("file holds no records", path=path)
    first = rows[0][1]
    if not isinstance(first, dict):
        raise MedvlUserError("records must be JSON objects / CSV rows", path=path)
    canonical = "conversation" in first
    ikey = id_key or next((k for k in ID_KEYS if k in first), None)
    if ikey is None:
        raise MedvlUserError(f"no id column (looked for {', '.join(ID_KEYS)}; name it with --id-key)", path=path)
    tkey = None
    if not canonical:
        tkey = text_key or next((k for k in candidates if k in first), None)
        if tkey is None:
            raise MedvlUserError(f"no text column (looked for {', '.join(candidates)}; name it with --text-key)",
                                 path=path)
    out: list[Record] = []
    seen: dict[str, str] = {}
    for where, r in rows:
        if not isinstance(r, dict):
            raise MedvlUserError("not a JSON object", path=path, record=where)
        rid = r.get(ikey)
        if _is_missing(rid) or str(rid) == "":
            raise MedvlUserError(f"no {ikey!r}", path=path, record=where)
        rid = str(rid)
        if rid in seen:
            raise MedvlUserError(f"duplicate id {rid!r} (also at {seen[rid]})", path=path, record=where)
        seen[rid] = where
        if canonical:
            answers = [t for t in r.get("conversation", []) if t.get("role") == "assistant"]
            if not answers:
                raise MedvlUserError(f"id {rid!r}: no assistant turn to use as reference", path=path, record=where)
            text = answers[-1].get("text")
            extra = {"labels": r.get("labels") or {}, "boxes": r.get("boxes") or [],
                     "images": r.get("images") or []}
        else:
            text = r.get(tkey)
            extra = {k: v for k, v in r.items() if k not in (ikey, tkey)}
        if _is_missing(text):
            raise MedvlUserError(f"id {rid!r}: the text is null/NaN (write an empty string for an empty answer)",
                                 path=path, record=where)
        if isinstance(text, str) and not text.strip() and not allow_empty_text:
            raise MedvlUserError(f"id {rid!r}: empty text", path=path, record=where)
        out.append(Record(rid, text, extra))
    return out


@dataclass
class Joined:
    ids: list[str]
    preds: list[Record]
    refs: list[Record]
    missing_reference: list[str]
    missing_prediction: list[str]


def join(preds: list[Record], refs: list[Record], *, allow_missing: bool = False,
         pred_path: str = "predictions", ref_path: str = "references") -> Joined:
    pmap = {r.id: r for r in preds}
    rmap = {r.id: r for r in refs}
    no_ref = [i for i in pmap if i not in rmap]
    no_pred = [i for i in rmap if i not in pmap]
    if (no_ref or no_pred) and not allow_missing:
        parts = []
        if no_ref:
            parts.append(f"{len(no_ref)} prediction id(s) not in {ref_path} (e.g. {', '.join(no_ref[:5])})")
        if no_pred:
            parts.append(f"{len(no_pred)} reference id(s) without a prediction in {pred_path} "
                         f"(e.g. {', '.join(no_pred[:5])})")
        raise MedvlUserError("; ".join(parts) + ". Fix the files, or pass --allow-missing to score "
                             "only the ids on both sides (the others are counted in the result)")
    ids = [i for i in rmap if i in pmap]
    if not ids:
        raise MedvlUserError(f"no id is shared by {pred_path} and {ref_path}")
    return Joined(ids, [pmap[i] for i in ids], [rmap[i] for i in ids], no_ref, no_pred)
