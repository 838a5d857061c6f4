"""Image-text pairs for contrastive training, built from any canonical dataset.

The caption of a sample is its last assistant turn (``text_mode: caption``), or, for
VQA-Med 2019, texts are built per image from its category answers (``text_mode: vqa-med``:
modality, plane, organ system, abnormality; yes/no answers carry no description and are
left out; the organ system's body region is spelt out so plain words reach the text tower).
Images are decoded once into a uint8 cache; what cannot be used (undecodable images,
samples with no or several images, empty captions, images shared with an excluded set,
teacher features of the wrong width) is dropped and **counted by reason**, never silently.
MMKD-CLIP teacher features are read from the samples' ``teacher_features`` references.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medvl.data.describe import REGION, YES_NO, modality_phrase
from medvl.data.formats import get_format
from medvl.data.formats.mmkd import load_teacher_feature, resolve_ref
from medvl.data.imageio import load_medical
from medvl.data.schema import resolve_path
from medvl.data.splits import check_split, keep_image
from medvl.data.transforms import preprocess_2d
from medvl.errors import MedvlUserError


@dataclass
class DataConfig:
    format: str = "medvl"
    """input format (any name of ``medvl data formats``)"""
    path: str = ""
    """the dataset file or folder"""
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
    holdout: float = 0.0
    """fraction of images held out by image (medvl.data.splits); 0 = none"""
    holdout_seed: int = 0
    """seed of the held-out split"""
    part: str = "train"
    """which images to use when holdout > 0: train (the rest), holdout, or all"""


def vqa_med_texts(answers: dict[str, str]) -> list[str]:
    """Captions for one image from its VQA-Med 2019 category answers (yes/no answers carry no
    description and are left out). The organ system's body region is spelt out so that
    plain words ("chest", "head", "abdomen") reach the text tower."""
    mod = answers.get("modality")
    mod = modality_phrase(mod) if mod and mod not in YES_NO else None
    plane = answers.get("plane")
    organ = answers.get("organ")
    abn = answers.get("abnormality")
    abn = abn if abn and abn not in YES_NO else None
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
    # The plain answers as a user would type them as zero-shot labels, in the shape of the
    # default prompt templates ("a radiology image of the {}."): without these, the text
    # tower never meets "gastrointestinal" alone, and plain-label zero-shot falls to chance.
    # Such texts repeat across images; the loss takes identical texts as shared positives.
    if organ:
        texts += [f"a radiology image of the {organ}.", f"{organ}."]
    if mod:
        word = mod.split(" (")[0]
        texts.append(f"a medical image of the {word}." if word == mod else f"{word} image, {mod}.")
    if plane:
        texts.append(f"an image showing the {plane}.")
    return texts


@dataclass
class Pair:
    image: str
    texts: list[str]
    teachers: dict[str, str] = field(default_factory=dict)
    id: str = ""


def build_pairs(cfg: DataConfig) -> tuple[list[Pair], dict[str, int]]:
    """Image-text pairs from a dataset, with counts of what was left out and why."""

    if not cfg.path:
        raise MedvlUserError("data.path is not set")
    check_split(cfg.holdout, cfg.part)
    fmt = get_format(cfg.format)
    fmt.check_options(cfg.options, "read")
    conv = fmt.read(Path(cfg.path), **cfg.options)
    skipped: dict[str, int] = defaultdict(int)
    for s in conv.skipped:
        skipped[f"read: {s.reason}"] += 1
    data_dir = Path(cfg.path) if Path(cfg.path).is_dir() else Path(cfg.path).parent
    root = Path(cfg.image_root) if cfg.image_root else data_dir
    exclude: set[str] = set()
    if cfg.exclude_images_of == "bundled:vqa-rad":
        from medvl.data.bundled import bundled_image_stems
        exclude = bundled_image_stems("vqa-rad")
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
        if not keep_image(stem, cfg.holdout, cfg.holdout_seed, cfg.part):
            skipped[f"image(s) outside part {cfg.part} (holdout {cfg.holdout:g}, seed {cfg.holdout_seed})"] += 1
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
                # teacher feature files are relative to the data file (image_root is for images only)
                pairs.append(Pair(full, [cap], {k: resolve_ref(v, data_dir) for k, v in s.teacher_features.items()},
                                  s.id))
        else:
            raise MedvlUserError(f"data.text_mode must be caption or vqa-med, got {cfg.text_mode!r}")
    return pairs, dict(skipped)


def decode_images(pairs: list[Pair], size: int, progress: bool = True) -> tuple[torch.Tensor, list[int], dict[str, int]]:
    """Decode each image once to a [3, size, size] uint8 tensor; undecodable ones are
    counted and their pairs dropped (returned: tensor [N, 3, S, S], kept pair indices)."""
    from tqdm.auto import tqdm


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


def check_teacher_features(pairs: list[Pair]) -> tuple[list[Pair], dict[str, int], dict[str, int]]:
    """Read every referenced teacher feature once: each teacher's width is the most common
    one; features of another width and samples left with no teacher are dropped and
    counted. Returns the kept pairs, the widths and the skip counts."""
    from collections import Counter


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


def teacher_batch(distiller, batch: list[Pair]):
    """The batch's teacher features per teacher ([B, width] each, zeros where absent) and which are available ([B, T])."""

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
