"""LLaVA / LLaVA-Med instruction JSON.

Layout (LLaVA's ``llava_v1_5_mix665k.json``, LLaVA-Med's ``llava_med_instruct_*.json``)::

    [{"id": "...", "image": "path.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nQuestion"},
                        {"from": "gpt", "value": "Answer"}]}, ...]

``image`` may be a string or a list (multi-image forks). Roles: ``human``/``gpt``/``system``
(``user``/``assistant`` are accepted too). Keys other than these (LLaVA-Med's ``domain``,
``fig_label``, ...) are kept in ``meta["extra"]`` and written back.

If a record has images but no ``<image>`` in its text, the reader puts the placeholders at
the start of the first user turn (LLaVA's own preprocessing does the same) and notes it
in ``meta["placeholders_inserted"]``, so that writing back restores the original text.
Boxes (``<box/>`` markers from grounding data) are written in ``meta["box_style"]``, or the
``box_style`` option, default ``qwen2vl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medvl.data.boxes import STYLES, render_boxes
from medvl.data.formats.base import Conversion, Format, collect_rows, dump_json, load_json_list, register_format
from medvl.data.schema import IMAGE_TOKEN, Media, Sample, Turn

FROM_TO_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "model": "assistant", "system": "system"}
ROLE_TO_FROM = {"user": "human", "assistant": "gpt", "system": "system"}


class RecordError(ValueError):
    """A malformed record: the reader skips it with this message as the reason."""


def parse_from_value(convs: Any) -> list[Turn]:
    if not isinstance(convs, list) or not convs:
        raise RecordError("'conversations' missing or empty")
    turns = []
    for i, c in enumerate(convs):
        if not isinstance(c, dict) or "from" not in c or "value" not in c:
            raise RecordError(f"conversation turn {i} lacks 'from'/'value'")
        role = FROM_TO_ROLE.get(str(c["from"]).lower())
        if role is None:
            raise RecordError(f"conversation turn {i}: unknown speaker {c['from']!r}")
        if not isinstance(c["value"], str):
            raise RecordError(f"conversation turn {i}: 'value' is not a string")
        turns.append(Turn(role, c["value"]))
    return turns


def render_from_value(turns: list[Turn], names: dict[str, str] = ROLE_TO_FROM) -> list[dict]:
    """``from``/``value`` turns; ``names`` maps roles to speakers (LLaVA: human / gpt)."""
    return [{"from": names[t.role], "value": t.text} for t in turns]


def as_path_list(value: Any) -> tuple[list[str], bool]:
    """(paths, was_scalar) for an image field that may be absent, a string or a list."""
    if value is None or value == "":
        return [], False
    if isinstance(value, str):
        return [value], True
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value), False
    raise RecordError(f"image field must be a path or a list of paths, got {value!r:.60}")


def insert_missing_placeholders(turns: list[Turn], n_images: int, token: str = IMAGE_TOKEN) -> bool:
    """Put ``n_images`` placeholders before the first user turn's text when it has none."""
    if n_images == 0 or any(token in t.text for t in turns):
        return False
    for i, t in enumerate(turns):
        if t.role == "user":
            turns[i] = Turn("user", (token + "\n") * n_images + t.text)
            return True
    return False


def remove_inserted_placeholders(turns: list[Turn], n_images: int, token: str = IMAGE_TOKEN) -> list[Turn]:
    out = list(turns)
    for i, t in enumerate(out):
        if t.role == "user":
            prefix = (token + "\n") * n_images
            if t.text.startswith(prefix):
                out[i] = Turn("user", t.text[len(prefix):])
            break
    return out


def writable_turns(s: Sample, box_style: str | None, default_style: str = "qwen2vl") -> list[Turn]:
    """The sample's turns with boxes rendered and inserted placeholders removed."""
    turns = s.conversation
    if s.boxes:
        turns = render_boxes(turns, s.boxes, box_style or s.meta.get("box_style") or default_style)
    if s.meta.get("placeholders_inserted"):
        turns = remove_inserted_placeholders(turns, len(s.images))
    return turns


@register_format
class LlavaFormat(Format):
    name = "llava"
    description = "LLaVA / LLaVA-Med JSON: list of {id, image, conversations[{from, value}]}"
    layout = "a .json file (a list of records; JSON Lines accepted on read)"
    read_options = {"image_dir": "folder prefixed to relative image paths"}
    write_options = {"box_style": f"syntax for boxes: {', '.join(STYLES)} (default: the source's, else qwen2vl)"}

    def read(self, path: Path, **options: Any) -> Conversion:
        rows = load_json_list(path)
        image_dir = options.get("image_dir")
        out = Conversion()
        for i, r in enumerate(rows):
            rid = r.get("id", i) if isinstance(r, dict) else i
            try:
                if not isinstance(r, dict):
                    raise RecordError("record is not a JSON object")
                paths, scalar = as_path_list(r.get("image"))
                turns = parse_from_value(r.get("conversations"))
                inserted = insert_missing_placeholders(turns, len(paths))
            except RecordError as e:
                out.skip(i, rid, str(e))
                continue
            meta: dict[str, Any] = {"source": "llava"}
            extra = {k: v for k, v in r.items() if k not in ("id", "image", "conversations")}
            if extra:
                meta["extra"] = extra
            if inserted:
                meta["placeholders_inserted"] = True
            if len(paths) > 1 or (paths and not scalar):
                meta["image_list"] = True
            out.samples.append(Sample(
                id=str(rid), images=[Media(path=_join(image_dir, p)) for p in paths],
                conversation=turns, meta=meta))
        return out

    def write(self, samples: list[Sample], path: Path, **options: Any) -> Conversion:
        def row(s: Sample) -> dict | None:
            if any(m.kind == "volume" for m in s.images):
                return None
            turns = writable_turns(s, options.get("box_style"))
            row: dict[str, Any] = {"id": s.id}
            paths = [m.path for m in s.images]
            if len(paths) == 1 and not s.meta.get("image_list"):
                row["image"] = paths[0]
            elif paths:
                row["image"] = paths
            row["conversations"] = render_from_value(turns)
            row.update(s.meta.get("extra", {}))
            return row
        rows, out = collect_rows(samples, row, "has a 3D volume (LLaVA JSON holds 2D images; use medm-vl)")
        dump_json(rows, path)
        return out


def _join(root: str | None, p: str) -> str:
    return p if not root or Path(p).is_absolute() else str(Path(root) / p)
