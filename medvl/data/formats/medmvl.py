"""MedM-VL JSON: LLaVA-style records with 2D ``image`` and 3D ``image3d`` lists.

Layout (MedM-VL, Shi et al. 2025, github.com/MSIIP/MedM-VL)::

    [{"id": "...", "image": ["a.png"], "image3d": ["ct.npy"],
      "conversations": [{"from": "human", "value": "<image3d>\\nDescribe the CT."},
                        {"from": "gpt", "value": "..."}]}]

``<image>`` placeholders take paths from ``image`` and ``<image3d>`` from ``image3d``,
each in order; the canonical sample keeps them interleaved in text order, volumes marked
``kind="volume"``. Either field may be a single string, which is written back as one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medvl.data.formats.base import Conversion, Format, dump_json, load_json_list, register_format
from medvl.data.formats.llava import (RecordError, as_path_list, parse_from_value,
                                      render_from_value, writable_turns)
from medvl.data.schema import IMAGE_TOKEN, Media, Sample, Turn

IMAGE3D_TOKEN = "<image3d>"
_TOKENS = re.compile(r"<image3d>|<image>")


@register_format
class MedMVLFormat(Format):
    name = "medm-vl"
    description = "MedM-VL JSON: LLaVA-style with 'image' and 'image3d' lists, <image3d> placeholders"
    layout = "a .json file (a list of records)"
    read_options = {"image_dir": "folder prefixed to relative image and volume paths"}
    write_options = {"box_style": "syntax for boxes (default: the source's, else qwen2vl)"}

    def read(self, path: Path, **options: Any) -> Conversion:
        rows = load_json_list(path)
        out = Conversion()
        root = options.get("image_dir")
        for i, r in enumerate(rows):
            rid = r.get("id", i) if isinstance(r, dict) else i
            try:
                if not isinstance(r, dict):
                    raise RecordError("record is not a JSON object")
                im2d, s2 = as_path_list(r.get("image"))
                im3d, s3 = as_path_list(r.get("image3d"))
                turns = parse_from_value(r.get("conversations"))
                media, new_turns = _interleave(turns, im2d, im3d)
            except RecordError as e:
                out.skip(i, rid, str(e))
                continue
            if root:
                for m in media:
                    m.path = m.path if Path(m.path).is_absolute() else str(Path(root) / m.path)
            meta: dict[str, Any] = {"source": "medm-vl"}
            scalar = [k for k, flag in (("image", s2), ("image3d", s3)) if flag]
            if scalar:
                meta["scalar_fields"] = scalar
            extra = {k: v for k, v in r.items() if k not in ("id", "image", "image3d", "conversations")}
            if extra:
                meta["extra"] = extra
            out.samples.append(Sample(id=str(rid), images=media, conversation=new_turns, meta=meta))
        return out

    def write(self, samples: list[Sample], path: Path, **options: Any) -> Conversion:
        out = Conversion()
        rows = []
        for s in samples:
            turns = writable_turns(s, options.get("box_style"))
            kinds = iter(m.kind for m in s.images)
            new = []
            for t in turns:
                new.append(Turn(t.role, re.sub(re.escape(IMAGE_TOKEN),
                                               lambda _m: IMAGE3D_TOKEN if next(kinds, "image") == "volume"
                                               else IMAGE_TOKEN, t.text)))
            row: dict[str, Any] = {"id": s.id}
            scalar = s.meta.get("scalar_fields", [])
            for key, kind in (("image", "image"), ("image3d", "volume")):
                paths = [m.path for m in s.images if m.kind == kind]
                if paths:
                    row[key] = paths[0] if key in scalar and len(paths) == 1 else paths
            row["conversations"] = render_from_value(new)
            row.update(s.meta.get("extra", {}))
            rows.append(row)
        dump_json(rows, path)
        out.written = len(rows)
        return out


def _interleave(turns: list[Turn], im2d: list[str], im3d: list[str]) -> tuple[list[Media], list[Turn]]:
    """Media in placeholder order; every placeholder becomes ``<image>``."""
    media: list[Media] = []
    i2 = i3 = 0
    new_turns = []
    for t in turns:
        for m in _TOKENS.finditer(t.text):
            if m.group(0) == IMAGE3D_TOKEN:
                if i3 >= len(im3d):
                    raise RecordError(f"more <image3d> placeholders than 'image3d' paths ({len(im3d)})")
                media.append(Media(path=im3d[i3], kind="volume"))
                i3 += 1
            else:
                if i2 >= len(im2d):
                    raise RecordError(f"more <image> placeholders than 'image' paths ({len(im2d)})")
                media.append(Media(path=im2d[i2], kind="image"))
                i2 += 1
        new_turns.append(Turn(t.role, t.text.replace(IMAGE3D_TOKEN, IMAGE_TOKEN)))
    if i2 != len(im2d) or i3 != len(im3d):
        raise RecordError(f"{len(im2d)} image(s) and {len(im3d)} volume(s) but {i2} <image> and "
                          f"{i3} <image3d> placeholder(s)")
    return media, new_turns
