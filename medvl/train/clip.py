"""The ``clip`` recipe: contrastive image-text training, optionally distilled from teachers.

One recipe for every dual-encoder paradigm (torchtune's one-recipe-per-paradigm rule):
CLIP or SigLIP loss; a locked text tower whose pooled outputs are cached once (LiT), so a
pretrained text encoder teaches a new vision tower at the cost of the vision tower alone;
MMKD-CLIP distillation when ``distill.enabled`` (teacher features from the samples'
``teacher_features``). Image-text pairs come from any canonical dataset: the caption is
the last assistant turn, or texts are built from VQA-Med category answers
(``text_mode: vqa-med``).

Trainer-layer duties live here and nowhere in the model code: DDP under ``torchrun``
(gloo on CPU), bf16 autocast, checkpoints that resume exactly (model, optimizer,
scheduler, step, RNG states, data order), the resolved config next to every checkpoint,
throughput (pairs/s) in the log, and a progress bar.

Augmentations suited to grey-scale medical images: random resized crop (mild scale range)
and small rotations; no colour jitter; horizontal flips are off by default because
captions name sides ("left effusion"), on only when ``augment.hflip > 0``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvl.errors import MedvlUserError


@dataclass
class DataConfig:
    format: str = "medvl"
    """input format (any name of ``medvl data formats``)"""
    path: str = ""
    options: dict = field(default_factory=dict)
    """reader options"""
    image_root: str = ""
    """folder relative image paths resolve against (default: the input's folder)"""
    text_mode: str = "caption"
    """caption (last assistant turn) or vqa-med (texts from the category answers of an image)"""
    exclude_images_of: str = ""
    """'bundled:vqa-rad' drops images whose file stem appears in the bundled VQA-RAD"""
    cache_size: int = 0
    """decode every image once to this size (0: image_size * 1.125)"""


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
class ClipTrainConfig:
    model: str = "medclip-r10t-minilm"
    """a CLIP config name (medvl/models/clip_configs) or a checkpoint folder to start from"""
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    loss: str = "clip"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    max_steps: int = 0
    """stop after this many steps (0: run all epochs)"""
    precision: str = "bf16"
    """bf16 (autocast on CPU/GPU) or fp32"""
    seed: int = 0
    output_dir: str = "runs/clip"
    log_every: int = 10
    save_every_epochs: int = 1
    threads: int = 0
    """torch threads (0: leave torch's default)"""
    export_dtype: str = "float32"


# ---- data ---------------------------------------------------------------------------------

_YES_NO = {"yes", "no"}
REGION = {
    "skull and contents": "head, brain", "face, sinuses, and neck": "head and neck",
    "spine and contents": "spine", "musculoskeletal": "bones and joints",
    "heart and great vessels": "chest, heart", "lung, mediastinum, pleura": "chest, lungs",
    "gastrointestinal": "abdomen, bowel", "genitourinary": "abdomen and pelvis, kidneys",
    "breast": "breast", "vascular and lymphatic": "blood vessels",
}
MODALITY_WORDS = [(r"^ct\b|^cta\b", "CT"), (r"^mr\b|mri", "MRI"), (r"^xr\b|plain film|x-ray", "X-ray"),
                  (r"^us\b|ultrasound", "ultrasound"), (r"mammo", "mammography"), (r"^an\b|angio", "angiography"),
                  (r"^nm\b|nuclear", "nuclear medicine"), (r"pet", "PET"), (r"^gi\b|fluoro", "fluoroscopy")]


def _modality_phrase(answer: str) -> str:
    for pat, word in MODALITY_WORDS:
        if re.search(pat, answer):
            detail = answer.split(" - ", 1)[1] if " - " in answer else ""
            return f"{word} ({detail})" if detail and detail.lower() != word.lower() else word
    return answer


def vqa_med_texts(answers: dict[str, str]) -> list[str]:
    """Captions for one image from its VQA-Med 2019 category answers (yes/no answers carry no
    description and are left out). The organ system's body region is spelt out so that
    plain words ("chest", "head", "abdomen") reach the text tower."""
    mod = answers.get("modality")
    mod = _modality_phrase(mod) if mod and mod not in _YES_NO else None
    plane = answers.get("plane")
    organ = answers.get("organ")
    abn = answers.get("abnormality")
    abn = abn if abn and abn not in _YES_NO else None
    region = REGION.get(organ or "", organ)
    parts = []
    head = " ".join(x for x in [plane, mod, "image"] if x)
    parts.append(head + (f" of the {region}" if region else ""))
    if organ:
        parts.append(f"organ system: {organ}")
    if abn:
        parts.append(f"finding: {abn}")
    texts = [". ".join(parts) + "."]
    if region:
        texts.append(f"a {mod or 'radiology'} image of the {region}.")
    if mod and plane:
        texts.append(f"{mod}, {plane} plane.")
    if abn:
        texts.append(f"{abn} on {mod or 'imaging'}.")
    return texts


@dataclass
class Pair:
    image: str
    texts: list[str]
    teachers: dict[str, str] = field(default_factory=dict)
    id: str = ""


def build_pairs(cfg: DataConfig) -> tuple[list[Pair], dict[str, int]]:
    """Image-text pairs from a dataset, with counts of what was left out and why."""
    from medvl.data.formats import get_format
    from medvl.data.schema import resolve_path

    if not cfg.path:
        raise MedvlUserError("data.path is not set")
    fmt = get_format(cfg.format)
    fmt.check_options(cfg.options, "read")
    conv = fmt.read(Path(cfg.path), **cfg.options)
    skipped: dict[str, int] = defaultdict(int)
    for s in conv.skipped:
        skipped[f"read: {s.reason}"] += 1
    root = Path(cfg.image_root) if cfg.image_root else (Path(cfg.path) if Path(cfg.path).is_dir() else Path(cfg.path).parent)
    if cfg.format == "vqa-med-2019" and not cfg.image_root and (root / "images").is_dir():
        root = root / "images"
    exclude: set[str] = set()
    if cfg.exclude_images_of == "bundled:vqa-rad":
        from medvl.data.bundled import load_bundled
        exclude = {Path(m.path).stem for sp in ("train", "test") for s in load_bundled("vqa-rad", sp) for m in s.images}
    elif cfg.exclude_images_of:
        raise MedvlUserError(f"data.exclude_images_of: unknown value {cfg.exclude_images_of!r} (bundled:vqa-rad)")
    by_image: dict[str, list] = defaultdict(list)
    for s in conv.samples:
        if len(s.images) != 1:
            skipped["not exactly one image"] += 1
            continue
        by_image[s.images[0].path].append(s)
    pairs = []
    for path, samples in by_image.items():
        stem = Path(path).stem
        if stem in exclude:
            skipped[f"image(s) also in {cfg.exclude_images_of}"] += 1
            continue
        full = str(resolve_path(path, root))
        if cfg.text_mode == "vqa-med":
            answers = {s.labels.get("category"): s.conversation[-1].text.strip().lower() for s in samples}
            texts = vqa_med_texts(answers)
            pairs.append(Pair(full, texts, {}, stem))
        elif cfg.text_mode == "caption":
            for s in samples:
                cap = s.turns("assistant")[-1].text.strip() if s.turns("assistant") else ""
                if not cap:
                    skipped["empty caption"] += 1
                    continue
                pairs.append(Pair(full, [cap], dict(s.teacher_features), s.id))
        else:
            raise MedvlUserError(f"data.text_mode must be caption or vqa-med, got {cfg.text_mode!r}")
    return pairs, dict(skipped)


def decode_images(pairs: list[Pair], size: int, progress: bool = True) -> tuple[torch.Tensor, list[int], dict[str, int]]:
    """Decode each image once to a [3, size, size] uint8 tensor; undecodable ones are
    counted and their pairs dropped (returned: tensor [N, 3, S, S], kept pair indices)."""
    from tqdm.auto import tqdm

    from medvl.data.imageio import load_medical
    from medvl.data.transforms import preprocess_2d

    out, keep, skipped = [], [], defaultdict(int)
    cache: dict[str, np.ndarray | None] = {}
    for i, p in enumerate(tqdm(pairs, desc="decoding images", unit="img", disable=not progress)):
        if p.image not in cache:
            try:
                x = preprocess_2d(load_medical(p.image), size, mode="pad", mean=(0, 0, 0), std=(1, 1, 1))
                cache[p.image] = (x * 255 + 0.5).clip(0, 255).astype(np.uint8)
            except MedvlUserError as e:
                cache[p.image] = None
                skipped[f"image does not decode ({str(e).split(': ')[-1][:60]})"] += 1
        if cache[p.image] is not None:
            out.append(cache[p.image])
            keep.append(i)
    if not out:
        raise MedvlUserError("no training image could be decoded")
    return torch.from_numpy(np.stack(out)), keep, dict(skipped)


def augment_batch(x: torch.Tensor, out_size: int, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """[B, 3, S, S] uint8 -> [B, 3, out, out] float in [0, 1]: random resized crop, rotation, flip."""
    import torch.nn.functional as F

    B, _, S, _ = x.shape
    xf = x.float() / 255.0
    lo, hi = cfg.crop_scale
    scale = lo + (hi - lo) * torch.rand(B, generator=gen)
    side = scale.sqrt()  # fraction of the side kept
    cx = (torch.rand(B, generator=gen) * 2 - 1) * (1 - side)
    cy = (torch.rand(B, generator=gen) * 2 - 1) * (1 - side)
    ang = (torch.rand(B, generator=gen) * 2 - 1) * math.radians(cfg.rotate_degrees)
    flip = torch.where(torch.rand(B, generator=gen) < cfg.hflip, -1.0, 1.0)
    cos, sin = torch.cos(ang) * side, torch.sin(ang) * side
    theta = torch.stack([torch.stack([cos * flip, -sin, cx], 1), torch.stack([sin * flip, cos, cy], 1)], 1)  # [B, 2, 3]
    grid = F.affine_grid(theta, (B, 3, out_size, out_size), align_corners=False)
    return F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def resize_batch(x: torch.Tensor, out_size: int) -> torch.Tensor:
    import torch.nn.functional as F
    return F.interpolate(x.float() / 255.0, size=(out_size, out_size), mode="bilinear", antialias=True,
                         align_corners=False)


# ---- the loop ----------------------------------------------------------------------------------

def _dist_info() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    return rank, world


def _lr_at(step: int, total: int, cfg: ClipTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def train_clip(cfg: ClipTrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a CLIP recipe; returns a summary (final loss, pairs/s, paths)."""
    from tqdm.auto import tqdm

    from medvl.models.clip import MedCLIP
    from medvl.losses.contrastive import LOSSES
    from medvl.train.config import save_resolved

    rank, world = _dist_info()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out / "config.yaml", "clip")

    model = MedCLIP.from_pretrained(cfg.model) if Path(cfg.model).is_dir() else MedCLIP.from_config(cfg.model)
    model.train()
    size = model.config.image_size
    pairs, skipped = build_pairs(cfg.data)
    dims: dict[str, int] = {}
    if cfg.distill.enabled:
        pairs, dims, t_skipped = check_teacher_features(pairs)
        skipped.update(t_skipped)
        if not pairs:
            raise MedvlUserError("distill.enabled but no sample has usable teacher features: " +
                                 ", ".join(f"{v} {k}" for k, v in t_skipped.items()))
    images, keep, dec_skipped = decode_images(pairs, cfg.data.cache_size or int(size * 1.125), progress and rank == 0)
    pairs = [pairs[i] for i in keep]
    skipped.update(dec_skipped)
    if rank == 0:
        print(f"clip: {len(pairs):,} image-text pairs; left out: " +
              (", ".join(f"{v:,} {k}" for k, v in skipped.items()) or "nothing"))

    # text side: cache the locked tower's pooled outputs for every text once
    all_texts = sorted({t for p in pairs for t in p.texts})
    text_index = {t: i for i, t in enumerate(all_texts)}
    pooled_cache = None
    if model.config.lock_text:
        with torch.no_grad():
            chunks = []
            for i in tqdm(range(0, len(all_texts), 256), desc="caching text tower", disable=not (progress and rank == 0)):
                chunks.append(model.text_pooled(all_texts[i:i + 256]).float())
            pooled_cache = torch.cat(chunks)  # [T, hidden]

    loss_fn = LOSSES[cfg.loss]() if cfg.loss in LOSSES else None
    if loss_fn is None:
        raise MedvlUserError(f"loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
    logit_bias = torch.nn.Parameter(torch.tensor(-10.0)) if cfg.loss == "siglip" else None
    distiller = None
    if cfg.distill.enabled:
        distiller = _make_distiller(cfg, model, dims)
    params = [p for p in model.parameters() if p.requires_grad]
    extra_params = ([logit_bias] if logit_bias is not None else []) + (list(distiller.parameters()) if distiller else [])
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2] + extra_params
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    ddp_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        ddp_model = DistributedDataParallel(model)

    local = list(range(rank, len(pairs), world))
    steps_per_epoch = max(1, len(local) // cfg.batch_size)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    gen = torch.Generator().manual_seed(cfg.seed + rank)
    state = {"step": 0, "epoch": 0}
    ckpt = out / "checkpoints" / "last.pt"
    if ckpt.exists():
        st = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        if distiller is not None and "distiller" in st:
            distiller.load_state_dict(st["distiller"])
        if logit_bias is not None and "logit_bias" in st:
            logit_bias.data.copy_(st["logit_bias"])
        gen.set_state(st["gen"])
        torch.set_rng_state(st["torch_rng"])
        state = st["state"]
        if rank == 0:
            print(f"clip: resumed from {ckpt} at step {state['step']} (epoch {state['epoch']})")
    log_path = out / "metrics.jsonl"
    autocast = torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16,
                              enabled=cfg.precision == "bf16")
    pbar = tqdm(total=total, initial=state["step"], desc="clip", unit="step", disable=not (progress and rank == 0))
    t_start, pairs_seen, last = time.perf_counter(), 0, {}
    while state["step"] < total:
        start = state.get("offset", 0)
        if start and state.get("order"):
            order = state["order"]  # resuming mid-epoch: the same order as before the stop
        else:
            order = torch.randperm(len(local), generator=gen).tolist()
            state["order"], start = order, 0
        for b in range(start, steps_per_epoch):
            if state["step"] >= total:
                break
            idx = [local[i] for i in order[b * cfg.batch_size:(b + 1) * cfg.batch_size]]
            texts = [pairs[i].texts[int(torch.randint(len(pairs[i].texts), (1,), generator=gen))] for i in idx]
            x = augment_batch(images[idx], size, cfg.augment, gen)
            mean = torch.tensor(model.config.image_mean)[None, :, None, None]
            std = torch.tensor(model.config.image_std)[None, :, None, None]
            x = (x - mean) / std  # [B, 3, S, S]
            for g in opt.param_groups:
                g["lr"] = _lr_at(state["step"], total, cfg)
            with autocast:
                img = torch.nn.functional.normalize(ddp_model.model.encode_image(x) if world == 1
                                                    else ddp_model.module.model.encode_image(x), dim=-1)
                if pooled_cache is not None:
                    txt = model.text_from_pooled(pooled_cache[[text_index[t] for t in texts]])
                else:
                    txt = model.encode_text(texts)
            img, txt = img.float(), txt.float()
            if distiller is not None:
                t_img, t_txt, avail = _teacher_batch(distiller, [pairs[i] for i in idx])
                parts = distiller(img, txt, model.logit_scale, t_img, t_txt, avail)
                loss = parts["loss"]
            elif cfg.loss == "siglip":
                loss = loss_fn(img, txt, model.logit_scale, logit_bias)
            else:
                loss = loss_fn(img, txt, model.logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            state["step"] += 1
            state["offset"] = b + 1
            pairs_seen += len(idx) * world
            pbar.update(1)
            if rank == 0 and (state["step"] % cfg.log_every == 0 or state["step"] == total):
                el = time.perf_counter() - t_start
                last = {"step": state["step"], "epoch": state["epoch"], "loss": float(loss.detach()),
                        "lr": opt.param_groups[0]["lr"], "pairs_per_s": pairs_seen / el,
                        "logit_scale": float(model.logit_scale.detach().exp())}
                if distiller is not None:
                    last.update({k: float(v) for k, v in parts.items() if k != "loss"})
                pbar.set_postfix(loss=f"{last['loss']:.3f}", pairs_s=f"{last['pairs_per_s']:.1f}")
                with open(log_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
        else:
            state["epoch"] += 1
            state["offset"] = 0
            if rank == 0 and state["epoch"] % cfg.save_every_epochs == 0:
                _save_ckpt(ckpt, model, opt, distiller, logit_bias, gen, state)
            continue
        break
    pbar.close()
    if rank == 0:
        _save_ckpt(ckpt, model, opt, distiller, logit_bias, gen, state)
        model.config.extra = dict(model.config.extra, trained_steps=state["step"], recipe="clip",
                                  pairs=len(pairs), left_out=skipped)
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(cfg.export_dtype)
        model.eval().save_pretrained(out / "model", dtype=dtype)
        save_resolved(cfg, out / "model" / "recipe.yaml", "clip")
        plot_losses(log_path, out / "training_loss.png")
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
    return {"steps": state["step"], "pairs": len(pairs), "left_out": skipped, "last": last,
            "model_dir": str(out / "model"), "seconds": time.perf_counter() - t_start}


def plot_losses(log_path: Path, png: Path) -> Path | None:
    """The loss curve from metrics.jsonl as a PNG (skipped without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not log_path.exists():
        return None
    rows = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png


def _save_ckpt(path: Path, model, opt, distiller, logit_bias, gen, state) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "distiller": distiller.state_dict() if distiller is not None else None,
                "logit_bias": logit_bias.detach() if logit_bias is not None else None,
                "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "state": dict(state)}, tmp)
    os.replace(tmp, path)  # atomic: a killed run never leaves half a checkpoint


# ---- distillation glue ------------------------------------------------------------------------

def check_teacher_features(pairs: list[Pair]) -> tuple[list[Pair], dict[str, int], dict[str, int]]:
    """Read every referenced teacher feature once: each teacher's width is the most common
    one; features of another width and samples left with no teacher are dropped and
    counted. Returns the kept pairs, the widths and the skip counts."""
    from collections import Counter

    from medvl.data.formats.mmkd import load_teacher_feature

    widths: dict[str, Counter] = defaultdict(Counter)
    seen: dict[tuple[int, str], int] = {}
    skipped: dict[str, int] = defaultdict(int)
    for i, p in enumerate(pairs):
        for key, ref in p.teachers.items():
            try:
                w = int(np.asarray(load_teacher_feature(ref)).reshape(-1).shape[0])
            except MedvlUserError as e:
                skipped[f"unreadable teacher feature ({str(e)[-60:]})"] += 1
                continue
            seen[(i, key)] = w
            widths[key.rsplit("_", 1)[0]][w] += 1
    dims = {t: c.most_common(1)[0][0] for t, c in widths.items()}
    kept = []
    for i, p in enumerate(pairs):
        good = {}
        for t in dims:
            wi, wt = seen.get((i, f"{t}_img")), seen.get((i, f"{t}_txt"))
            if wi is None or wt is None:
                continue
            if wi != dims[t] or wt != dims[t]:
                skipped[f"teacher {t} feature of width {wi}/{wt}, expected {dims[t]}"] += 1
                continue
            good[f"{t}_img"], good[f"{t}_txt"] = p.teachers[f"{t}_img"], p.teachers[f"{t}_txt"]
        if not good:
            skipped["no available teacher"] += 1
            continue
        p.teachers = good
        kept.append(p)
    return kept, dims, dict(skipped)


def _make_distiller(cfg: ClipTrainConfig, model, dims: dict[str, int]):
    from medvl.losses.distill import MMKDLoss

    if not dims:
        raise MedvlUserError("distill.enabled but no sample has teacher features (teacher_features is empty)")
    return MMKDLoss(model.config.embed_dim, dims, lam=cfg.distill.lam, teacher_choice=cfg.distill.teacher_choice,
                    cross_scale=cfg.distill.cross_scale, seed=cfg.seed)


def _teacher_batch(distiller, batch: list[Pair]):
    from medvl.data.formats.mmkd import load_teacher_feature

    T = distiller.teachers
    t_img = {t: torch.zeros(len(batch), distiller.proj[t].out_features) for t in T}
    t_txt = {t: torch.zeros(len(batch), distiller.proj[t].out_features) for t in T}
    avail = torch.zeros(len(batch), len(T), dtype=torch.bool)
    for i, p in enumerate(batch):
        for k, t in enumerate(T):
            ri, rt = p.teachers.get(f"{t}_img"), p.teachers.get(f"{t}_txt")
            if ri and rt:
                vi = torch.from_numpy(np.asarray(load_teacher_feature(ri), dtype=np.float32).reshape(-1))
                vt = torch.from_numpy(np.asarray(load_teacher_feature(rt), dtype=np.float32).reshape(-1))
                width = distiller.proj[t].out_features
                if vi.numel() != width or vt.numel() != width:
                    raise MedvlUserError(f"sample {p.id!r}: teacher {t} feature has width {vi.numel()}/{vt.numel()}, "
                                         f"expected {width}")
                t_img[t][i], t_txt[t][i] = vi, vt
                avail[i, k] = True
        if not avail[i].any():
            raise MedvlUserError(f"sample {p.id!r} has no available teacher features")
    return t_img, t_txt, avail
