"""Keep transformers' expected load notices away from the user, and its real warnings in view.

all-MiniLM-L6-v2 (the shipped CLIP's text tower, BERTScore's and SASG's encoder) is a
sentence-transformers checkpoint that carries BERT's pooler, which ``AutoModel`` built without
a pooler, or open_clip (which pools itself), does not use. transformers 5 prints a "LOAD
REPORT" table for those keys on every load, plus a progress bar for ~100 tensors: noise in
every quickstart log. :func:`expected_unused` drops a report only when every key it lists is
an UNEXPECTED key under the given prefixes; any missing or mismatched key, or another
unexpected one, still reaches the user unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Iterator, Sequence

_ROW = re.compile(r"^(\S+)\s*\|\s*(?:\x1b\[[0-9;]*m)?([A-Za-z_]+)")


def _only_expected(message: str, prefixes: Sequence[str]) -> bool:
    rows = [m.groups() for ln in message.splitlines() if (m := _ROW.match(ln.strip())) and m.group(1) != "Key"]
    return bool(rows) and all(st == "UNEXPECTED" and key.startswith(tuple(prefixes)) for key, st in rows)


class _DropExpected(logging.Filter):
    def __init__(self, prefixes: Sequence[str]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("LOAD REPORT" in msg and _only_expected(msg, self.prefixes))


@contextlib.contextmanager
def expected_unused(prefixes: Sequence[str] = ("pooler.",)) -> Iterator[None]:
    """Within the block: no weight-loading progress bar, no load report of expected unused keys."""
    from transformers.utils import logging as hf_logging
    flt = _DropExpected(prefixes)
    loggers = [logging.getLogger("transformers.modeling_utils"), logging.getLogger("transformers")]
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    for lg in loggers:
        lg.addFilter(flt)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(flt)
        if bar:
            hf_logging.enable_progress_bar()
