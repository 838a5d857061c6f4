"""Memory guidance: what a run will need per process, printed before it starts, and what to
change when a GPU runs out.

The estimate counts, per process: parameters (fp32 master weights — bf16 runs use autocast,
so weights stay fp32), gradients (fp32, trainable parameters only), AdamW's two moments
(fp32, trainable only), divided across ranks as the engine shards them (FSDP ``full`` /
ZeRO-3: all three; ``grad_op`` / ZeRO-2: gradients and optimizer state; DDP: nothing), plus
activations when the recipe gives a size: per transformer layer about 34 x tokens x hidden
bytes in 16-bit training without recomputation (Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models", the ``sbh * 34`` term; attention
scores are not stored with SDPA / flash kernels), about 2 x tokens x hidden per layer with
gradient checkpointing. It is an estimate to choose knobs by, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GB = 1024 ** 3


@dataclass
class MemoryEstimate:
    params: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations

    def line(self) -> str:
        return (f"memory per process (estimate): parameters {self.params / GB:.2f} GB, gradients {self.grads / GB:.2f} GB, "
                f"optimizer {self.optimizer / GB:.2f} GB, activations {self.activations / GB:.2f} GB "
                f"= {self.total / GB:.2f} GB")


def estimate(module: torch.nn.Module, *, world: int, mode: str, sharding: str, activations: float = 0.0
             ) -> MemoryEstimate:
    n_all = sum(p.numel() for p in module.parameters())
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    p, g, o = 4.0 * n_all, 4.0 * n_train, 8.0 * n_train
    if world > 1 and mode == "fsdp":
        g, o = g / world, o / world
        if sharding == "full":
            p = p / world
    return MemoryEstimate(p, g, o, activations)


def transformer_activations(tokens: int, hidden: int, layers: int, checkpointing: bool = False) -> float:
    """Bytes of stored activations for ``tokens`` tokens (batch x length) through ``layers`` layers."""
    return (2.0 if checkpointing else 34.0) * tokens * hidden * layers


def device_memory(device: torch.device) -> float | None:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return None


def oom_advice(cfg, est: MemoryEstimate | None, step: int) -> str:
    tips = [f"lower batch_size (now {cfg.batch_size}) and raise grad_accum (now {cfg.grad_accum}) to keep the "
            "global batch"]
    if not getattr(cfg, "gradient_checkpointing", True):
        tips.append("gradient_checkpointing=true (recompute activations in backward)")
    if cfg.distributed != "fsdp" or cfg.fsdp_sharding != "full":
        tips.append("distributed=fsdp fsdp_sharding=full under torchrun (ZeRO-3: parameters, gradients and optimizer "
                    "state sharded across GPUs)")
    tips.append("freeze.llm=lora (adapters only: no gradients or optimizer state for the LM's weights)")
    if cfg.precision != "bf16":
        tips.append("precision=bf16")
    where = f" (the estimate was {est.total / GB:.1f} GB per process)" if est is not None else ""
    return f"out of GPU memory at step {step}{where}; try: " + "; ".join(tips)
