"""The ``clip`` recipe: contrastive image-text training, optionally distilled from teachers.

One recipe for every dual-encoder paradigm (torchtune's one-recipe-per-paradigm rule):
CLIP or SigLIP loss; a locked text tower whose pooled outputs are cached once (LiT), so a
pretrained text encoder teaches a new vision tower at the cost of the vision tower alone;
MMKD-CLIP distillation when ``distill.enabled`` (teacher features from the samples'
``teacher_features``). Image-text pairs come from :mod:`medvl.data.pairs` (captions, or
texts built from VQA-Med category answers); augmentation is
:func:`medvl.data.transforms.augment_batch` (mild random resized crop and rotation, no colour
jitter, flips off by default because captions name sides).

The recipe builds the pairs and the model and defines one step's loss; distribution,
precision, checkpoints with exact resume, logging and the loss plot are the engine's
(:mod:`medvl.train.engine`). Throughput is logged as pairs/s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medvl.data.pairs import DataConfig, Pair, build_pairs, check_teacher_features, decode_images, teacher_batch
from medvl.data.transforms import augment_batch
from medvl.errors import MedvlUserError
from medvl.losses.contrastive import LOSSES
from medvl.models.clip import MedCLIP
from medvl.train.config import TrainerConfig, save_resolved
from medvl.train.engine import Engine, StepResult
from medvl.train.engine.dist import unwrap

__all__ = ["AugmentConfig", "ClipTrainConfig", "DataConfig", "DistillConfig", "Pair", "train_clip"]


@dataclass
class AugmentConfig:
    crop_scale: list = field(default_factory=lambda: [0.75, 1.0])
    rotate_degrees: float = 10.0
    hflip: float = 0.0


@dataclass
class DistillConfig:
    enabled: bool = False
    lam: float = 50.0
    teacher_choice: str = "random"
    cross_scale: str = "fixed"


@dataclass
class ClipTrainConfig(TrainerConfig):
    """The clip recipe: the engine's keys (TrainerConfig) plus the model, data and loss."""

    model: str = "medclip-r10t-minilm"
    """a CLIP config name (medvl/models/clip_configs) or a checkpoint folder to start from"""
    data: DataConfig = field(default_factory=DataConfig)
    """image-text pairs (keys below)"""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """batched image augmentation: crop_scale, rotate_degrees, hflip, ..."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """MMKD-CLIP feature distillation from teacher CLIPs (teacher features cached per sample)"""
    loss: str = "clip"
    """clip (InfoNCE, shared positives for identical texts) or siglip (pairwise sigmoid)"""
    epochs: int = 20
    batch_size: int = 64
    weight_decay: float = 0.1
    output_dir: str = "runs/clip"
    log_every: int = 10
    export_dtype: str = "float32"
    """weights of the exported model: float32 or bfloat16"""


class _ClipStep(nn.Module):
    """One step's loss as a module (what DDP / FSDP wrap): encode the augmented images, take the
    texts' embeddings (from the locked tower's cache when there is one), and the contrastive or
    MMKD-CLIP loss. Holds every trained parameter: the CLIP, SigLIP's bias, MMKD's projections."""

    def __init__(self, model, loss: str, loss_fn, distiller=None, pooled_cache=None):
        super().__init__()
        self.model = model
        self.loss_name, self.loss_fn = loss, loss_fn
        self.distiller = distiller
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if loss == "siglip" else None
        self.pooled_cache = pooled_cache  # [T, hidden] or None; a constant, not state
        self.parts: dict[str, float] = {}

    def forward(self, x: torch.Tensor, texts: list, teachers=None, ids: torch.Tensor | None = None) -> torch.Tensor:
        m = self.model
        img = nn.functional.normalize(m.model.encode_image(x), dim=-1).float()  # [B, D]
        if self.pooled_cache is not None:  # texts are indices into the cache
            txt = m.text_from_pooled(self.pooled_cache[texts].to(x.device)).float()
        else:
            txt = m.encode_text(texts).float()
        self.parts = {"logit_scale": float(m.logit_scale.detach().exp())}
        if self.distiller is not None:
            out = self.distiller(img, txt, m.logit_scale, *teachers)
            self.parts.update({k: float(v) for k, v in out.items() if k != "loss"})
            return out["loss"]
        if self.loss_name == "siglip":
            return self.loss_fn(img, txt, m.logit_scale, self.logit_bias, ids=ids)
        return self.loss_fn(img, txt, m.logit_scale, ids=ids)


def _param_groups(cfg: ClipTrainConfig):
    """Weight decay on the CLIP's matrices only; biases, norms, the scale, SigLIP's bias and
    MMKD's projections without (open_clip's grouping)."""

    def groups(module: nn.Module) -> list:
        named = [(n, p) for n, p in unwrap(module).named_parameters() if p.requires_grad]
        decay = [p for n, p in named if n.startswith("model.") and p.ndim >= 2]
        rest = [p for n, p in named if not (n.startswith("model.") and p.ndim >= 2)]
        return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return groups


def train_clip(cfg: ClipTrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a CLIP recipe; returns a summary (final loss, pairs/s, paths)."""
    from tqdm.auto import tqdm


    if cfg.loss not in LOSSES:
        raise MedvlUserError(f"loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
    engine = Engine(cfg, name="clip", progress=progress)
    out = engine.out
    if engine.main:
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out / "config.yaml", "clip")

    def build() -> MedCLIP:
        return MedCLIP.from_pretrained(cfg.model) if Path(cfg.model).is_dir() else MedCLIP.from_config(cfg.model)

    model = build().train()
    size = model.config.image_size
    pairs, skipped = build_pairs(cfg.data)
    dims: dict[str, int] = {}
    if cfg.distill.enabled:
        pairs, dims, t_skipped = check_teacher_features(pairs)
        skipped.update(t_skipped)
        if not pairs:
            raise MedvlUserError("distill.enabled but no sample has usable teacher features: " +
                                 ", ".join(f"{v} {k}" for k, v in t_skipped.items()))
    images, keep, dec_skipped = decode_images(pairs, cfg.data.cache_size or int(size * 1.125), engine.progress)
    pairs = [pairs[i] for i in keep]  # images: [N, 3, S', S'] uint8
    skipped.update(dec_skipped)
    if engine.main:
        print(f"clip: {len(pairs):,} image-text pairs; left out: " +
              (", ".join(f"{v:,} {k}" for k, v in skipped.items()) or "nothing"))

    all_texts = sorted({t for p in pairs for t in p.texts})  # the locked tower's outputs, once per text
    text_index = {t: i for i, t in enumerate(all_texts)}
    pooled_cache = None
    if model.config.lock_text:
        with torch.no_grad():
            pooled_cache = torch.cat([model.text_pooled(all_texts[i:i + 256]).float() for i in
                                      tqdm(range(0, len(all_texts), 256), desc="caching text tower",
                                           disable=not engine.progress)])  # [T, hidden]
    distiller = None
    if cfg.distill.enabled:
        from medvl.losses.distill import MMKDLoss
        if not dims:
            raise MedvlUserError("distill.enabled but no sample has teacher features (teacher_features is empty)")
        distiller = MMKDLoss(model.config.embed_dim, dims, lam=cfg.distill.lam,
                             teacher_choice=cfg.distill.teacher_choice, cross_scale=cfg.distill.cross_scale,
                             seed=cfg.seed)
    step_module = _ClipStep(model, cfg.loss, LOSSES[cfg.loss](), distiller, pooled_cache)
    engine.setup(step_module, param_groups=_param_groups(cfg))

    steps = max(1, len(pairs) // (cfg.batch_size * engine.world))  # full global batches only
    G = cfg.batch_size * engine.world
    mean = torch.tensor(model.config.image_mean)[None, :, None, None]
    std = torch.tensor(model.config.image_std)[None, :, None, None]

    def plan(epoch: int) -> list:
        order = torch.randperm(len(pairs), generator=engine.plan_gen).tolist()
        return [order[b * G:(b + 1) * G] for b in range(steps)]

    def step(idx: list) -> StepResult:
        rg = engine.rank_gen  # per-rank randomness: which text of a pair, augmentation
        texts = [pairs[i].texts[int(torch.randint(len(pairs[i].texts), (1,), generator=rg))] for i in idx]
        x = augment_batch(images[idx], size, rg, crop_scale=cfg.augment.crop_scale,
                          rotate_degrees=cfg.augment.rotate_degrees, hflip=cfg.augment.hflip)
        x = (x - mean) / std  # [B, 3, S, S]
        t = teacher_batch(distiller, [pairs[i] for i in idx]) if distiller is not None else None
        ids = torch.tensor([text_index[s] for s in texts])  # [B]; identical texts are positives of each other
        loss = engine.module(engine.to_device(x), ids.tolist() if pooled_cache is not None else texts,
                             engine.to_device(t), engine.to_device(ids))
        return StepResult(loss, len(idx), 0, dict(step_module.parts))

    def clamp_scale() -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    res = engine.fit(steps_per_epoch=steps, plan=plan, step=step, unit="pairs", after_step=clamp_scale,
                     desc="clip")
    if engine.sharded:  # gather the full weights (every rank) into a plain model on rank 0
        full = engine.full_state_dict()
        if engine.main:
            model = build()
            model.load_state_dict({k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")})
    if engine.main:
        model.config.extra = dict(model.config.extra, trained_steps=res["steps"], recipe="clip",
                                  pairs=len(pairs), left_out=skipped)
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(cfg.export_dtype)
        model.cpu().eval().save_pretrained(out / "model", dtype=dtype)
        save_resolved(cfg, out / "model" / "recipe.yaml", "clip")
    return {"steps": res["steps"], "pairs": len(pairs), "left_out": skipped, "last": res["last"],
            "model_dir": str(out / "model"), "seconds": res["seconds"]}
