"""SLAKE (Liu et al., ISBI 2021), English and Chinese questions.

Layout (``train.json`` / ``validate.json`` / ``test.json`` of the SLAKE release)::

    [{"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "...", "answer": "...",
      "q_lang": "en", "location": "Lung", "modality": "CT", "answer_type": "OPEN",
      "base_type": "vqa", "content_type": "Organ", "triple": ["vhead", "_", "_"],
      "qid": 0}, ...]

Canonical: id ``str(qid)``; the image's ``modality`` tag from ``modality``; ``labels`` =
answer_type (stripped, upper-cased), content_type, location; ``meta`` = lang (``q_lang``)
and the rest (img_id, base_type, triple). The ``lang`` read option keeps one language
(``en`` or ``zh``); the other is counted as skipped, never dropped silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medvl.data.formats.base import (Conversion, Format, as_text, collect_rows, dump_json, load_json_list,
                                     one_image_qa, qa_conversation, register_format)
from medvl.data.schema import Media, Sample

_CORE = ("qid", "img_name", "question", "answer", "q_lang", "modality", "answer_type",
         "content_type", "location")


@register_format
class SlakeFormat(Format):
    name = "slake"
    description = "SLAKE JSON: img_name, question, answer, answer_type, q_lang, content_type, location, modality, base_type"
    layout = "a .json file (train.json / validate.json / test.json)"
    read_options = {"lang": "keep only 'en' or 'zh' questions (default: both)",
                    "image_dir": "folder prefixed to img_name (e.g. imgs)"}

    def read(self, path: Path, **options: Any) -> Conversion:
        rows = load_json_list(path)
        lang = options.get("lang")
        root = options.get("image_dir")
        out = Conversion()
        for i, r in enumerate(rows):
            rid = r.get("qid", i) if isinstance(r, dict) else i
            if not isinstance(r, dict):
                out.skip(i, rid, "record is not a JSON object")
                continue
            missing = [k for k in ("img_name", "question", "answer") if r.get(k) in (None, "")]
            if missing:
                out.skip(i, rid, f"missing field(s): {', '.join(missing)}")
                continue
            if lang and r.get("q_lang") != lang:
                out.skip(i, rid, f"q_lang={r.get('q_lang')!r} left out (lang={lang})")
                continue
            labels = {k: v for k, v in (
                ("answer_type", str(r.get("answer_type") or "").strip().upper() or None),
                ("content_type", r.get("content_type")), ("location", r.get("location"))) if v}
            meta: dict[str, Any] = {"source": "slake", "qid": r.get("qid", i)}
            if r.get("q_lang"):
                meta["lang"] = r["q_lang"]
            extra = {k: v for k, v in r.items() if k not in _CORE}
            if extra:
                meta["extra"] = extra
            img = r["img_name"] if not root else str(Path(root) / r["img_name"])
            out.samples.append(Sample(
                id=str(r.get("qid", i)), images=[Media(path=img, modality=r.get("modality"))],
                conversation=qa_conversation(str(r["question"]).strip(), as_text(r["answer"])),
                labels=labels, meta=meta))
        return out

    def write(self, samples: list[Sample], path: Path, **options: Any) -> Conversion:
        def row(s: Sample) -> dict:
            q, a = one_image_qa(s, "SLAKE")
            return {"qid": s.meta.get("qid", s.id), "img_name": s.images[0].path, "question": q, "answer": a,
                    "q_lang": s.meta.get("lang", "en"), "location": s.labels.get("location") or s.labels.get("organ"),
                    "modality": s.images[0].modality, "answer_type": s.labels.get("answer_type"),
                    "content_type": s.labels.get("content_type"), **s.meta.get("extra", {})}
        rows, out = collect_rows(samples, row)
        dump_json(rows, path)
        return out
