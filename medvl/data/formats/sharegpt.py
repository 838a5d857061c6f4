"""ShareGPT, as LLaMA-Factory reads it.

Layout (LLaMA-Factory ``data/README.md``, multimodal sharegpt)::

    [{"messages": [{"role": "user", "content": "<image>Question"},
                   {"role": "assistant", "content": "Answer"}],
      "images": ["path.jpg"]}, ...]

A ``system`` message may come first (or a separate ``system`` column, which the reader
also accepts). The classic ``conversations`` / ``from`` / ``value`` spelling is read too.
Writing also writes (or updates) ``dataset_info.json`` beside the output file, with an
entry that tells LLaMA-Factory the column and role names, so the file can be used with
``dataset: <name>`` directly. Reading takes ``dataset_info.json`` itself too, as LLaMA-Factory
does: ``--opt dataset=NAME`` picks the entry (the only one needs no name), whose ``file_name``
is read from the same folder with the entry's ``columns`` (messages / images / system) and
``tags`` (role_tag, content_tag, user_tag, assistant_tag, system_tag). LLaMA-Factory requires as many ``<image>`` tags as images,
which canonical samples guarantee.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medvl.data.boxes import BoxSyntaxError, parse_boxes
from medvl.data.boxes import BoxSyntaxError, parse_boxes
from medvl.data.formats.base import Conversion, Format, dump_json, load_json, load_json_list, register_format
from medvl.data.formats.llava import (FROM_TO_ROLE, RecordError, as_path_list,
                                      insert_missing_placeholders, parse_from_value,
                                      writable_turns)
from medvl.data.schema import Media, Sample, Turn
from medvl.errors import MedvlUserError

_KNOWN = ("id", "messages", "conversations", "images", "system")


def _parse_messages(msgs: Any, tags: dict | None = None) -> list[Turn]:
    tags = tags or {}
    rk, ck = tags.get("role_tag", "role"), tags.get("content_tag", "content")
    roles = dict(FROM_TO_ROLE)
    roles.update({str(tags[k]).lower(): r for k, r in (("user_tag", "user"), ("assistant_tag", "assistant"),
                                                       ("system_tag", "system")) if k in tags})
    if not isinstance(msgs, list) or not msgs:
        raise RecordError("'messages' missing or empty")
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or rk not in m or ck not in m:
            raise RecordError(f"message {i} lacks {rk!r}/{ck!r}")
        role = roles.get(str(m[rk]).lower())
        if role is None:
            raise RecordError(f"message {i}: unknown role {m[rk]!r}")
        if not isinstance(m[ck], str):
            raise RecordError(f"message {i}: {ck!r} is not a string")
        turns.append(Turn(role, m[ck]))
    return turns


def dataset_info_entry(path: Path, name: str | None) -> tuple[Path, dict, dict]:
    """(the data file, its columns, its tags) from a LLaMA-Factory ``dataset_info.json``."""
    info = load_json(path)
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise MedvlUserError("not a dataset_info.json (an object of dataset entries)", path=path)
    if name is None:
        if len(info) != 1:
            raise MedvlUserError(f"dataset_info.json lists {len(info)} datasets ({', '.join(list(info)[:8])}); "
                                 "pick one with --dataset NAME (or --opt dataset=NAME)", path=path)
        name = next(iter(info))
    if name not in info:
        raise MedvlUserError(f"no dataset {name!r} in dataset_info.json (it lists {', '.join(list(info)[:8])})",
                             path=path)
    entry = info[name]
    if entry.get("formatting", "alpaca") != "sharegpt":
        raise MedvlUserError(f"dataset {name!r} is formatted {entry.get('formatting', 'alpaca')!r}; medvl reads "
                             "LLaMA-Factory's sharegpt entries", path=path)
    if not entry.get("file_name"):
        raise MedvlUserError(f"dataset {name!r} names no local file_name (hub datasets are not read)", path=path)
    return path.parent / entry["file_name"], entry.get("columns") or {}, entry.get("tags") or {}


@register_format
class ShareGPTFormat(Format):
    name = "sharegpt"
    description = "ShareGPT for LLaMA-Factory: {messages[{role, content}], images}; writes dataset_info.json"
    layout = "a .json file; dataset_info.json is written beside it"
    read_options = {"image_dir": "folder prefixed to relative image paths",
                    "dataset": "the entry to read when IN is LLaMA-Factory's dataset_info.json"}
    write_options = {"dataset_name": "entry name in dataset_info.json (default: output file stem)",
                     "box_style": "syntax for boxes (default: the source's, else qwen2vl)"}

    def read(self, path: Path, **options: Any) -> Conversion:
        columns: dict = {}
        tags: dict = {}
        if Path(path).name == "dataset_info.json" or options.get("dataset"):
            info = Path(path) if Path(path).name == "dataset_info.json" else Path(path).parent / "dataset_info.json"
            path, columns, tags = dataset_info_entry(info, options.get("dataset"))
            # image paths stay relative to the dataset_info.json folder (LLaMA-Factory's dataset_dir)
        mcol, icol, scol = columns.get("messages"), columns.get("images", "images"), columns.get("system", "system")
        rows = load_json_list(path)
        out = Conversion()
        image_dir = options.get("image_dir")
        for i, r in enumerate(rows):
            rid = r.get("id", i) if isinstance(r, dict) else i
            try:
                if not isinstance(r, dict):
                    raise RecordError("record is not a JSON object")
                if mcol:  # a dataset_info entry's column and tag names
                    turns = _parse_messages(r.get(mcol), tags)
                else:
                    turns = (_parse_messages(r["messages"]) if "messages" in r
                             else parse_from_value(r.get("conversations")))
                if isinstance(r.get(scol), str) and r[scol]:
                    turns.insert(0, Turn("system", r[scol]))
                paths, _ = as_path_list(r.get(icol))
                inserted = insert_missing_placeholders(turns, len(paths))
                turns, boxes, style = parse_boxes(turns)  # Qwen2-VL / Qwen-VL / Med-GRIT boxes -> structured
            except (RecordError, BoxSyntaxError) as e:
                out.skip(i, rid, str(e))
                continue
            meta: dict[str, Any] = {"source": "sharegpt"}
            extra = {k: v for k, v in r.items() if k not in _KNOWN + (mcol, icol, scol)}
            if extra:
                meta["extra"] = extra
            if inserted:
                meta["placeholders_inserted"] = True
            if style:
                meta["box_style"] = style
            if "system" in r:
                meta["system_column"] = True
            images = [Media(path=p if not image_dir else str(Path(image_dir) / p)) for p in paths]
            out.samples.append(Sample(id=str(rid), images=images, conversation=turns, boxes=boxes, meta=meta))
        return out

    def write(self, samples: list[Sample], path: Path, **options: Any) -> Conversion:
        out = Conversion()
        rows = []
        for s in samples:
            turns = writable_turns(s, options.get("box_style"))
            row: dict[str, Any] = {}
            if s.meta.get("system_column") and turns and turns[0].role == "system":
                row["system"] = turns[0].text
                turns = turns[1:]
            row["messages"] = [{"role": t.role, "content": t.text} for t in turns]
            if s.images:
                row["images"] = [m.path for m in s.images]
            row.update(s.meta.get("extra", {}))
            rows.append(row)
        path = Path(path)
        dump_json(rows, path)
        out.written = len(rows)
        name = options.get("dataset_name") or path.stem
        has_system = any("system" in r for r in rows)
        _write_dataset_info(path, name, has_images=any("images" in r for r in rows), has_system=has_system)
        out.notes.append(f"dataset_info.json entry {name!r} written in {path.parent}")
        return out


def _write_dataset_info(path: Path, name: str, *, has_images: bool, has_system: bool) -> None:
    info_path = path.parent / "dataset_info.json"
    info: dict[str, Any] = {}
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise MedvlUserError(f"existing file is not valid JSON ({e.msg}); fix or remove it",
                                 path=info_path) from None
    columns = {"messages": "messages"}
    if has_images:
        columns["images"] = "images"
    if has_system:
        columns["system"] = "system"
    info[name] = {
        "file_name": path.name,
        "formatting": "sharegpt",
        "columns": columns,
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                 "assistant_tag": "assistant", "system_tag": "system"},
    }
    dump_json(info, info_path)
