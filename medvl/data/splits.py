"""Held-out splits **by image**, deterministic and stable across runs and machines.

An image belongs to the held-out part when the first 8 bytes of
``sha256(f"{seed}:{stem}")``, read as a fraction of 2**64, fall below ``fraction``. The key is
the file stem (VQA-Med's ``synpic`` id), so every question about an image lands on the same
side, a CLIP and a VLM trained with the same ``(fraction, seed)`` hold out the same images,
and adding or removing other images never moves one across the line (unlike a shuffled
split). Used for VQA-Med 2019 train, whose official validation set we do not have.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from medvl.errors import MedvlUserError

PARTS = ("all", "train", "holdout")


def in_holdout(key: str, fraction: float, seed: int = 0) -> bool:
    """Whether the image named ``key`` (a path or a stem) is in the held-out part."""
    stem = Path(key).stem
    h = int.from_bytes(hashlib.sha256(f"{seed}:{stem}".encode()).digest()[:8], "big")
    return h / 2 ** 64 < fraction


def check_split(fraction: float, part: str) -> None:
    if not 0.0 <= float(fraction) < 1.0:
        raise MedvlUserError(f"data.holdout must be a fraction in [0, 1), got {fraction!r}")
    if part not in PARTS:
        raise MedvlUserError(f"data.part must be one of {', '.join(PARTS)}, got {part!r}")
    if part == "holdout" and not fraction:
        raise MedvlUserError("data.part: holdout needs data.holdout > 0 (the fraction of images held out)")


def keep_image(key: str, fraction: float, seed: int, part: str) -> bool:
    """Whether an image is used under ``part`` (all / train / holdout)."""
    if part == "all" or not fraction:
        return True
    return in_holdout(key, fraction, seed) == (part == "holdout")


def split_samples(samples, fraction: float, seed: int = 0, by: str = "image") -> tuple[list, list]:
    """(kept, held out) with the same rule as :func:`in_holdout`. ``by="image"``: a sample is held
    out when any of its images is (every question about an image lands on one side; samples
    without an image go by id); ``by="sample"``: by the sample's id up to a ``#`` (the copies a
    source weight makes, ``ID#2``, and question-only copies, ``ID#q``, follow their original) —
    how VQA-RAD splits its test set (by question: test images also appear in train)."""
    if by not in ("image", "sample"):
        raise MedvlUserError(f"a split goes by image or by sample, got {by!r}")
    check_split(fraction, "holdout")

    def held(s) -> bool:
        if by == "image" and s.images:
            return any(in_holdout(m.path or s.id, fraction, seed) for m in s.images)
        return in_holdout(s.id.split("#", 1)[0], fraction, seed)
    kept, out = [], []
    for s in samples:
        (out if held(s) else kept).append(s)
    return kept, out
