"""The vlm recipe's native half: a Hugging Face VLM (LLaVA, Qwen2-VL, Qwen2.5-VL ...) trained
through the same engine loop as a composed one.

The processor encodes each sample (it expands image tokens — Qwen2-VL's count depends on
the image's grid) with the loss on the answer only (:class:`medvl.models.native.NativeVLM`);
the step is the model's own forward with those labels; per-module freezing goes by
parameter names (:func:`medvl.train.policy.apply_native`). FSDP's shard units are the
classes the model lists in ``_no_split_modules`` (its decoder and vision blocks). Export
writes the model with its processor, loadable by ``AutoModelForImageTextToText``.
LoRA goes on the Linear layers of ``lora`` modules matched by ``lora.target_modules``
(:func:`medvl.train.policy.apply_native`); the export merges the adapters (``model/``) and,
with ``lora.export: adapter``, also writes the peft adapter (``adapter/``). ClinKD's logit
distillation takes a native teacher over the same tokenizer (live, or its cached top-k
logits), which encodes each sample with its own processor. Not here yet: packing and
init_from for native models (each refused with a message).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medvl.errors import MedvlUserError
from medvl.models.native import NativeVLM, answer_logits, module_of
from medvl.train.attention import for_training, set_attention
from medvl.train.config import save_resolved
from medvl.train.engine import Engine, StepResult
from medvl.train.engine.memory import transformer_activations
from medvl.train.policy import apply_native


class _NativeStep(nn.Module):
    """One step's loss: the answer-position logits (:func:`medvl.models.native.answer_logits`, the LM
    head only where a label is set) and cross-entropy — the model's own loss value — or, with
    ``kd`` and the teacher's rows, ClinKD's (alpha * KD + CE) / (1 + alpha)."""

    def __init__(self, model: nn.Module, kd=None):
        super().__init__()
        self.model = model
        self.kd = kd
        self.parts: dict = {}

    def forward(self, batch: dict[str, torch.Tensor], teacher=None) -> torch.Tensor:
        logits, target = answer_logits(self.model, batch)  # [N, V], [N]
        if self.kd is None or teacher is None:
            return nn.functional.cross_entropy(logits.float(), target)
        out = self.kd(logits, teacher, target)
        self.parts = {"kd": float(out["kd"]), "ce": float(out["ce"])}
        return out["loss"]


def prepare_native(cfg, samples, policy: dict, engine: Engine, vlm=None) -> dict[str, Any]:

    if engine.sharded and "lora" in policy.values():
        raise MedvlUserError("LoRA with fsdp is not supported yet; use distributed: ddp")
    for key, name in (("packing", "packing"), ("init_from", "init_from")):
        if getattr(cfg, key):
            raise MedvlUserError(f"{name} is not supported for native VLMs yet; compose the model instead")
    if vlm is None:
        vlm = NativeVLM.from_pretrained(cfg.native, max_length=cfg.max_length)
    if cfg.position_gap:
        vlm.set_position_gap(cfg.position_gap)
    if cfg.gradient_checkpointing:
        vlm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    built_attention = for_training(vlm.model, cfg.attn_implementation, engine.device.type, cfg.max_length,
                                     auto=False)
    vlm.model, trainable = apply_native(vlm.model, policy, cfg.lora)
    lora = "lora" in policy.values()
    encoded, ids, dropped = [], [], {}
    for smp in samples:
        e = vlm.encode(smp)
        if e is None:
            dropped["longer than max_length"] = dropped.get("longer than max_length", 0) + 1
        else:
            encoded.append(e)
            ids.append(smp.id)
    teacher, kd = None, None
    if cfg.distill:  # ClinKD: a native teacher (or its cached top-k logits) over the same tokenizer
        from medvl.distill.teacher import make_teacher
        teacher, kd = make_teacher(cfg.distill, cfg.max_length, cfg.precision)
        if teacher.tokenizer.get_vocab() != vlm.tok.get_vocab():
            raise MedvlUserError("distill: the teacher's tokenizer differs from the student's; logit distillation "
                                 "needs one tokenizer (e.g. Qwen2-VL-7B -> Qwen2-VL-2B), or use pseudo-labels")
        lost = teacher.prepare([smp for smp in samples if smp.id in set(ids)])
        if lost:
            keep = [k for k, i in enumerate(ids) if i not in lost]
            encoded, ids = [encoded[k] for k in keep], [ids[k] for k in keep]
            dropped["teacher cannot encode (too long for it / not in the cache)"] = len(lost)
    if not encoded:
        raise MedvlUserError(f"no training sample fits max_length={cfg.max_length} for this native model")
    units = set(getattr(vlm.model, "_no_split_modules", None) or [])

    def plan(epoch: int) -> list:
        return engine.global_batches(torch.randperm(len(encoded), generator=engine.plan_gen).tolist())

    step_module = _NativeStep(vlm.model, kd)

    def step(batch: list) -> StepResult:
        enc = vlm.collate([encoded[i] for i in batch])
        trows = teacher.rows([ids[i] for i in batch]) if teacher is not None else None  # [N, V] or TopK
        loss = engine.module(engine.to_device(enc), engine.to_device(trows))
        return StepResult(loss, len(batch), int(enc["attention_mask"].sum()), dict(step_module.parts),
                          int((enc["labels"][:, 1:] != -100).sum()))

    def export():
        if engine.sharded:
            full = engine.full_state_dict()
            if engine.main:
                vlm.model = type(vlm.model)(vlm.model.config)
                vlm.model.load_state_dict({k.removeprefix("model."): v for k, v in full.items()}, strict=True)
        vlm.model.cpu().eval()
        if lora and engine.main and cfg.lora.get("export", "merged") == "adapter":
            vlm.model.save_pretrained(str(engine.out / "adapter"))  # PeftModel.from_pretrained(base, adapter/)
        if lora:  # the exported model is a plain one: adapters merged into the weights
            vlm.model = vlm.model.merge_and_unload()
        set_attention(vlm.model, built_attention)  # the kernel chosen for training is not the model's
        if engine.main:
            vlm.save(engine.out / "model")
            save_resolved(cfg, engine.out / "model" / "recipe.yaml", "vlm")
        return vlm

    tc = vlm.model.config.get_text_config() if hasattr(vlm.model.config, "get_text_config") else vlm.model.config
    act = transformer_activations(cfg.batch_size * cfg.max_length, tc.hidden_size, tc.num_hidden_layers,
                                  cfg.gradient_checkpointing)
    n_llm = sum(p.numel() for n, p in vlm.model.named_parameters()  # MFU: 6 x non-embedding LM parameters
                if module_of(n) == "llm" and "embed" not in n and "lm_head" not in n)
    return {"module": step_module, "activation_bytes": act, "flops_per_token": 6.0 * n_llm, "steps": engine.steps_per_epoch(len(encoded)), "plan": plan,
            "step": step, "export": export, "model": vlm, "tokenizer": vlm.tok,
            "collator": None, "dropped": dropped,
            "trainable": trainable,
            "shard_units": [m for m in vlm.model.modules() if type(m).__name__ in units]}
