"""Training samples from a data section (a bundled name or a file in any format), and the
question-only view of samples (the language-prior control)."""

from __future__ import annotations

from pathlib import Path

from medvl.data.bundled import BUNDLED, bundled_image_stems, load_bundled
from medvl.data.describe import description_samples
from medvl.data.formats import get_format
from medvl.data.schema import Sample, Turn, resolve_path
from medvl.data.splits import check_split, in_holdout, keep_image
from medvl.errors import MedvlUserError


def strip_images(samples):
    """Copies of the samples without images or placeholders."""
    out = []
    for s in samples:
        conv = [Turn(t.role, t.text.replace("<image>\n", "").replace("<image>", "")) for t in s.conversation]
        out.append(Sample(s.id, [], conv, s.boxes, s.labels, s.teacher_features, s.meta))
    return out


def load_training_samples(data: dict):
    """Samples with image paths made absolute (against data.image_root or the file's folder).

    ``data.holdout`` / ``holdout_seed`` / ``part`` keep the train or held-out images
    (:mod:`medvl.data.splits`, by image); samples without an image are kept; what is left out
    is counted. ``data.sources: [section, ...]`` mixes several datasets, each a data section
    of its own (ids made unique by prefixing the source's index where they collide); an image
    one source holds out is held out of every source (VQA-RAD shares MedPix images with
    VQA-Med), so a held-out split stays unseen however the data are mixed. A source's
    ``weight`` sets its share of the mix: 3 = every sample three times (copies get ids
    ``ID#2``, ``ID#3``), 0.25 = a seeded quarter of it (by sample, ``holdout_seed``), 0 = none of
    its samples but its held-out images still apply — how a second, one-dataset stage keeps
    another dataset's held-out split unseen. ``question_only: true`` gives a source's samples
    without their images (ids ``ID#q``): listed beside the same source with images, one model
    learns the answers' question priors as well as the image evidence — modality dropout
    done in the data (as the unconditional half of classifier-free guidance training, Ho &
    Salimans 2022). ``describe: true`` adds one "Describe this image." sample per image, its
    answer written from that image's own QA answers (:mod:`medvl.data.describe`), after the
    held-out images are removed; ``describe: only`` keeps just those. ``exclude_images_of:
    bundled:vqa-rad`` drops a source's images that also occur in the bundled VQA-RAD (as the
    CLIP recipe does for VQA-Med), counted."""
    samples, skipped, _ = _load_split(data)
    return samples, skipped


def _load_split(data: dict):
    if data.get("sources"):
        if not isinstance(data["sources"], list):
            raise MedvlUserError("data.sources must be a list of data sections")
        parts, skipped, held, seen = [], {}, set(), set()
        for i, sec in enumerate(data["sources"]):
            if not isinstance(sec, dict):
                raise MedvlUserError(f"data.sources[{i}] must be a mapping (path, format, ...), got {sec!r}")
            got, sk, h = _load_split(sec)
            parts.append((sec, got))
            held |= h
            skipped.update({f"{sec.get('path')}: {k}": v for k, v in sk.items()})
        samples = []
        for i, (sec, got) in enumerate(parts):
            kept = [s for s in got if not any(Path(m.path or "").stem in held for m in s.images)]
            if len(kept) < len(got):
                skipped[f"{sec.get('path')}: image held out by another source"] = len(got) - len(kept)
            if sec.get("question_only"):  # modality dropout at the data level: the same questions, no image
                kept = [_renamed(q, "#q") for q in strip_images(kept)]
            for s in kept:
                if s.id in seen:
                    s.id = f"{i}:{s.id}"
                seen.add(s.id)
            weighted = _weighted(kept, sec, i)
            if len(weighted) < len(kept):
                skipped[f"{sec.get('path')}: left out by weight {sec.get('weight'):g}"] = len(kept) - len(weighted)
            samples += weighted
        return samples, skipped, held
    samples, skipped = _load_one(data)
    fraction, seed, part = float(data.get("holdout", 0) or 0), int(data.get("holdout_seed", 0)), data.get("part", "train")
    check_split(fraction, part)
    held: set[str] = set()
    if fraction and part != "all":
        kept = [s for s in samples if not s.images or all(keep_image(m.path or s.id, fraction, seed, part)
                                                             for m in s.images)]
        if len(kept) < len(samples):
            skipped[f"outside part {part} (holdout {fraction:g} by image, seed {seed})"] = len(samples) - len(kept)
        if part == "train":
            held = {Path(m.path).stem for s in samples for m in s.images if m.path and in_holdout(m.path, fraction, seed)}
        samples = kept
    samples = _excluded(samples, data, skipped)
    if data.get("describe"):
        samples = _with_descriptions(samples, data.get("describe"), skipped)
    return samples, skipped, held


def _excluded(samples: list, data: dict, skipped: dict) -> list:
    what = data.get("exclude_images_of")
    if not what:
        return samples
    if what != "bundled:vqa-rad":
        raise MedvlUserError(f"data.exclude_images_of: unknown value {what!r} (bundled:vqa-rad)")
    stems = bundled_image_stems("vqa-rad")
    kept = [s for s in samples if not any(Path(m.path or "").stem in stems for m in s.images)]
    if len(kept) < len(samples):
        skipped[f"image also in {what}"] = len(samples) - len(kept)
    return kept


def _with_descriptions(samples: list, mode, skipped: dict) -> list:
    if mode not in (True, "only"):
        raise MedvlUserError(f"data.describe must be true or only, got {mode!r}")
    described, missed = description_samples(samples)
    if missed:
        skipped["images without a description (no usable answers)"] = missed
    return described if mode == "only" else samples + described


def _renamed(s, suffix: str):
    s.id = f"{s.id}{suffix}"
    return s


def _weighted(samples: list, sec: dict, index: int) -> list:
    """The source's samples at its ``weight``: whole copies, then a seeded subset for the fraction."""
    import copy
    import random

    w = sec.get("weight", 1)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
        raise MedvlUserError(f"data.sources[{index}].weight must be a number >= 0 (1 = as is, 3 = three times, "
                             f"0.5 = half), got {w!r}")
    whole, frac = int(w), w - int(w)
    def copies(group, k):
        if k == 1:
            return list(group)
        out = [copy.copy(s) for s in group]
        for c in out:
            c.id = f"{c.id}#{k}"
        return out

    out = [c for k in range(1, whole + 1) for c in copies(samples, k)]
    if frac:
        part = random.Random(int(sec.get("holdout_seed", 0))).sample(samples, round(frac * len(samples)))
        out += copies(part, whole + 1)
    return out


def _load_one(data: dict):

    path = str(data.get("path", ""))
    name, _, split = path.partition("/")
    if not Path(path).exists() and name in BUNDLED:
        return load_bundled(name, split or "train"), {}
    fname = data.get("format", "medvl")
    if Path(path).name == "dataset_info.json" and fname == "medvl":  # LLaMA-Factory's index of ShareGPT files
        fname = "sharegpt"
    fmt = get_format(fname)
    opts = data.get("options") or {}
    fmt.check_options(opts, "read")
    conv = fmt.read(Path(path), **opts)
    root = Path(data["image_root"]) if data.get("image_root") else (Path(path) if Path(path).is_dir() else Path(path).parent)
    for s in conv.samples:
        for m in s.images:
            if m.path:
                m.path = str(resolve_path(m.path, root))
    return conv.samples, {f"read: {k}": v for k, v in conv.skip_summary()}
