"""Which attention kernel an LM trains with: ``auto`` | ``eager`` | ``sdpa``.

Design choice, measured (2026-12-05, 2 cores with AMX, bf16 autocast, two SmolLM2-shaped blocks —
576 wide, 9 heads, 3 KV heads — forward + backward with a padding mask, 2,048 tokens per step,
``python benchmarks/bench_attention.py``): PyTorch's CPU flash-attention backward (what ``sdpa``
runs) costs far more than the plain matmul + softmax of ``eager`` at the short lengths of VQA
fine-tuning, the same around 128-256 tokens, and less at long ones:

=======  =====  ========  =======
length   batch  eager ms  sdpa ms
=======  =====  ========  =======
48       42     179       377
64       32     223       344
96       21     233       325
128      16     232       238
256      8      287       289
512      4      456       242
1024     2      642       367
=======  =====  ========  =======

(A second run put sdpa / eager at 1.38, 1.33, 1.21, 1.03, 1.01, 0.69 for 48 ... 512.)
So ``auto`` trains with ``eager`` on the CPU when the recipe's ``max_length`` is at most 256 and
with ``sdpa`` otherwise; on CUDA it keeps the model's own choice (fused kernels win there). The
kernel is switched for training only (a native VLM keeps its own under ``auto``: switching it would
switch its vision encoder too, whose sequence is the image's patches, not ``max_length`` — not measured): the exported model keeps the implementation it was built
with, and generation is unaffected — there ``sdpa`` is the faster one (the serving decoder in bf16:
48.9 against 71.6 ms per answer one at a time, 9.4 against 11.5 in continuous batches).
"""

from __future__ import annotations

from medvl.errors import MedvlUserError

ATTENTION = ("auto", "eager", "sdpa")
EAGER_UP_TO = 256  # max_length at or below which eager wins on the CPU (crossover between 128 and 512)


def resolve_attention(name: str, device_type: str, max_length: int) -> str | None:
    """The kernel to train with, or None to leave the model's own."""
    if name not in ATTENTION:
        raise MedvlUserError(f"attn_implementation must be one of {', '.join(ATTENTION)}, got {name!r}")
    if name != "auto":
        return name
    if device_type == "cpu" and max_length <= EAGER_UP_TO:
        return "eager"
    return None


def set_attention(lm, impl: str | None) -> str | None:
    """Switch a Hugging Face model's attention kernel; returns the one it had (to restore at export)."""
    if impl is None or not hasattr(lm, "set_attn_implementation"):
        return None
    before = lm.config._attn_implementation
    if impl != before:
        lm.set_attn_implementation(impl)
    return before


def for_training(model, name: str, device_type: str, max_length: int, *, auto: bool = True) -> str | None:
    """Switch ``model`` to the kernel ``name`` resolves to for this run; returns the one to restore at export.
    ``auto=False`` (native VLMs) treats ``auto`` as the model's own."""
    if name == "auto" and not auto:
        return None
    return set_attention(model, resolve_attention(name, device_type, max_length))
