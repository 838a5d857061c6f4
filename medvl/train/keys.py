"""``medvl train --keys vlm|clip``: every key a recipe takes, with its type, default and what it
does, read from the typed configs themselves (the dataclass fields and the docstring under each,
or a ``#:`` comment above it), so the reference cannot drift from the code. Nested sections list
their own keys (data sources, vision, lora, eval)."""

from __future__ import annotations

import ast
import dataclasses as dc
import inspect
import textwrap
from medvl.errors import MedvlUserError


def field_docs(cls) -> dict[str, str]:
    """Field name -> its documentation, over the class and its dataclass bases (a subclass wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dc.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        lines = src.splitlines()
        body = ast.parse(src).body[0].body
        for k, node in enumerate(body):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            nxt = body[k + 1] if k + 1 < len(body) else None
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                    and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
                continue
            above, i = [], node.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#:"):
                above.insert(0, lines[i].strip()[2:].strip())
                i -= 1
            if above:
                docs[node.target.id] = " ".join(above)
    return docs


def _default(f: dc.Field):
    if f.default is not dc.MISSING:
        return f.default
    if f.default_factory is not dc.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return "(required)"


def describe(cls, title: str) -> list[str]:
    docs = field_docs(cls)
    out = [title]
    for f in dc.fields(cls):
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out.append(f"  {f.name}: {t} = {_default(f)!r}")
        if docs.get(f.name):
            out += ["      " + line for line in textwrap.wrap(docs[f.name], 96)]
    return out


def _section(title: str, keys: dict[str, str] | tuple) -> list[str]:
    out = [title]
    for k in keys:
        doc = keys[k] if isinstance(keys, dict) else ""
        out.append(f"  {k}" + (f": {doc}" if doc else ""))
    return out


def recipe_keys(kind: str) -> str:
    """The reference of one recipe kind (``vlm`` or ``clip``) as text."""
    if kind in ("vlm", "vlm-distill"):
        from medvl.models.vision_towers import VisionConfig
        from medvl.train.validation import KEYS as EVAL_KEYS
        from medvl.train.vlm_config import DATA_KEYS, LORA_KEYS, VLMTrainConfig
        lines = describe(VLMTrainConfig, "recipe: vlm — top-level keys (key: type = default)")
        lines += [""] + _section("data: (and each of data.sources)", DATA_KEYS)
        lines += [""] + describe(VisionConfig, "vision:")
        lines += [""] + _section("lora:", LORA_KEYS)
        lines += [""] + _section("eval:", EVAL_KEYS)
        lines += ["", "llm: {source: NAME, num_hidden_layers: N} for a pretrained LM, or a transformers config "
                      "(model_type and its keys) for one trained from scratch"]
        return "\n".join(lines)
    if kind == "clip":
        from medvl.data.pairs import DataConfig
        from medvl.train.clip import ClipTrainConfig
        return "\n".join(describe(ClipTrainConfig, "recipe: clip — top-level keys (key: type = default)") + [""]
                         + describe(DataConfig, "data:"))
    raise MedvlUserError(f"--keys: no recipe kind {kind!r} (vlm, clip)")
