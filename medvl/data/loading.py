"""Training samples from a data section (a bundled name or a file in any format), and the
question-only view of samples (the language-prior control)."""

from __future__ import annotations

from pathlib import Path


def strip_images(samples):
    """Copies of the samples without images or placeholders."""
    from medvl.data.schema import Sample, Turn
    out = []
    for s in samples:
        conv = [Turn(t.role, t.text.replace("<image>\n", "").replace("<image>", "")) for t in s.conversation]
        out.append(Sample(s.id, [], conv, s.boxes, s.labels, s.teacher_features, s.meta))
    return out


def load_training_samples(data: dict):
    """Samples with image paths made absolute (against data.image_root or the file's folder)."""
    from medvl.data.bundled import BUNDLED, load_bundled
    from medvl.data.formats import get_format
    from medvl.data.schema import resolve_path

    path = str(data.get("path", ""))
    name, _, split = path.partition("/")
    if not Path(path).exists() and name in BUNDLED:
        return load_bundled(name, split or "train"), {}
    fmt = get_format(data.get("format", "medvl"))
    opts = data.get("options") or {}
    fmt.check_options(opts, "read")
    conv = fmt.read(Path(path), **opts)
    root = Path(data["image_root"]) if data.get("image_root") else (Path(path) if Path(path).is_dir() else Path(path).parent)
    for s in conv.samples:
        for m in s.images:
            if m.path:
                m.path = str(resolve_path(m.path, root))
    return conv.samples, {f"read: {k}": v for k, v in conv.skip_summary()}
