"""The vlm recipe's native half: a Hugging Face VLM (LLaVA, Qwen2-VL, Qwen2.5-VL ...) trained
through the same engine loop as a composed one.

The processor encodes each sample (it expands image tokens — Qwen2-VL's count depends on
the image's grid) with the loss on the answer only (:class:`medvl.models.native.NativeVLM`);
the step is the model's own forward with those labels; per-module freezing goes by
parameter names (:func:`medvl.train.policy.apply_native`). FSDP's shard units are the
classes the model lists in ``_no_split_modules`` (its decoder and vision blocks). Export
writes the model with its processor, loadable by ``AutoModelForImageTextToText``.
Not here yet: LoRA, distillation, packing and init_from for native models (each refused
with a message).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medvl.errors import MedvlUserError
from medvl.train.engine import Engine, StepResult


class _NativeStep(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.parts: dict = {}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**batch).loss  # mean over answer tokens (labels -100 elsewhere)


def prepare_native(cfg, samples, policy: dict, engine: Engine, vlm=None) -> dict[str, Any]:
    from medvl.models.native import NativeVLM
    from medvl.train.policy import apply_native

    for key, name in (("distill", "distillation"), ("packing", "packing"), ("init_from", "init_from")):
        if getattr(cfg, key):
            raise MedvlUserError(f"{name} is not supported for native VLMs yet; compose the model instead")
    if vlm is None:
        vlm = NativeVLM.from_pretrained(cfg.native, max_length=cfg.max_length)
    if cfg.position_gap:
        vlm.set_position_gap(cfg.position_gap)
    trainable = apply_native(vlm.model, policy)
    encoded, dropped = [], 0
    for s in samples:
        e = vlm.encode(s)
        if e is None:
            dropped += 1
        else:
            encoded.append(e)
    if not encoded:
        raise MedvlUserError(f"no training sample fits max_length={cfg.max_length} for this native model")
    units = set(getattr(vlm.model, "_no_split_modules", None) or [])

    def plan(epoch: int) -> list:
        return engine.global_batches(torch.randperm(len(encoded), generator=engine.plan_gen).tolist())

    def step(batch: list) -> StepResult:
        enc = vlm.collate([encoded[i] for i in batch])
        loss = engine.module(engine.to_device(enc))
        return StepResult(loss, len(batch), int(enc["attention_mask"].sum()))

    def export():
        from medvl.train.config import save_resolved
        if engine.sharded:
            full = engine.full_state_dict()
            if engine.main:
                vlm.model = type(vlm.model)(vlm.model.config)
                vlm.model.load_state_dict({k.removeprefix("model."): v for k, v in full.items()}, strict=True)
        vlm.model.cpu().eval()
        if engine.main:
            vlm.save(engine.out / "model")
            save_resolved(cfg, engine.out / "model" / "recipe.yaml", "vlm")
        return vlm

    return {"module": _NativeStep(vlm.model), "steps": engine.steps_per_epoch(len(encoded)), "plan": plan,
            "step": step, "flops_per_token": None, "export": export, "model": vlm, "tokenizer": vlm.tok,
            "collator": None, "dropped": {"longer than max_length": dropped} if dropped else {},
            "trainable": trainable,
            "shard_units": [m for m in vlm.model.modules() if type(m).__name__ in units]}
