"""VQA-RAD (Lau et al., Sci Data 2018) in the published MEVF JSON layout.

Layout (``trainset.json`` / ``testset.json`` of the MEVF / med-vqa repositories)::

    [{"qid": 1, "image_name": "synpic54610.jpg", "image_organ": "HEAD", "answer": "Yes",
      "answer_type": "CLOSED", "question_type": "PRES", "question": "...",
      "phrase_type": "freeform"}, ...]

Normalisations on read (each original value is kept in ``meta["original"]`` and the
``original=true`` write option restores it):

* questions are stripped of surrounding spaces;
* answers stored as JSON integers (e.g. ``4`` for "how many gallstones") become strings;
* ``answer_type`` is stripped and upper-cased (two records say ``"CLOSED "``);
* ``question_type`` is upper-cased and its published typos fixed (``Other`` -> ``OTHER``,
  ``ATRIB`` -> ``ATTRIB``, ``PRSE`` -> ``PRES``); the comma-joined multi-type values
  (``"PRES, POS"``) are kept as they are.

Canonical: id ``str(qid)``; ``labels`` = answer_type, question_type, organ;
``meta`` = qid, phrase_type.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from medvl.data.formats.base import (Conversion, Format, as_text, collect_rows, dump_json, load_json_list,
                                     one_image_qa, qa_conversation, register_format)
from medvl.data.schema import Media, Sample

QUESTION_TYPE_FIXES = {"ATRIB": "ATTRIB", "PRSE": "PRES"}
_FIELDS = ("qid", "image_name", "image_organ", "answer", "answer_type", "question_type",
           "question", "phrase_type")


@functools.lru_cache(maxsize=1024)
def normalise_question_type(qt: str) -> str:
    parts = [p.strip().upper() for p in qt.split(",")]
    return ", ".join(QUESTION_TYPE_FIXES.get(p, p) for p in parts)


@register_format
class VQARADFormat(Format):
    name = "vqa-rad"
    description = "VQA-RAD JSON: qid, image_name, image_organ, answer, answer_type, question_type, question, phrase_type"
    layout = "a .json file (trainset.json / testset.json)"
    read_options = {"image_dir": "folder prefixed to image_name (e.g. images)"}
    write_options = {"original": "true: write the published values back (integer answers, typos)"}

    def read(self, path: Path, **options: Any) -> Conversion:
        rows = load_json_list(path)
        root = options.get("image_dir")
        out = Conversion()
        for i, r in enumerate(rows):
            rid = r.get("qid", i) if isinstance(r, dict) else i
            if not isinstance(r, dict):
                out.skip(i, rid, "record is not a JSON object")
                continue
            missing = [k for k in ("qid", "image_name", "question", "answer") if r.get(k) in (None, "")]
            if missing:
                out.skip(i, rid, f"missing field(s): {', '.join(missing)}")
                continue
            original = {}
            answer = as_text(r["answer"])
            if not isinstance(r["answer"], str):
                original["answer"] = r["answer"]
            labels: dict[str, Any] = {}
            if r.get("answer_type") is not None:
                labels["answer_type"] = str(r["answer_type"]).strip().upper()
                if labels["answer_type"] != r["answer_type"]:
                    original["answer_type"] = r["answer_type"]
            if r.get("question_type") is not None:
                labels["question_type"] = normalise_question_type(str(r["question_type"]))
                if labels["question_type"] != r["question_type"]:
                    original["question_type"] = r["question_type"]
            question = str(r["question"]).strip()
            if question != r["question"]:
                original["question"] = r["question"]
            if r.get("image_organ") is not None:
                labels["organ"] = r["image_organ"]
            meta: dict[str, Any] = {"source": "vqa-rad", "qid": r["qid"]}
            if r.get("phrase_type") is not None:
                meta["phrase_type"] = r["phrase_type"]
            if original:
                meta["original"] = original
            extra = {k: v for k, v in r.items() if k not in _FIELDS}
            if extra:
                meta["extra"] = extra
            img = r["image_name"] if not root else str(Path(root) / r["image_name"])
            out.samples.append(Sample(id=str(r["qid"]), images=[Media(path=img)],
                                      conversation=qa_conversation(question, answer),
                                      labels=labels, meta=meta))
        n_fixed = sum(1 for s in out.samples if "original" in s.meta)
        if n_fixed:
            out.notes.append(f"normalised published values in {n_fixed} record(s) "
                             "(integer answers, answer_type spacing, question_type typos)")
        return out

    def write(self, samples: list[Sample], path: Path, **options: Any) -> Conversion:
        restore = str(options.get("original", "false")).lower() in ("1", "true", "yes")

        def row(s: Sample) -> dict:
            q, a = one_image_qa(s, "VQA-RAD")
            r = {"qid": s.meta.get("qid", s.id), "image_name": Path(s.images[0].path or "").name,
                 "image_organ": s.labels.get("organ"), "answer": a, "answer_type": s.labels.get("answer_type"),
                 "question_type": s.labels.get("question_type"), "question": q,
                 "phrase_type": s.meta.get("phrase_type")}
            if restore:
                r.update(s.meta.get("original", {}))
            r.update(s.meta.get("extra", {}))
            return r
        rows, out = collect_rows(samples, row)
        dump_json(rows, path)
        return out
