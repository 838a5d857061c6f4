"""Datasets shipped inside the package, loadable with no download.

``vqa-rad``: VQA-RAD (Lau et al., "A dataset of clinically generated visual questions and
answers about radiology images", Sci Data 5, 180251, 2018; CC0 1.0): the 314 images its
questions use (315 are published), the published train (3,064) / test (451) questions,
images downsampled to 256 px on the
longest side (JPEG quality 85) so the package stays small. Rebuilt from the original
files by ``scripts/build_bundled_vqa_rad.py``; the normalisations applied are those of
the ``vqa-rad`` reader (:mod:`medvl.data.formats.vqa_rad`). As published, the split is by
question: every test image also appears in training.
"""

from __future__ import annotations

from pathlib import Path

from medvl.data.schema import Sample, read_jsonl
from medvl.errors import MedvlUserError

BUNDLED_ROOT = Path(__file__).resolve().parent.parent / "bundled"
BUNDLED = {"vqa-rad": ("train", "test")}


def bundled_path(name: str, split: str) -> Path:
    if name not in BUNDLED:
        raise MedvlUserError(f"no bundled dataset {name!r}; bundled: {', '.join(BUNDLED)}")
    if split not in BUNDLED[name]:
        raise MedvlUserError(f"bundled dataset {name!r} has splits {', '.join(BUNDLED[name])}, not {split!r}")
    return BUNDLED_ROOT / name / f"{split}.jsonl"


def bundled_split(ref: str) -> tuple[str, str] | None:
    """``(name, split)`` when ``ref`` names a bundled split (``vqa-rad/test``; ``vqa-rad`` = its train
    split) and is not an existing file — a file of that name always wins; otherwise None."""
    if Path(ref).exists():
        return None
    name, _, split = str(ref).partition("/")
    return (name, split or "train") if name in BUNDLED else None


def load_bundled(name: str = "vqa-rad", split: str = "train") -> list[Sample]:
    """The bundled dataset's samples, with image paths made absolute."""
    path = bundled_path(name, split)
    samples = read_jsonl(path)
    for s in samples:
        for m in s.images:
            if m.path and not Path(m.path).is_absolute():
                m.path = str(path.parent / m.path)
    return samples


def bundled_image_stems(name: str = "vqa-rad") -> set[str]:
    """File stems of every image of a bundled dataset, all splits (MedPix ids such as ``synpic54610``)."""
    return {Path(m.path).stem for split in BUNDLED[name] for s in load_bundled(name, split) for m in s.images}
