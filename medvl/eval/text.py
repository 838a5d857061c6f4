"""Text normalisations applied before the n-gram metrics, each selectable by name.

The same BLEU is 0.16 or 0.30 on the same reports depending on these choices
(``shared/METRICS.md`` §9), so every score medvl prints names its normalisation.

* ``raw`` — the text as given, whitespace-split (what RadEval and pycocoevalcap see when
  nothing is done first).
* ``r2gen`` — the cleaning of R2Gen's ``clean_report_mimic_cxr`` (Chen et al., EMNLP 2020,
  github.com/zhjohnchan/R2Gen ``modules/tokenizers.py``), reproduced behaviour for
  behaviour: runs of ``_``, spaces and ``..`` collapsed by a fixed number of pairwise
  replacements, list numbers ``1.`` to ``5.`` removed, lower-cased, split into sentences on
  ``". "``, each sentence stripped of quotes, slashes and the characters of the regex class
  ``[.,?;*!%^&_+():-\\[\\]{}]`` — in which ``:-\\[`` is a *range* (``:`` to ``[``), so
  hyphens survive — and joined with ``" . "`` plus a final ``" ."``.
* ``ptb`` — the Penn-Treebank tokenisation that pycocoevalcap's ``PTBTokenizer`` (Stanford
  CoreNLP 3.4.1, ``-lowerCase``) performs before COCO caption metrics, followed by its
  removal of punctuation tokens. Implemented in Python (no JVM) and checked against the
  Java tokenizer in the parity tests.
* ``cxr`` — CXR-Report-Metric's BLEU-2 tokens: ``text.lower().replace(".", " .").split(" ")``
  (used only by the ``bleu2-cxr`` metric).
"""

from __future__ import annotations

import re
from typing import Callable

from medvl.errors import MedvlUserError

# ---- r2gen -----------------------------------------------------------------------------

_R2GEN_PAIRWISE = [("__", "_")] * 7 + [("  ", " ")] * 6 + [("..", ".")] * 8
_R2GEN_NUMBERS = [("1. ", ""), (". 2. ", ". "), (". 3. ", ". "), (". 4. ", ". "), (". 5. ", ". "),
                  (" 2. ", ". "), (" 3. ", ". "), (" 4. ", ". "), (" 5. ", ". ")]
# the regex class of the reference, written out: . , ? ; * ! % ^ & _ + ( ) and ':'..'[' and ] { }
_R2GEN_STRIP = re.compile(r"[.,?;*!%^&_+()\:-\[\]{}]")


def r2gen_clean(text: str) -> str:
    t = text.replace("\n", " ")
    for a, b in _R2GEN_PAIRWISE + _R2GEN_NUMBERS:
        t = t.replace(a, b)
    sentences = t.strip().lower().split(". ")
    cleaned = []
    for s in sentences:
        s = s.replace('"', "").replace("/", "").replace("\\", "").replace("'", "").strip().lower()
        cleaned.append(_R2GEN_STRIP.sub("", s))
    return " . ".join(cleaned) + " ."


# ---- PTB -------------------------------------------------------------------------------

#: tokens pycocoevalcap drops after tokenising
#: (its list holds -LRB- etc. in upper case, so the lower-cased bracket tokens survive)
PTB_PUNCTUATION = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
#: abbreviations the CoreNLP lexer keeps with their period
PTB_ABBREVIATIONS = ("vs", "etc", "seq", "al", "approx", "dr", "mr", "mrs", "ms", "jr", "sr", "st",
                     "inc", "ltd", "co", "corp", "fig", "figs", "no", "vol", "jan", "feb", "mar", "apr",
                     "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec")
_PTB_TOKEN = re.compile(
    r"""
    \d+(?:[.,:/]\d+)+                # numbers with separators: 2.5, 1,000, 10:30, 1/2
    | (?:[a-z]\.){2,}(?![a-z])       # abbreviations written with periods: e.g. i.e. u.s.
    | \b(?:ABBREV|[a-z])\.(?=\s|$)    # listed abbreviations and initials keep their period
    | _+                             # de-identification blanks (MIMIC's ___) stay one token
    | [a-z0-9]+(?:[-&/][a-z0-9]+)*(?=n't\b)  # word before n't (don't -> do n't)
    | n't\b
    | '(?:s|m|d|ll|re|ve)\b          # clitics
    | [a-z0-9]+(?:[-&/][a-z0-9]+)*   # words; joins by - & / kept whole (right-sided, t2/flair)
    | \.\.\.|--|``|''|[?!]+
    | \S                             # any other symbol on its own
    """.replace("ABBREV", "|".join(PTB_ABBREVIATIONS)),
    re.X,
)
_CANNOT = re.compile(r"\bcannot\b")
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}


def ptb_tokenize(text: str) -> list[str]:
    """Lower-cased PTB tokens, punctuation tokens removed (pycocoevalcap's output)."""
    t = (text.lower().replace("\n", " ").replace('"', " '' ")
         .replace("\u2019", "'").replace("\u2018", "`").replace("\u201c", "``").replace("\u201d", "''")
         .replace("\u2013", " -- ").replace("\u2014", " -- "))
    t = _CANNOT.sub("can not", t)
    toks = [_PTB_BRACKETS.get(m, m) for m in _PTB_TOKEN.findall(t)]
    return [x for x in toks if x not in PTB_PUNCTUATION]


def ptb(text: str) -> str:
    return " ".join(ptb_tokenize(text))


def cxr_tokens(text: str) -> list[str]:
    """CXR-Report-Metric's tokenisation for its BLEU-2."""
    return text.lower().replace(".", " .").split(" ")


NORMALISATIONS: dict[str, Callable[[str], str]] = {
    "raw": lambda s: s,
    "r2gen": r2gen_clean,
    "ptb": ptb,
}


def normalise(texts: list[str], name: str) -> list[str]:
    try:
        fn = NORMALISATIONS[name]
    except KeyError:
        raise MedvlUserError(f"unknown normalisation {name!r}; known: {', '.join(NORMALISATIONS)}") from None
    return [fn(t) for t in texts]
