"""Inference precision: which dtype a loaded model computes in, and the memory layout that
makes its convolutions fast.

* ``fp32`` — what the model cards report; ``bf16`` — weights, activations and KV cache in
  bfloat16; ``auto`` — bf16 where the device computes it natively (a CUDA GPU with bf16, or a
  CPU with AMX or AVX512-BF16 units), fp32 elsewhere. On such a CPU oneDNN's bf16 kernels run a
  576 x 1536 projection of 496 rows 6x faster than fp32 (measured here, one thread), which is
  what lets a batch of requests cost little more than one; on a CPU without them bf16 is
  emulated and slower than fp32, hence ``auto`` rather than bf16 everywhere (the
  ``dtype="auto"`` idea of vLLM and transformers, decided by the hardware instead of the
  checkpoint). Answers can differ from fp32 on a few percent of questions (docs/serve.md).
* Convolution weights are put in ``channels_last`` and pixels are sent that way: oneDNN's
  convolutions want NHWC, and without it every call reorders. The shipped resnet10t tower at
  128 px, batch 16, one thread: fp32 17.1 -> 14.0 ms per image, bf16 11.8 -> 4.8.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medvl.errors import MedvlUserError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16", "auto")


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """``fp32`` / ``bf16`` as given; ``auto`` -> bf16 where ``device`` computes bf16 natively."""
    if precision not in PRECISIONS:
        raise MedvlUserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    import torch
    if str(device).startswith("cuda"):
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    cpu = getattr(torch, "cpu", None)
    native = any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return "bf16" if native else "fp32"


def for_inference(module: torch.nn.Module, precision: str) -> str:
    """Cast ``module`` in place to the resolved precision, conv weights channels-last; returns
    the precision it now computes in ("fp32" or "bf16")."""
    import torch
    device = next(module.parameters()).device
    resolved = resolve_precision(precision, str(device))
    if resolved == "bf16":
        module.to(torch.bfloat16)
    for m in module.modules():  # 2D convolutions only (a Conv3d patch embedding keeps its layout)
        if isinstance(m, torch.nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return resolved


def as_pixels(px: torch.Tensor, like: torch.nn.Module) -> torch.Tensor:
    """Pixels on ``like``'s device and dtype, channels-last when they are a batch of 2D images."""
    import torch
    p = next(like.parameters())
    px = px.to(p.device, p.dtype)
    return px.contiguous(memory_format=torch.channels_last) if px.dim() == 4 else px
