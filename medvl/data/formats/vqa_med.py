"""ImageCLEF VQA-Med 2019 (Ben Abacha et al., CLEF 2019) pipe-separated QA files.

Layouts:

* training / validation: ``image_id|question|answer`` lines (``All_QA_Pairs_train.txt``);
  the category comes from the file name in ``QAPairsByCategory/``
  (``C1_Modality_train.txt``, ``C2_Plane``, ``C3_Organ``, ``C4_Abnormality``);
* test with reference answers: ``image_id|category|question|answer`` lines.

IN may be one file or a folder: a folder with ``QAPairsByCategory/`` is read category by
category so every pair gets its category; otherwise every ``*.txt`` QA file in it is read.
Images are ``<image_id>.jpg`` (under the ``image_dir`` option when given).
Canonical: id ``<image_id>/<category or n>``; ``labels["category"]``.
Writing gives the 3-field layout, or the 4-field one with ``with_category=true``.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from medvl.data.formats.base import (Conversion, Format, collect_rows, one_image_qa, qa_conversation,
                                     register_format, require_exists)
from medvl.data.textfile import atomic_write_text
from medvl.data.schema import Media, Sample

_CAT_FILE = re.compile(r"C\d_([A-Za-z]+)_", re.I)
CATEGORIES = ("modality", "plane", "organ", "abnormality")


@register_format
class VQAMed2019Format(Format):
    name = "vqa-med-2019"
    description = "ImageCLEF VQA-Med 2019: image_id|question|answer lines (category from file name or 4th field)"
    layout = "a .txt file, or the dataset folder (QAPairsByCategory/ read per category)"
    read_options = {"image_dir": "folder holding <image_id>.jpg", "ext": "image file extension (default .jpg)"}
    write_options = {"with_category": "true: write image_id|category|question|answer (test-set layout)"}

    def read(self, path: Path, **options: Any) -> Conversion:
        path = require_exists(Path(path))
        if path.is_dir():
            cat_dir = path / "QAPairsByCategory"
            files = sorted(cat_dir.glob("*.txt")) if cat_dir.is_dir() else sorted(
                p for p in path.glob("*.txt") if not p.name.lower().startswith("readme"))
        else:
            files = [path]
        out = Conversion()
        per_image: Counter = Counter()
        ext = options.get("ext", ".jpg")
        root = options.get("image_dir")
        if root is None and path.is_dir() and (path / "images").is_dir():  # the dataset's own layout
            root = str((path / "images").resolve())
        index = 0
        for f in files:
            m = _CAT_FILE.search(f.name)
            file_cat = m.group(1).lower() if m else None
            for lineno, line in enumerate(f.read_text(encoding="utf-8-sig").splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.split("|")
                where = f"{f.name} line {lineno}"
                if len(parts) == 3:
                    image_id, q, a = parts
                    cat = file_cat
                elif len(parts) == 4:
                    image_id, cat, q, a = parts
                    cat = cat.strip().lower()
                else:
                    out.skip(index, where, f"{f.name} line {lineno}: expected 3 or 4 '|'-separated fields, got {len(parts)}")
                    index += 1
                    continue
                image_id = image_id.strip()
                per_image[image_id] += 1
                sid = f"{image_id}/{cat}" if cat else f"{image_id}/{per_image[image_id]}"
                img = image_id + ext
                labels = {"category": cat} if cat else {}
                out.samples.append(Sample(
                    id=sid, images=[Media(path=str(Path(root) / img) if root else img)],
                    conversation=qa_conversation(q.strip(), a.strip()), labels=labels,
                    meta={"source": "vqa-med-2019", "image_id": image_id}))
                index += 1
        _dedupe_ids(out.samples)
        return out

    def write(self, samples: list[Sample], path: Path, **options: Any) -> Conversion:
        with_cat = str(options.get("with_category", "false")).lower() in ("1", "true", "yes")
        def line(s: Sample) -> str:
            q, a = (x.replace("|", "/").replace("\n", " ") for x in one_image_qa(s, "VQA-Med"))
            image_id = s.meta.get("image_id") or Path(s.images[0].path or s.id).stem
            return f"{image_id}|{s.labels.get('category', '')}|{q}|{a}" if with_cat else f"{image_id}|{q}|{a}"
        lines, out = collect_rows(samples, line)
        atomic_write_text(Path(path), "\n".join(lines) + ("\n" if lines else ""))
        return out


def _dedupe_ids(samples: list[Sample]) -> None:
    """An image asked twice in one category gets ``/2``, ``/3`` ... appended."""
    seen: Counter = Counter()
    for s in samples:
        seen[s.id] += 1
        if seen[s.id] > 1:
            s.id = f"{s.id}/{seen[s.id]}"
