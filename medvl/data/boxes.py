"""Boxes written inside conversation text: parse them out, write them back.

Grounding datasets write boxes in the text. Three syntaxes are in use:

* ``grit``    — ``<ref>phrase</ref><box_start>(x1,y1),(x2,y2)<box_end>`` (Med-GRIT / BiRD
  as the medvl issue tracker describes it);
* ``qwenvl``  — ``<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>`` (Qwen-VL, which BiRD
  fine-tunes);
* ``qwen2vl`` — ``<|object_ref_start|>phrase<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``
  (Qwen2-VL's special tokens, used by ClinKD).

All three put integer corners in [0, 1000) relative to the image (Qwen-VL convention),
so parsed boxes get ``space="norm1000"`` unless the caller says otherwise. In canonical
text each box becomes the marker ``<box/>`` and referring phrases become
``<ref>phrase</ref>``; :func:`render_boxes` turns them back into any of the syntaxes.
"""

from __future__ import annotations

import re

from medvl.data.imageio import MedicalImage, load_medical
from medvl.data.schema import BOX_TOKEN, Box, Turn

STYLES: dict[str, tuple[str, str, str, str]] = {
    # style: (box open, box close, ref open, ref close)
    "grit": ("<box_start>", "<box_end>", "<ref>", "</ref>"),
    "qwenvl": ("<box>", "</box>", "<ref>", "</ref>"),
    "qwen2vl": ("<|box_start|>", "<|box_end|>", "<|object_ref_start|>", "<|object_ref_end|>"),
}

_BOX_RE = re.compile(
    r"<\|box_start\|>(?P<q2>.*?)<\|box_end\|>"
    r"|<box_start>(?P<grit>.*?)<box_end>"
    r"|<box>(?P<qv>.*?)</box>",
    re.S,
)
_NUM_RE = re.compile(r"-?\d+(?:\.\d+)?")
_REF_RE = re.compile(r"<ref>(.*?)</ref>", re.S)


class BoxSyntaxError(ValueError):
    """A box marker whose body is not four numbers."""


def _style_of(m: re.Match) -> str:
    return "qwen2vl" if m.group("q2") is not None else "grit" if m.group("grit") is not None else "qwenvl"


def parse_boxes(turns: list[Turn], *, space: str = "norm1000", image: int = 0
                ) -> tuple[list[Turn], list[Box], str | None]:
    """Replace every box in the text by ``<box/>``; return new turns, boxes, and the style seen.

    A box's phrase is the last ``<ref>`` before it in the same turn (so several boxes after
    one phrase share it, as in Qwen-VL's multi-box answers). Raises BoxSyntaxError for a
    box body without exactly four numbers.
    """
    out_turns: list[Turn] = []
    boxes: list[Box] = []
    style: str | None = None
    for ti, t in enumerate(turns):
        text = t.text.replace("<|object_ref_start|>", "<ref>").replace("<|object_ref_end|>", "</ref>")
        pieces, pos = [], 0
        for m in _BOX_RE.finditer(text):
            body = m.group("q2") or m.group("grit") or m.group("qv") or ""
            nums = [float(x) for x in _NUM_RE.findall(body)]
            if len(nums) != 4:
                raise BoxSyntaxError(f"turn {ti}: box {m.group(0)!r} does not hold 4 numbers")
            refs = list(_REF_RE.finditer(text, 0, m.start()))
            phrase = refs[-1].group(1).strip() if refs else None
            style = style or _style_of(m)
            boxes.append(Box(bbox=[int(v) if v.is_integer() else v for v in nums], space=space,
                             image=image, turn=ti, phrase=phrase))
            pieces.append(text[pos:m.start()])
            pieces.append(BOX_TOKEN)
            pos = m.end()
        pieces.append(text[pos:])
        out_turns.append(Turn(t.role, "".join(pieces)))
    return out_turns, boxes, style


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def render_boxes(turns: list[Turn], boxes: list[Box], style: str = "grit") -> list[Turn]:
    """Inverse of :func:`parse_boxes`: write ``<box/>`` markers back in ``style`` syntax."""
    if style not in STYLES:
        raise ValueError(f"unknown box style {style!r}; known: {', '.join(STYLES)}")
    bo, bc, ro, rc = STYLES[style]
    it = iter(boxes)
    out = []
    for t in turns:
        text = t.text
        if BOX_TOKEN in text:
            parts = text.split(BOX_TOKEN)
            rebuilt = [parts[0]]
            for p in parts[1:]:
                b = next(it)
                x1, y1, x2, y2 = b.bbox
                rebuilt.append(f"{bo}({_fmt(x1)},{_fmt(y1)}),({_fmt(x2)},{_fmt(y2)}){bc}")
                rebuilt.append(p)
            text = "".join(rebuilt)
        if style == "qwen2vl":
            text = text.replace("<ref>", ro).replace("</ref>", rc)
        out.append(Turn(t.role, text))
    return out


#: the box syntax a model is trained and prompted in, by model family. Composed medvl models and
#: native LLaVA use Qwen-VL's text form (``<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>``, corners in
#: [0, 1000)): plain text any tokenizer reads, parsed back by :func:`parse_boxes` and by
#: ``medvl eval grounding``; Qwen2-VL-family models use their own special tokens.
MODEL_BOX_STYLE = {"medvl_vlm": "qwenvl", "llava": "qwenvl", "qwen2_vl": "qwen2vl", "qwen2_5_vl": "qwen2vl"}


def _image_size(sample, index: int) -> tuple[int, int]:
    """(width, height) of the sample's image ``index`` (for pixel-space boxes)."""
    m = sample.images[index]
    img = m.array if isinstance(m.array, MedicalImage) else load_medical(m.path)
    a = img.array  # [H, W], [H, W, 3] or [D, H, W]
    h, w = a.shape[:2] if (a.ndim == 3 and img.kind == "image") else a.shape[-2:]
    return int(w), int(h)


def to_norm1000(box: Box, sample=None) -> Box:
    """The box in Qwen-VL's integer [0, 1000) convention; a pixel-space box needs its sample's image."""
    if box.space == "norm1000":
        return box
    if box.space == "norm1":
        scale = (1000.0, 1000.0, 1000.0, 1000.0)
    elif box.space == "pixel":
        if sample is None or box.image >= len(sample.images):
            raise ValueError(f"a pixel-space box needs its image (image {box.image})")
        w, h = _image_size(sample, box.image)
        scale = (1000.0 / w, 1000.0 / h, 1000.0 / w, 1000.0 / h)
    else:
        raise ValueError(f"unknown box space {box.space!r}")
    bbox = [min(999, max(0, int(round(v * s)))) for v, s in zip(box.bbox, scale)]
    return Box(bbox=bbox, space="norm1000", image=box.image, turn=box.turn, phrase=box.phrase)


def model_turns(sample, style: str) -> list[Turn]:
    """The sample's conversation as a model reads and writes it: each ``<box/>`` marker replaced by
    its box's corners in ``style`` syntax (in [0, 1000)), referring phrases in that style's tags.
    Training on the markers alone would teach a model box tags with no coordinates."""
    if not sample.boxes and "<ref>" not in "".join(t.text for t in sample.conversation):
        return list(sample.conversation)
    n_markers = sum(t.text.count(BOX_TOKEN) for t in sample.conversation)
    if n_markers != len(sample.boxes):
        raise ValueError(f"{n_markers} {BOX_TOKEN} marker(s) but {len(sample.boxes)} box(es)")
    return render_boxes(sample.conversation, [to_norm1000(b, sample) for b in sample.boxes], style)
