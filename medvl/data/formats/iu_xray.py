"""IU X-ray / Open-i (Demner-Fushman et al., JAMIA 2016), in the widely used CSV release.

Layout read (IN is the folder, or the reports CSV with the projections CSV beside it)::

    indiana_reports.csv       uid, MeSH, Problems, image, indication, comparison, findings, impression
    indiana_projections.csv   uid, filename, projection   (Frontal / Lateral)
    images/images_normalized/<filename>

Defaults, each an option: frontal projections only (``views=Frontal``; ``all`` keeps both),
one sample per study (``unit=image`` for one per image), target ``section=findings``.
``Problems`` and ``MeSH`` (``;``-separated) become ``labels["problems"]`` and
``labels["mesh"]`` lists. Writing gives both CSVs back.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

from medvl.data.formats.base import Conversion, Format, read_csv, register_format, require_exists, write_csv
from medvl.data.reports import clean, target_text
from medvl.data.schema import Media, Sample, Turn
from medvl.errors import MedvlUserError

DEFAULT_PROMPT = "Describe the findings of the chest X-ray."
REPORT_COLUMNS = ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"]
PROJ_COLUMNS = ["uid", "filename", "projection"]


def _split_list(v: str | None) -> list[str]:
    return [p.strip() for p in (v or "").split(";") if p.strip()]


@register_format
class IUXrayFormat(Format):
    name = "iu-xray"
    description = "IU X-ray / Open-i: indiana_reports.csv (findings, impression, MeSH, Problems) + indiana_projections.csv"
    layout = "the folder holding indiana_reports.csv and indiana_projections.csv"
    writes_folder = True
    read_options = {"unit": "study (default) or image", "views": "Frontal (default), Lateral or all",
                    "section": "findings (default), impression or both",
                    "image_dir": "folder prefixed to filenames (default: images/images_normalized if present)",
                    "prompt": f"user instruction (default {DEFAULT_PROMPT!r})"}

    def read(self, path: Path, **options: Any) -> Conversion:
        path = require_exists(Path(path))
        root = path if path.is_dir() else path.parent
        rep_csv = root / "indiana_reports.csv" if path.is_dir() else path
        proj_csv = root / "indiana_projections.csv"
        for p in (rep_csv, proj_csv):
            if not p.exists():
                raise MedvlUserError("expected file is missing (IU X-ray needs indiana_reports.csv and "
                                     "indiana_projections.csv side by side)", path=p)
        reports = read_csv(rep_csv)
        projections = read_csv(proj_csv)
        unit = options.get("unit", "study")
        section = options.get("section", "findings")
        views = options.get("views", "Frontal")
        keep = None if views == "all" else {v.strip().lower() for v in views.split(",")}
        image_dir = options.get("image_dir")
        if image_dir is None:
            image_dir = next((d for d in ("images/images_normalized", "images") if (root / d).is_dir()), "")
        prompt = options.get("prompt", DEFAULT_PROMPT)

        out = Conversion()
        imgs: dict[str, list[dict]] = collections.defaultdict(list)
        for j, p in enumerate(projections):
            proj = (p.get("projection") or "").strip()
            if keep is not None and proj.lower() not in keep:
                out.skip(j, p.get("filename"), f"projection {proj or '(none)'} not kept (views={views})")
                continue
            imgs[str(p.get("uid", "")).strip()].append(p)
        for i, r in enumerate(reports):
            uid = str(r.get("uid", "")).strip()
            sections = {"findings": clean(r.get("findings", "")), "impression": clean(r.get("impression", ""))}
            target = target_text(sections, section)
            if not uid:
                out.skip(i, None, "report row without uid")
                continue
            if not target:
                out.skip(i, uid, f"report has no {section}")
                continue
            if not imgs.get(uid):
                out.skip(i, uid, "no image with a kept projection")
                continue
            labels = {"problems": _split_list(r.get("Problems")), "mesh": _split_list(r.get("MeSH"))}
            base_meta = {"source": "iu-xray", "uid": uid, "findings": sections["findings"],
                         "impression": sections["impression"], "indication": r.get("indication", ""),
                         "comparison": r.get("comparison", ""), "image_title": r.get("image", "")}
            groups = [imgs[uid]] if unit == "study" else [[p] for p in imgs[uid]]
            for g in groups:
                media = [Media(path=str(Path(image_dir) / p["filename"]) if image_dir else p["filename"],
                               modality="CXR") for p in g]
                meta = dict(base_meta, filenames=[p["filename"] for p in g],
                            projections=[p.get("projection", "") for p in g])
                sid = f"iu-{uid}" if unit == "study" else Path(g[0]["filename"]).stem
                conv = [Turn("user", "<image>\n" * len(media) + prompt), Turn("assistant", target)]
                out.samples.append(Sample(id=sid, images=media, conversation=conv, labels=labels, meta=meta))
        return out

    def write(self, samples: list[Sample], path: Path, **options: Any) -> Conversion:
        root = Path(path)
        out = Conversion()
        reports: dict[str, dict] = {}
        projections = []
        for i, s in enumerate(samples):
            uid = s.meta.get("uid")
            if not uid:
                out.skip(i, s.id, "no IU X-ray uid in meta")
                continue
            answers = s.turns("assistant")
            reports.setdefault(uid, {
                "uid": uid, "MeSH": ";".join(s.labels.get("mesh", [])),
                "Problems": ";".join(s.labels.get("problems", [])), "image": s.meta.get("image_title", ""),
                "indication": s.meta.get("indication", ""), "comparison": s.meta.get("comparison", ""),
                "findings": s.meta.get("findings", answers[-1].text if answers else ""),
                "impression": s.meta.get("impression", "")})
            names = s.meta.get("filenames") or [Path(m.path or "").name for m in s.images]
            projs = s.meta.get("projections") or [""] * len(names)
            projections += [{"uid": uid, "filename": n, "projection": p} for n, p in zip(names, projs)]
            out.written += 1
        write_csv(list(reports.values()), root / "indiana_reports.csv", REPORT_COLUMNS)
        write_csv(projections, root / "indiana_projections.csv", PROJ_COLUMNS)
        return out
