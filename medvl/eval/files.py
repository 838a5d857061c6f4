"""Prediction and reference files: read, check, join by id.

Accepted: JSON Lines, a JSON list, CSV/TSV, and medvl's canonical JSONL (the reference text
is then the last assistant turn, and the sample's labels — answer_type, question_type,
organ — and boxes come along). Columns are found by name or given explicitly.

Nothing is dropped silently: a record without an id, a duplicate id, a null / NaN text
(``None``, JSON ``NaN``, CSV ``nan``), or an undecodable byte raises
:class:`MedvlUserError` naming the file and record; ids present on one side only raise an
error listing them, unless the caller allows missing ids, in which case they are counted
and reported in the result.

**An id is trusted only when the question agrees.** Where both files carry the question (a
``question`` / ``prompt`` column, or a canonical sample's user turn), a pair joined by id whose
questions differ is refused with a count and examples: two files keyed by different id schemes
(a LLaVA-Med answer file's own ``question_id`` against VQA-RAD's ``qid``) share ids that name
other questions, and scoring them gives a number about nothing. ``by="question"`` joins on the
question text instead (repeated questions — the same question about several images — are
matched in file order and counted). LLaVA-Med answer files (``question_id``, ``prompt``,
``text``, ``answer_id``, ``model_id``) are read as they are.

**Empty texts are counted, never scored silently**: :func:`empty_references` finds them; the
callers refuse empty references unless told to skip them, and report empty predictions.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvl.data.textfile import loads_json, read_text
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
    text = read_text(path)  # a regular UTF-8 file, or one line saying what it is instead
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        delim = "\t" if suffix == ".tsv" or text.split("\n", 1)[0].count("\t") > text.split("\n", 1)[0].count(",") else ","
        reader = csv.DictReader(text.splitlines(), delimiter=delim)
        return [(f"row {i + 2}", dict(r)) for i, r in enumerate(reader)]
    stripped = text.lstrip()
    if stripped.startswith("["):
        data = loads_json(text, path)
        if not isinstance(data, list):
            raise MedvlUserError(f"expected a JSON list of records, got {type(data).__name__}", path=path)
        return [(f"record {i}", r) for i, r in enumerate(data)]
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        out.append((f"line {i}", loads_json(line, path, f"line {i}")))
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
    if all(isinstance(r, str) for _, r in rows):  # MedM-VL's inference output: a JSON list of answers, in order
        return [Record(f"#{k}", r, {"positional": True}) for k, (_, r) in enumerate(rows)]
    if not isinstance(first, dict):
        raise MedvlUserError("records must be JSON objects / CSV rows (or a JSON list of answer strings)", path=path)
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
            conv = r.get("conversation", [])
            last = max(k for k, t in enumerate(conv) if t.get("role") == "assistant")
            asked = [t.get("text") for t in conv[:last] if t.get("role") == "user"]
            extra = {"labels": r.get("labels") or {}, "boxes": r.get("boxes") or [],
                     "images": r.get("images") or [], "question": asked[-1] if asked else None}
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


QUESTION_KEYS = ("question", "prompt", "query", "instruction")


def records_from_format(path: str | Path, fmt: str, options: dict | None = None) -> list[Record]:
    """References read through a data format's reader (``--ref-format medm-vl``, ``slake``, ``llava`` ...):
    the last assistant turn is the reference, the user turn before it the question."""
    from medvl.data.formats import get_format
    f = get_format(fmt)
    f.check_options(options or {}, "read")
    conv = f.read(Path(path), **(options or {}))
    out = []
    for s in conv.samples:
        answers = [k for k, t in enumerate(s.conversation) if t.role == "assistant"]
        if not answers:
            raise MedvlUserError(f"id {s.id!r}: no assistant turn to use as reference", path=path)
        asked = [t.text for t in s.conversation[:answers[-1]] if t.role == "user"]
        out.append(Record(str(s.id), s.conversation[answers[-1]].text,
                          {"labels": s.labels, "boxes": [b.to_dict() for b in s.boxes],
                           "images": [m.to_dict() for m in s.images], "question": asked[-1] if asked else None}))
    if conv.skipped:
        raise MedvlUserError(f"{len(conv.skipped)} reference record(s) could not be read (e.g. #{conv.skipped[0].index}:"
                             f" {conv.skipped[0].reason})", path=path)
    return out


def question_of(rec: Record) -> str | None:
    """The record's question, normalised for comparison (lower case, ``<image>`` and extra spaces
    removed), or None when the file does not carry one."""
    q = rec.extra.get("question")
    if q is None:
        q = next((rec.extra[k] for k in QUESTION_KEYS if isinstance(rec.extra.get(k), str)), None)
    if not isinstance(q, str) or not q.strip():
        return None
    return " ".join(q.replace("<image>", " ").lower().split()).strip(" ?.!:")


def _agree(p: str, r: str) -> bool:
    """A prediction's prompt may wrap the question in instructions (LLaVA-Med adds answer options)."""
    return p == r or r in p or p in r


