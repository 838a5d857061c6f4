"""medvl's own canonical JSONL (see :mod:`medvl.data.schema`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medvl.data.formats.base import Conversion, Format, register_format
from medvl.data.schema import Sample, load_jsonl_report, write_jsonl


@register_format
class CanonicalFormat(Format):
    name = "medvl"
    description = "medvl canonical JSONL: one sample per line (id, images, conversation, boxes, labels, ...)"
    layout = "a .jsonl file"

    def read(self, path: Path, **options: Any) -> Conversion:
        samples, errors = load_jsonl_report(path)
        out = Conversion(samples=samples)
        for lineno, err in errors:
            out.skip(lineno - 1, None, f"line {lineno}: {err}")
        return out

    def write(self, samples: list[Sample], path: Path, **options: Any) -> Conversion:
        return Conversion(written=write_jsonl(samples, path))
