"""MMKD-CLIP distillation data: ``meta.jsonl`` plus per-sample teacher feature files.

MMKD-CLIP's own layout (Wang et al. 2025), read as it is::

    meta.jsonl   {"folderid": "000", "id": "0001", "imgpath": "images/0001.jpg", "metapath": "...",
                  "txt": "caption", "available_clips": ["BMCA", "BiomedCLIP", "UniMedCLIP"]}
    features/<folderid>/<id>/clips_project_output.pt   {"BMCA_img": Tensor[512], "BMCA_txt": Tensor[512], ...}
    features/<folderid>/<id>/clips_output.pt           the same teachers' raw (unprojected) features

Each ``.pt`` is a ``torch.save``d dict of 1-D tensors, loaded with ``weights_only=True`` (no
pickled code runs). The projected features (each teacher's CLIP embedding, 512-d for most
teachers) are read by default; ``--opt features=raw`` reads ``clips_output.pt`` instead (BMCA
768-d raw, for instance). Widths may differ between teachers: the distillation learns one
linear map per teacher from the student's width to that teacher's
(:mod:`medvl.losses.distill`), and a teacher's width is the most common one over the data —
a feature of another width is dropped and counted (:func:`medvl.data.pairs.check_teacher_features`).
The features folder is ``features/`` beside ``meta.jsonl`` unless ``--opt features_dir=DIR`` says.

A flatter layout is read too: a row naming its file (``featpath`` / ``feat_path`` /
``feature_path``: an ``.npz`` of arrays or a ``.pt`` dict), or a file under ``features_dir``
named by the image stem, the id or the row number (``.npz`` / ``.pt`` / ``.pth`` / ``.npy``).

Paths follow one rule: a path written in ``meta.jsonl`` is relative to that file; a folder given
on the command line is relative to the working directory and stored absolute. Canonical
samples reference the arrays, never copy them: ``teacher_features["BMCA_img"] =
"features/000/0001/clips_project_output.pt#BMCA_img"``; :func:`load_teacher_feature` reads one
reference back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medvl.data.formats.base import Conversion, Format, collect_rows, dump_json, load_json_list, register_format
from medvl.data.schema import Media, Sample, Turn
from medvl.errors import MedvlUserError

FEATURE_KEYS = ("featpath", "feat_path", "feature_path", "features")
FEATURE_EXTS = (".npz", ".pt", ".pth", ".npy")
#: MMKD-CLIP's per-sample files in features/<folderid>/<id>/
FEATURE_FILES = {"projected": "clips_project_output.pt", "raw": "clips_output.pt"}
_KNOWN = ("id", "imgpath", "txt", "available_clips") + FEATURE_KEYS


def resolve_ref(ref: str, root: Path | None) -> str:
    """A ``file#key`` reference with its file made relative to ``root`` (the data file's folder)."""
    file, sep, key = ref.partition("#")
    p = Path(file)
    return (str(p if p.is_absolute() or root is None else Path(root) / p)) + sep + key


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


@register_format
class MMKDFormat(Format):
    name = "mmkd-clip"
    description = "MMKD-CLIP meta.jsonl: imgpath, txt, available_clips + per-sample <Teacher>_img/_txt feature files"
    layout = "a meta.jsonl file"
    read_options = {"features_dir": "the features folder (default: features/ beside meta.jsonl): "
                                    "<folderid>/<id>/clips_project_output.pt, or files named by image stem, id or row",
                     "features": "projected (clips_project_output.pt, default) or raw (clips_output.pt)",
                     "prompt": "user instruction (default 'Describe the image.')"}

    def read(self, path: Path, **options: Any) -> Conversion:
        rows = load_json_list(path)
        base = Path(path).parent
        kind = options.get("features", "projected")
        if kind not in FEATURE_FILES:
            raise MedvlUserError(f"--opt features must be {' or '.join(FEATURE_FILES)}, got {kind!r}")
        given = options.get("features_dir")
        # a folder from the command line: relative to the cwd, stored absolute; the default sits beside the file
        fdir = Path(given).resolve() if given else base / "features"
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
            if fpath is None and r.get("folderid") is not None and "id" in r:  # MMKD-CLIP's own layout
                f = fdir / str(r["folderid"]) / str(r["id"]) / FEATURE_FILES[kind]
                fpath = self._stored(f, base, given) if f.exists() else None
            if fpath is None and fdir.is_dir():  # named by image stem, by the row's id, or by the row number
                names = [Path(r["imgpath"]).stem, str(rid), f"{i:06d}", str(i)]
                fpath = next((self._stored(fdir / (n + e), base, given) for n in names for e in FEATURE_EXTS
                              if (fdir / (n + e)).exists()), None)
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
            out.notes.append(f"{n_nofeat} record(s) list teachers but no feature file was found under {fdir} "
                             f"(looked for <folderid>/<id>/{FEATURE_FILES[kind]} and files named by image stem / id; "
                             "set --opt features_dir=DIR)")
        return out

    @staticmethod
    def _stored(f: Path, base: Path, given: str | None) -> str:
        """How a found feature file is written in the sample: relative to the data file when it lies
        under the default folder beside it, absolute when the folder came from the command line."""
        return str(f) if given else f.relative_to(base).as_posix()

    def write(self, samples: list[Sample], path: Path, **options: Any) -> Conversion:
        def row(s: Sample) -> dict | None:
            answers = s.turns("assistant")
            if len(s.images) != 1 or not answers:
                return None
            clips = s.meta.get("available_clips") or sorted(
                {k.rsplit("_", 1)[0] for k in s.teacher_features})
            row: dict[str, Any] = {"imgpath": s.images[0].path, "txt": answers[-1].text,
                                   "available_clips": clips}
            files = {v.partition("#")[0] for v in s.teacher_features.values()}
            if len(files) == 1:
                row[s.meta.get("feature_key", "featpath")] = files.pop()
            row.update(s.meta.get("extra", {}))
            return row
        rows, out = collect_rows(samples, row, "an MMKD-CLIP row needs exactly one image and a text")
        dump_json(rows, path, lines=True)
        return out
