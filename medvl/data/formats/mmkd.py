"""MMKD-CLIP distillation data: ``meta.jsonl`` plus per-sample teacher feature files.

Layout (MMKD-CLIP, Wang et al. 2025)::

    {"imgpath": "images/0001.jpg", "txt": "caption", "available_clips": ["BiomedCLIP", "PMC_CLIP"],
     "featpath": "feats/0001.npz"}

Each feature file holds, for every teacher in ``available_clips``, the arrays
``<Teacher>_img`` and ``<Teacher>_txt`` (cached 512-d features). The file is named by the
row (``featpath`` / ``feat_path`` / ``feature_path``) or found under the ``features_dir``
option as ``<image stem>``, ``<id>`` or the row number, with ``.npz`` / ``.pt`` / ``.pth`` /
``.npy``. Canonical samples reference the arrays, never copy them: ``teacher_features["BiomedCLIP_img"] = "feats/0001.npz#BiomedCLIP_img"``.
:func:`load_teacher_feature` reads one reference back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medvl.data.formats.base import Conversion, Format, dump_json, load_json_list
from medvl.data.schema import Media, Sample, Turn
from medvl.errors import MedvlUserError

FEATURE_KEYS = ("featpath", "feat_path", "feature_path", "features")
FEATURE_EXTS = (".npz", ".pt", ".pth", ".npy")
_KNOWN = ("id", "imgpath", "txt", "available_clips") + FEATURE_KEYS


def load_teacher_feature(ref: str, root: Path | None = None) -> np.ndarray:
    """The array a ``file#key`` reference points to (.npz, or a .pt dict of tensors)."""
    file, _, key = ref.partition("#")
    p = Path(file) if root is None or Path(file).is_absolute() else Path(root) / file
    if not p.exists():
        raise MedvlUserError("teacher feature file not found", path=p)
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                return np.asarray(z[key]) if key else np.asarray(z[z.files[0]])
        if p.suffix in (".pt", ".pth"):
            import torch
            obj = torch.load(p, map_location="cpu", weights_only=True)
            val = obj[key] if key else obj
            return val.float().numpy() if hasattr(val, "numpy") else np.asarray(val)
        return np.load(p, allow_pickle=False)
    except KeyError:
        raise MedvlUserError(f"no feature {key!r} in the file", path=p) from None
    except (ValueError, OSError, RuntimeError) as e:
        raise MedvlUserError(f"cannot read teacher features ({e})", path=p) from None


class MMKDFormat(Format):
    name = "mmkd-clip"
    description = "MMKD-CLIP meta.jsonl: imgpath, txt, available_clips + per-sample <Teacher>_img/_txt feature files"
    layout = "a meta.jsonl file"
    read_options = {"features_dir": "folder of per-sample feature files (named by image stem, id or row number)",
                    "prompt": "user instruction (default 'Describe the image.')"}

    def read(self, path: Path, **options: Any) -> Conversion:
        rows = load_json_list(path)
        fdir = options.get("features_dir")
        prompt = options.get("prompt", "Describe the image.")
        out = Conversion()
        n_nofeat = 0
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                out.skip(i, None, "record is not a JSON object")
                continue
            rid = r.get("id", i)
            if not r.get("imgpath") or r.get("txt") in (None, ""):
                out.skip(i, rid, "missing imgpath or txt")
                continue
            clips = r.get("available_clips") or []
            if not isinstance(clips, list):
                out.skip(i, rid, "available_clips is not a list")
                continue
            fpath = next((r[k] for k in FEATURE_KEYS if isinstance(r.get(k), str)), None)
            if fpath is None and fdir:  # named by image stem, by the row's id, or by the row number
                names = [Path(r["imgpath"]).stem, str(rid), f"{i:06d}", str(i)]
                fpath = next((str(Path(fdir) / (n + e)) for n in names for e in FEATURE_EXTS
                              if (Path(fdir) / (n + e)).exists()), None)
            tf: dict[str, str] = {}
            if fpath:
                for t in clips:
                    tf[f"{t}_img"] = f"{fpath}#{t}_img"
                    tf[f"{t}_txt"] = f"{fpath}#{t}_txt"
            elif clips:
                n_nofeat += 1
            meta: dict[str, Any] = {"source": "mmkd-clip", "available_clips": clips}
            fkey = next((k for k in FEATURE_KEYS if k in r), None)
            if fkey:
                meta["feature_key"] = fkey
            extra = {k: v for k, v in r.items() if k not in _KNOWN}
            if extra:
                meta["extra"] = extra
            out.samples.append(Sample(
                id=str(rid), images=[Media(path=r["imgpath"])],
                conversation=[Turn("user", "<image>\n" + prompt), Turn("assistant", str(r["txt"]))],
                teacher_features=tf, meta=meta))
        if n_nofeat:
            out.notes.append(f"{n_nofeat} record(s) list teachers but no feature file was found "
                             "(set --opt features_dir=DIR)")
        return out

    def write(self, samples: list[Sample], path: Path, **options: Any) -> Conversion:
        out = Conversion()
        rows = []
        for i, s in enumerate(samples):
            answers = s.turns("assistant")
            if len(s.images) != 1 or not answers:
                out.skip(i, s.id, "an MMKD-CLIP row needs exactly one image and a text")
                continue
            clips = s.meta.get("available_clips") or sorted(
                {k.rsplit("_", 1)[0] for k in s.teacher_features})
            row: dict[str, Any] = {"imgpath": s.images[0].path, "txt": answers[-1].text,
                                   "available_clips": clips}
            files = {v.partition("#")[0] for v in s.teacher_features.values()}
            if len(files) == 1:
                row[s.meta.get("feature_key", "featpath")] = files.pop()
            row.update(s.meta.get("extra", {}))
            rows.append(row)
        dump_json(rows, path, lines=True)
        out.written = len(rows)
        return out


FORMAT = MMKDFormat
