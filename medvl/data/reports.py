"""Free-text radiology reports: split into sections, clean, and rebuild.

Follows what the MIMIC-CXR authors' ``section_parser`` does (Johnson et al., MIMIC-CXR,
github.com/MIT-LCP/mimic-cxr, ``txt/section_parser.py``): headers are upper-case words
ending in a colon at the start of a line; synonyms map to one name (``IMPRESSIONS`` and
``CONCLUSION`` are the impression; ``FINDINGS AND IMPRESSION`` is both); when a report has
neither findings nor impression, its last paragraph is kept as ``last_paragraph``. The
code here is our own; the behaviour and the synonym choices follow that reference.
"""

from __future__ import annotations

import re

_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z0-9 ,/&()'\-]{1,60}?)[ \t]*:", re.M)
SYNONYMS = {
    "FINDINGS": ("findings",), "FINDING": ("findings",),
    "IMPRESSION": ("impression",), "IMPRESSIONS": ("impression",),
    "CONCLUSION": ("impression",), "CONCLUSIONS": ("impression",),
    "FINDINGS AND IMPRESSION": ("findings", "impression"),
    "FINDINGS/IMPRESSION": ("findings", "impression"),
    "IMPRESSION AND FINDINGS": ("findings", "impression"),
    "INDICATION": ("indication",), "HISTORY": ("indication",),
    "CLINICAL HISTORY": ("indication",), "REASON FOR EXAM": ("indication",),
    "COMPARISON": ("comparison",), "COMPARISONS": ("comparison",),
    "TECHNIQUE": ("technique",), "EXAMINATION": ("examination",), "EXAM": ("examination",),
}


def clean(text: str) -> str:
    """Collapse whitespace (reports are hard-wrapped) and strip."""
    return re.sub(r"\s+", " ", text or "").strip()


def split_sections(report: str) -> dict[str, str]:
    """Named sections of a report (lower-case keys), cleaned. Unknown headers are kept
    under their lower-cased header; text before the first header is ``preamble``."""
    out: dict[str, str] = {}
    matches = list(_HEADER.finditer(report))
    if matches and matches[0].start() > 0:
        pre = clean(report[:matches[0].start()])
        if pre:
            out["preamble"] = pre
    elif not matches:
        out["preamble"] = clean(report)
    for k, m in enumerate(matches):
        end = matches[k + 1].start() if k + 1 < len(matches) else len(report)
        body = clean(report[m.end():end])
        header = clean(m.group(1))
        for name in SYNONYMS.get(header, (header.lower(),)):
            out[name] = (out[name] + " " + body).strip() if name in out else body
    if "findings" not in out and "impression" not in out:
        paras = [p for p in re.split(r"\n\s*\n", report.strip()) if p.strip()]
        if paras:
            last = _HEADER.sub("", paras[-1])
            out["last_paragraph"] = clean(last)
    return out


def target_text(sections: dict[str, str], section: str) -> str:
    """The text a report-generation target uses: ``findings``, ``impression`` or ``both``
    (``FINDINGS: ... IMPRESSION: ...``, missing parts left out)."""
    if section == "both":
        parts = [f"{k.upper()}: {sections[k]}" for k in ("findings", "impression") if sections.get(k)]
        return " ".join(parts)
    return sections.get(section, "")


def build_report(findings: str | None, impression: str | None) -> str:
    """A report text with FINDINGS / IMPRESSION headers, as MIMIC-CXR writes them."""
    parts = []
    if findings:
        parts.append(f"FINDINGS:\n{findings}")
    if impression:
        parts.append(f"IMPRESSION:\n{impression}")
    return "\n\n".join(parts) + "\n"
