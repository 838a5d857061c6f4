"""Group-wise low-bit codes for the *difference* between a fine-tuned weight and its base.

A fine-tuned LM block differs from its pretrained source by little (for the 30-block SmolLM2 VLM
of docs/vlm.md, ||W - W0|| / ||W0|| is 1.7 % on average), and that difference is far easier to
quantise than the weight itself: BitDelta (Liu et al., 2024, "Your Fine-Tune May Only Be Worth One
Bit") keeps fine-tuned LLMs' quality with one sign bit per delta entry and a learned scale. Here
the delta is coded the simplest way that measured lossless on that model: **symmetric absmax
per group of ``group`` consecutive input columns** (the layout of llama.cpp's Q4_0 and of
GPTQ/AWQ group sizes), ``bits`` in {2, 4, 8}, the scale kept in bf16 and rounded before coding so
a bf16 save changes nothing. Codes are offset to unsigned and packed ``8 // bits`` per byte along
the input dimension, so the stored size is ``bits / 8 + 2 / group`` bytes per entry (4 bits,
group 64: 0.53 bytes; bf16: 2).

Measured on VQA-RAD test (451 questions; docs/vlm.md): 4 and 2 bits give the same closed
accuracy as the uncoded model, 1 bit per matrix or per row (BitDelta without its scale
distillation) loses ~2 points on each score.
"""

from __future__ import annotations

import torch

BITS = (2, 4, 8)


def encode(delta: torch.Tensor, bits: int = 4, group: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """delta [O, I] -> (codes uint8 [O, I * bits / 8], scales bf16 [O, I / group])."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    o, i = delta.shape
    if i % group or group % (8 // bits):
        raise ValueError(f"group {group} must divide the input size {i} and hold whole bytes of {bits}-bit codes")
    qmax = 2 ** (bits - 1) - 1
    x = delta.detach().float().reshape(o, i // group, group)  # [O, G, group]
    scale = (x.abs().amax(-1, keepdim=True) / qmax).to(torch.bfloat16)  # [O, G, 1]
    s = scale.float().clamp_min(torch.finfo(torch.float32).tiny)
    q = (x / s).round().clamp(-qmax - 1, qmax).to(torch.int16) + qmax + 1  # [O, G, group], in [0, 2^bits)
    per = 8 // bits
    q = q.reshape(o, i // per, per)  # [O, I / per, per]
    shifts = torch.arange(per, dtype=torch.int16) * bits  # code j of a byte sits at bits [j*bits, (j+1)*bits)
    packed = (q << shifts).sum(-1).to(torch.uint8)  # [O, I / per]
    return packed.contiguous(), scale.squeeze(-1).contiguous()


def decode(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """(codes uint8 [O, I * bits / 8], scales [O, G]) -> delta float32 [O, I]. A byte's codes are
    looked up in a 256-row table (twice as fast here as shifting and masking every byte)."""
    per = 8 // bits
    byte = torch.arange(256)
    table = torch.stack([(byte >> (j * bits)) & (2 ** bits - 1) for j in range(per)], -1).float()  # [256, per]
    q = torch.nn.functional.embedding(codes.long(), table - 2 ** (bits - 1))  # [O, I / per, per], signed
    o, g = scales.shape
    return (q.reshape(o, g, -1) * scales.float().unsqueeze(-1)).reshape(o, -1)
