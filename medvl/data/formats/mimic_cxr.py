"""MIMIC-CXR / MIMIC-CXR-JPG (Johnson et al., Sci Data 2019): metadata CSV plus reports.

Layout read (IN is the dataset root, or its metadata CSV)::

    mimic-cxr-2.0.0-metadata.csv[.gz]   dicom_id, subject_id, study_id, ViewPosition, ...
    mimic-cxr-2.0.0-split.csv[.gz]      dicom_id, study_id, subject_id, split   (optional)
    files/p10/p10000032/s50414267.txt   free-text report of a study
    files/p10/p10000032/s50414267/<dicom_id>.jpg

Reports may instead come from the ``reports`` option: a folder laid out like ``files/``,
or a CSV with ``study`` / ``study_id`` and ``findings`` / ``impression`` columns (the
output of the MIMIC-CXR ``create_section_files.py``). Findings and impression are
extracted with :mod:`medvl.data.reports`.

Defaults, each an option: frontal views only (``views=PA,AP``; ``all`` keeps every view),
one sample per study (``unit=image`` gives one per image), target ``section=findings``
(``impression`` or ``both``). Left-out studies and images are counted by reason.
Canonical: id ``s<study_id>`` (or ``<dicom_id>`` per image); ``meta`` keeps subject, study,
dicom ids, views, split and both sections, so writing back rebuilds the layout.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

from medvl.data.formats.base import Conversion, Format, read_csv, register_format, require_exists, write_csv
from medvl.data.reports import build_report, split_sections, target_text
from medvl.data.schema import Media, Sample, Turn
from medvl.errors import MedvlUserError

DEFAULT_PROMPT = "Describe the findings of the chest X-ray."
META_COLUMNS = ["dicom_id", "subject_id", "study_id", "ViewPosition"]


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).exists():
            return root / name
    return None


def study_dir(subject_id: str, study_id: str) -> str:
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}"


@register_format
class MimicCXRFormat(Format):
    name = "mimic-cxr"
    description = "MIMIC-CXR(-JPG): metadata CSV + free-text reports; findings/impression extracted"
    layout = "the dataset root folder (or its mimic-cxr-2.0.0-metadata.csv)"
    writes_folder = True
    read_options = {
        "unit": "study (default) or image", "views": "comma list of ViewPosition to keep (default PA,AP) or all",
        "section": "findings (default), impression or both", "split": "keep one split (train, validate, test)",
        "reports": "folder of sNNN.txt reports, or a sectioned CSV", "ext": "image extension (default .jpg)",
        "prompt": f"user instruction (default {DEFAULT_PROMPT!r})"}

    def read(self, path: Path, **options: Any) -> Conversion:
        path = require_exists(Path(path))
        root = path if path.is_dir() else path.parent
        meta_csv = _find(root, "mimic-cxr-2.0.0-metadata.csv") if path.is_dir() else path
        if meta_csv is None:
            raise MedvlUserError("no mimic-cxr-2.0.0-metadata.csv(.gz) in this folder", path=root)
        rows = read_csv(meta_csv)
        if rows and not {"dicom_id", "subject_id", "study_id"} <= set(rows[0]):
            raise MedvlUserError("metadata CSV lacks dicom_id / subject_id / study_id columns", path=meta_csv)
        unit = options.get("unit", "study")
        if unit not in ("study", "image"):
            raise MedvlUserError(f"option unit must be study or image, got {unit!r}")
        section = options.get("section", "findings")
        if section not in ("findings", "impression", "both"):
            raise MedvlUserError(f"option section must be findings, impression or both, got {section!r}")
        views = options.get("views", "PA,AP")
        keep_views = None if views == "all" else {v.strip().upper() for v in views.split(",")}
        split_of = self._splits(root)
        want_split = options.get("split")
        if want_split and not split_of:
            raise MedvlUserError("option split given but no mimic-cxr-2.0.0-split.csv(.gz) found", path=root)
        reports = _ReportSource(root, options.get("reports"))
        ext = options.get("ext", ".jpg")
        prompt = options.get("prompt", DEFAULT_PROMPT)

        out = Conversion()
        by_study: dict[str, list[tuple[int, dict]]] = collections.OrderedDict()
        for i, r in enumerate(rows):
            sid = str(r.get("study_id", "")).strip()
            if not sid or not r.get("dicom_id") or not r.get("subject_id"):
                out.skip(i, r.get("dicom_id"), "metadata row without dicom_id/subject_id/study_id")
                continue
            if want_split and split_of.get(r["dicom_id"]) != want_split:
                out.skip(i, r["dicom_id"], f"not in split {want_split}")
                continue
            view = (r.get("ViewPosition") or "").strip().upper()
            if keep_views is not None and view not in keep_views:
                out.skip(i, r["dicom_id"], f"view {view or '(none)'} not kept (views={views})")
                continue
            by_study.setdefault(sid, []).append((i, r))

        for sid, items in by_study.items():
            subject = str(items[0][1]["subject_id"]).strip()
            text = reports.get(subject, sid)
            if text is None:
                for i, r in items:
                    out.skip(i, r["dicom_id"], "no report found for the study")
                continue
            sections = text if isinstance(text, dict) else split_sections(text)
            target = target_text(sections, section)
            if not target:
                for i, r in items:
                    out.skip(i, r["dicom_id"], f"report has no {section} section")
                continue
            groups = [items] if unit == "study" else [[it] for it in items]
            for g in groups:
                media = [Media(path=f"{study_dir(subject, sid)}/{r['dicom_id']}{ext}", modality="CXR")
                         for _, r in g]
                meta = {"source": "mimic-cxr", "subject_id": subject, "study_id": sid,
                        "dicom_ids": [r["dicom_id"] for _, r in g],
                        "views": [(r.get("ViewPosition") or "").strip() for _, r in g],
                        "findings": sections.get("findings", ""),
                        "impression": sections.get("impression", ""), "section": section}
                if split_of:
                    meta["split"] = split_of.get(g[0][1]["dicom_id"])
                uid = f"s{sid}" if unit == "study" else g[0][1]["dicom_id"]
                conv = [Turn("user", "<image>\n" * len(media) + prompt), Turn("assistant", target)]
                out.samples.append(Sample(id=uid, images=media, conversation=conv, meta=meta))
        return out

    @staticmethod
    def _splits(root: Path) -> dict[str, str]:
        p = _find(root, "mimic-cxr-2.0.0-split.csv")
        return {r["dicom_id"]: r["split"] for r in read_csv(p)} if p else {}

    def write(self, samples: list[Sample], path: Path, **options: Any) -> Conversion:
        """Write ``mimic-cxr-2.0.0-metadata.csv`` and one report per study under ``files/``."""
        root = Path(path)
        out = Conversion()
        rows, reports = [], {}
        for i, s in enumerate(samples):
            subject, study = s.meta.get("subject_id"), s.meta.get("study_id")
            if not subject or not study:
                out.skip(i, s.id, "no MIMIC subject_id/study_id in meta")
                continue
            dicoms = s.meta.get("dicom_ids") or [Path(m.path or "").stem for m in s.images]
            views = s.meta.get("views") or [""] * len(dicoms)
            for d, v in zip(dicoms, views):
                rows.append({"dicom_id": d, "subject_id": subject, "study_id": study, "ViewPosition": v})
            findings = s.meta.get("findings")
            impression = s.meta.get("impression")
            if not findings and not impression:
                answers = s.turns("assistant")
                findings = answers[-1].text if answers else ""
            reports[(subject, study)] = build_report(findings, impression)
            out.written += 1
        write_csv(rows, root / "mimic-cxr-2.0.0-metadata.csv", META_COLUMNS)
        for (subject, study), text in reports.items():
            p = root / (study_dir(subject, study) + ".txt")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text, encoding="utf-8")
        return out


class _ReportSource:
    """Report text (or ready sections) for a study, from files/ or a sectioned CSV."""

    def __init__(self, root: Path, reports: str | None):
        self.dir: Path | None = None
        self.table: dict[str, dict] | None = None
        src = Path(reports) if reports else root
        if src.is_file():
            self.table = {}
            for r in read_csv(src):
                sid = str(r.get("study") or r.get("study_id") or "").lstrip("s")
                self.table[sid] = {k: (r.get(k) or "").strip() for k in ("findings", "impression")}
        else:
            self.dir = src

    def get(self, subject: str, study: str) -> str | dict | None:
        if self.table is not None:
            return self.table.get(study)
        assert self.dir is not None
        rel_files = study_dir(subject, study) + ".txt"
        for rel in (rel_files, rel_files[len("files/"):], f"s{study}.txt"):
            p = self.dir / rel
            if p.exists():
                return p.read_text(encoding="utf-8", errors="replace")
        return None
