"""Image-caption pairs (PMC-OA, ROCO, MedICaT-style and open_clip CSVs).

Layouts read: a CSV/TSV with an image column and a caption column (ROCO's
``id,name,caption``; open_clip's tab-separated ``filepath,title``), or JSON Lines / JSON
with one object per pair (PMC-OA's ``{"image": ..., "caption": ...}``). Columns are found
by name (image: image, image_path, filepath, filename, path, name, img, imgpath; caption:
caption, text, title, txt, report) or set with the ``image_col`` / ``caption_col`` options.
Other columns go to ``meta["extra"]``. Canonical conversation: the ``prompt`` option
(default "Describe the image.") and the caption as the answer. Written as CSV when OUT
ends in .csv / .tsv, else JSON Lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medvl.data.formats.base import (Conversion, Format, as_text, dump_json, load_json_list, read_csv,
                                     register_format, require_exists, write_csv)
from medvl.data.schema import Media, Sample, Turn
from medvl.errors import MedvlUserError

IMAGE_KEYS = ("image", "image_path", "filepath", "filename", "path", "name", "img", "imgpath", "image_name")
CAPTION_KEYS = ("caption", "text", "title", "txt", "report", "captions")
DEFAULT_PROMPT = "Describe the image."


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: Path) -> str:
    if wanted:
        if wanted not in columns:
            raise MedvlUserError(f"{what} column {wanted!r} not found (columns: {', '.join(columns)})", path=path)
        return wanted
    lower = {c.lower(): c for c in columns}
    for c in candidates:
        if c in lower:
            return lower[c]
    raise MedvlUserError(f"no {what} column found among {', '.join(columns)}; "
                         f"name it with --opt {what}_col=NAME", path=path)


@register_format
class CaptionsFormat(Format):
    name = "captions"
    description = "image-caption pairs: CSV/TSV (ROCO, open_clip) or JSONL (PMC-OA)"
    layout = "a .csv/.tsv or .jsonl/.json file"
    read_options = {"image_col": "image column name", "caption_col": "caption column name",
                    "image_dir": "folder prefixed to image paths", "prompt": "user instruction"}
    write_options = {"image_col": "image column name (default: the source's, else image)",
                     "caption_col": "caption column name (default: the source's, else caption)"}

    def read(self, path: Path, **options: Any) -> Conversion:
        path = require_exists(Path(path))
        if path.suffix.lower() in (".csv", ".tsv", ".gz"):
            rows: list = read_csv(path)
            kind = "csv"
        else:
            rows = load_json_list(path)
            kind = "json"
        out = Conversion()
        if not rows:
            return out
        first = next((r for r in rows if isinstance(r, dict)), {})
        cols = list(first)
        icol = _pick(cols, options.get("image_col"), IMAGE_KEYS, "image", path)
        ccol = _pick(cols, options.get("caption_col"), CAPTION_KEYS, "caption", path)
        root = options.get("image_dir")
        prompt = options.get("prompt", DEFAULT_PROMPT)
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                out.skip(i, None, "record is not an object")
                continue
            img, cap = r.get(icol), r.get(ccol)
            rid = r.get("id", i)
            if isinstance(cap, list):  # several captions: first is the target, all kept in meta
                cap = cap[0] if cap else None
            if not img or cap in (None, ""):
                out.skip(i, rid, f"empty {icol if not img else ccol}")
                continue
            extra = {k: v for k, v in r.items() if k not in (icol, ccol, "id")}
            meta: dict[str, Any] = {"source": "captions", "columns": [icol, ccol], "layout": kind}
            if "id" in r:
                meta["has_id"] = True
            if extra:
                meta["extra"] = extra
            out.samples.append(Sample(
                id=str(rid), images=[Media(path=str(Path(root) / img) if root else str(img))],
                conversation=[Turn("user", "<image>\n" + prompt), Turn("assistant", as_text(cap))],
                meta=meta))
        return out

    def write(self, samples: list[Sample], path: Path, **options: Any) -> Conversion:
        path = Path(path)
        out = Conversion()
        rows = []
        icol = ccol = None
        for i, s in enumerate(samples):
            answers = s.turns("assistant")
            if len(s.images) != 1 or not answers:
                out.skip(i, s.id, "a caption pair needs exactly one image and an answer")
                continue
            src_cols = s.meta.get("columns") or ["image", "caption"]
            icol = options.get("image_col") or icol or src_cols[0]
            ccol = options.get("caption_col") or ccol or src_cols[1]
            row: dict[str, Any] = {}
            if s.meta.get("has_id", s.meta.get("source") != "captions"):
                row["id"] = s.id
            row[icol] = s.images[0].path
            row[ccol] = answers[-1].text
            row.update(s.meta.get("extra", {}))
            rows.append(row)
        if path.suffix.lower() in (".csv", ".tsv"):
            cols: list[str] = []
            for r in rows:
                cols += [k for k in r if k not in cols]
            write_csv(rows, path, cols, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        else:
            dump_json(rows, path, lines=path.suffix.lower() != ".json")
        out.written = len(rows)
        return out