@dataclass
class Joined:
    ids: list[str]
    preds: list[Record]
    refs: list[Record]
    missing_reference: list[str]
    missing_prediction: list[str]
    by: str = "id"
    questions_checked: int = 0
    """pairs whose questions were compared (both files carry them) and agreed"""
    matched_by_order: int = 0
    """``by="question"``: pairs of a question asked more than once, matched in file order"""
    skipped_empty: list[str] = field(default_factory=list)
    """ids left out because their reference is empty (:func:`drop_empty_references`)"""


def join(preds: list[Record], refs: list[Record], *, allow_missing: bool = False,
         pred_path: str = "predictions", ref_path: str = "references", by: str = "id") -> Joined:
    if preds and all(p.extra.get("positional") for p in preds):  # a bare list of answers: pair by position
        if len(preds) != len(refs):
            raise MedvlUserError(f"{pred_path} is a list of {len(preds)} answers without ids, paired with "
                                 f"{ref_path} by position, but that holds {len(refs)} records")
        return Joined([r.id for r in refs], list(preds), list(refs), [], [], "position")
    if by == "question":
        return _join_by_question(preds, refs, allow_missing=allow_missing, pred_path=pred_path, ref_path=ref_path)
    if by != "id":
        raise MedvlUserError(f"join by 'id' or 'question', got {by!r}")
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
    checked, differ = 0, []
    for i in ids:
        pq, rq = question_of(pmap[i]), question_of(rmap[i])
        if pq is not None and rq is not None:
            checked += 1
            if not _agree(pq, rq):
                differ.append(i)
    if differ:
        e = differ[0]
        raise MedvlUserError(
            f"{len(differ)} of {checked} shared id(s) name different questions in the two files (e.g. id {e}: "
            f"{question_of(pmap[e])!r} in {pred_path} vs {question_of(rmap[e])!r} in {ref_path}); the files are "
            "keyed by different id schemes. Join on the question text with --join question, or fix the ids")
    return Joined(ids, [pmap[i] for i in ids], [rmap[i] for i in ids], no_ref, no_pred, "id", checked)


def _join_by_question(preds: list[Record], refs: list[Record], *, allow_missing: bool, pred_path: str,
                      ref_path: str) -> Joined:
    for recs, path in ((preds, pred_path), (refs, ref_path)):
        lacking = [r.id for r in recs if question_of(r) is None]
        if lacking:
            raise MedvlUserError(f"--join question: {len(lacking)} record(s) carry no question (a question / "
                                 f"prompt column, or a canonical user turn), e.g. id {lacking[0]}", path=path)
    queue: dict[str, list[Record]] = {}
    for r in refs:
        queue.setdefault(question_of(r), []).append(r)
    repeated = {q for q, rs in queue.items() if len(rs) > 1}
    pairs, no_ref = [], []
    for p in preds:
        pq = question_of(p)
        key = pq if queue.get(pq) else next((q for q, rs in queue.items() if rs and _agree(pq, q)), None)
        if key is None:
            no_ref.append(p.id)
            continue
        pairs.append((p, queue[key].pop(0)))
    no_pred = [r.id for rs in queue.values() for r in rs]
    if (no_ref or no_pred) and not allow_missing:
        raise MedvlUserError(f"--join question: {len(no_ref)} prediction(s) match no reference question and "
                             f"{len(no_pred)} reference(s) have no prediction; pass --allow-missing to score the "
                             "matched pairs (the others are counted in the result)")
    if not pairs:
        raise MedvlUserError(f"no question of {pred_path} is found in {ref_path}")
    by_order = sum(1 for _, r in pairs if question_of(r) in repeated)
    return Joined([r.id for _, r in pairs], [p for p, _ in pairs], [r for _, r in pairs], no_ref, no_pred,
                  "question", len(pairs), by_order)


def empty_references(joined: Joined) -> list[str]:
    """Ids whose reference text is empty (or only spaces)."""
    return [i for i, r in zip(joined.ids, joined.refs) if isinstance(r.text, str) and not r.text.strip()]


def drop_empty_references(joined: Joined, policy: str, ref_path: str = "references") -> list[str]:
    """Apply ``--empty-refs``: ``refuse`` (an error naming how many and which) or ``skip`` (left out,
    returned, and reported by the caller). An empty reference is never scored: every metric would
    score any prediction against nothing, and a labeler would call it "No Finding"."""
    empty = empty_references(joined)
    if not empty:
        return []
    if policy != "skip":
        raise MedvlUserError(f"{len(empty)} reference(s) are empty (e.g. id {empty[0]}); an empty reference "
                             "cannot be scored. Pass --empty-refs skip to leave them out (they are counted in the "
                             "result), or fill them in", path=ref_path)
    keep = [k for k, i in enumerate(joined.ids) if i not in set(empty)]
    if not keep:
        raise MedvlUserError("every reference is empty", path=ref_path)
    joined.ids = [joined.ids[k] for k in keep]
    joined.preds = [joined.preds[k] for k in keep]
    joined.refs = [joined.refs[k] for k in keep]
    joined.skipped_empty = empty
    return empty
