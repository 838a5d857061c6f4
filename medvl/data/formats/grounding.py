"""Grounding conversations (Med-GRIT-270k / BiRD, ClinKD): boxes written in the text.

Records are LLaVA-style (``image`` + ``conversations``), ShareGPT-style (``messages`` +
``images``) or Qwen-VL-style with the image inline (``Picture 1: <img>path</img>``, the
layout BiRD fine-tunes Qwen-VL on). Boxes in any syntax of :mod:`medvl.data.boxes` are
parsed into ``Sample.boxes`` (``xyxy``, ``space="norm1000"`` unless the ``space`` option
says otherwise) and the text keeps ``<box/>`` / ``<ref>`` markers. Writing renders them
back in the source's syntax (or ``box_style``) and in the source's record layout.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medvl.data.boxes import STYLES, BoxSyntaxError, parse_boxes
from medvl.data.formats.base import Conversion, Format, dump_json, load_json_list, register_format
from medvl.data.formats.llava import (RecordError, as_path_list, insert_missing_placeholders,
                                      parse_from_value, render_from_value, writable_turns)
from medvl.data.formats.sharegpt import _parse_messages
from medvl.data.schema import BOX_SPACES, IMAGE_TOKEN, Media, Sample, Turn

QWEN_SPEAKERS = {"user": "user", "assistant": "assistant", "system": "system"}  # Qwen-VL's names
_INLINE_IMG = re.compile(r"(?:Picture \d+:\s*)?<img>(.*?)</img>\n?", re.S)


@register_format
class GroundingFormat(Format):
    name = "grounding"
    description = ("Med-GRIT / BiRD / ClinKD grounding conversations: boxes as "
                   "<box_start>(x1,y1),(x2,y2)<box_end>, <|box_start|>...<|box_end|> or <box>...</box>")
    layout = "a .json file (a list of records)"
    read_options = {"space": f"coordinate space of the boxes: {', '.join(BOX_SPACES)} (default norm1000)",
                    "image_dir": "folder prefixed to relative image paths"}
    write_options = {"box_style": f"{', '.join(STYLES)} (default: the source's, else grit)",
                     "layout": "llava, sharegpt or qwenvl (default: the source's, else llava)"}

    def read(self, path: Path, **options: Any) -> Conversion:
        rows = load_json_list(path)
        space = options.get("space", "norm1000")
        root = options.get("image_dir")
        out = Conversion()
        for i, r in enumerate(rows):
            rid = r.get("id", i) if isinstance(r, dict) else i
            try:
                if not isinstance(r, dict):
                    raise RecordError("record is not a JSON object")
                if "messages" in r:
                    layout, turns = "sharegpt", _parse_messages(r["messages"])
                    paths, _ = as_path_list(r.get("images"))
                else:
                    turns = parse_from_value(r.get("conversations"))
                    paths, _ = as_path_list(r.get("image"))
                    layout = "llava"
                    if not paths and any("<img>" in t.text for t in turns):
                        layout, turns, paths = "qwenvl", *_pull_inline_images(turns)
                inserted = insert_missing_placeholders(turns, len(paths))
                turns, boxes, style = parse_boxes(turns, space=space)
            except (RecordError, BoxSyntaxError) as e:
                out.skip(i, rid, str(e))
                continue
            meta: dict[str, Any] = {"source": "grounding", "layout": layout}
            if style:
                meta["box_style"] = style
            if inserted:
                meta["placeholders_inserted"] = True
            if "id" not in r:
                meta["generated_id"] = True
            known = ("id", "image", "images", "conversations", "messages")
            extra = {k: v for k, v in r.items() if k not in known}
            if extra:
                meta["extra"] = extra
            media = [Media(path=p if not root else str(Path(root) / p)) for p in paths]
            out.samples.append(Sample(id=str(rid), images=media, conversation=turns,
                                      boxes=boxes, meta=meta))
        return out

    def write(self, samples: list[Sample], path: Path, **options: Any) -> Conversion:
        out = Conversion()
        rows = []
        for s in samples:
            turns = writable_turns(s, options.get("box_style"), default_style="grit")
            layout = options.get("layout") or s.meta.get("layout", "llava")
            paths = [m.path for m in s.images]
            row: dict[str, Any] = {} if s.meta.get("generated_id") else {"id": s.id}
            if layout == "sharegpt":
                row["messages"] = [{"role": t.role, "content": t.text} for t in turns]
                if paths:
                    row["images"] = paths
            elif layout == "qwenvl":
                row["conversations"] = render_from_value(_push_inline_images(turns, paths), QWEN_SPEAKERS)
            else:
                if paths:
                    row["image"] = paths[0] if len(paths) == 1 else paths
                row["conversations"] = render_from_value(turns)
            row.update(s.meta.get("extra", {}))
            rows.append(row)
        dump_json(rows, path)
        out.written = len(rows)
        return out


def _pull_inline_images(turns: list[Turn]) -> tuple[list[Turn], list[str]]:
    paths: list[str] = []
    new = []
    for t in turns:
        def take(m: re.Match) -> str:
            paths.append(m.group(1).strip())
            return IMAGE_TOKEN + "\n"
        new.append(Turn(t.role, _INLINE_IMG.sub(take, t.text)))
    return new, paths


def _push_inline_images(turns: list[Turn], paths: list[str]) -> list[Turn]:
    it = iter(enumerate(paths, 1))
    out = []
    for t in turns:
        text = re.sub(re.escape(IMAGE_TOKEN) + r"\n?",
                      lambda _m: "Picture {0}: <img>{1}</img>\n".format(*next(it)), t.text)
        out.append(Turn(t.role, text))
    return out
