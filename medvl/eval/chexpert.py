"""A rule-based labeler for the 14 CheXpert observations, and CheXbert-style scores.

The CheXpert labeler (Irvin et al., AAAI 2019; github.com/stanfordmlgroup/chexpert-labeler)
finds *mentions* with phrase lists, then classifies each mention with Semgrex patterns over
a dependency parse: pre-negation uncertainty, then negation, then post-negation
uncertainty, else positive; mentions are aggregated per observation (positive over
uncertain over negative) and "No Finding" is positive only when no other pathology is
positive or uncertain. The parser it needs is not available offline, so medvl keeps the
published phrase lists (``chexpert_phrases/``, MIT) and replaces the parse patterns with
its own cue-and-scope rules that cover what the patterns mean:

* **scope**: a sentence (split at ``.``/``!``/``?``, newlines, ``;`` and numbered items),
  cut at clause breaks (``but``, ``however``, ``although``, ``which``, ``except`` ...). Cues
  before a mention reach it over lists of findings ("no effusion, pneumothorax, or focal
  consolidation") but not over a new clause; cues after it ("heart size is normal",
  "effusion has resolved") reach back over "and" lists ("effusion and edema are not seen").
* **pre-negation uncertainty** (checked first): "cannot exclude", "cannot be excluded",
  "not excluded", "cannot rule out", "no evidence to rule out", "no new ...".
* **negation**: no, not, without, negative for, free of, absence of, resolution / resolved,
  removal / removed, clearing, history of, ruled out, normal, unremarkable, clear, within
  normal limits, upper limits of normal, not seen / not identified / absent.
* **post-negation uncertainty**: possible, probable, questionable, suspect(ed), suspicious
  for, concern for, question of, suggestion of, may / might / could / would, maybe,
  "may represent", versus, either-or coordination ("atelectasis or consolidation"),
  differential, secondary to, compatible with, correlate clinically, borderline, less
  likely, not well seen / evaluated, obscured; "stable" / "unchanged" heart size or
  silhouette (the labeler's added rules); vascular / pulmonary congestion, indistinctness
  and vascular prominence (always uncertain edema).

"unchanged" and "stable" otherwise leave a finding positive ("unchanged effusion"), as in
the reference, and so does an enlargement called stable ("stable enlargement of the heart").

Corrections from reading its errors against expert labels (issue 34, 2026-12-07; each a test):
a predicate shared by two subjects reaches the first ("the heart size *and pulmonary vascularity
appear* within normal limits": the scope crosses "and" when a plural verb follows the second
noun phrase); "of normal size" negates; an adverb inside a negated predicate is skipped ("is not
significantly enlarged", "grossly unremarkable"); "no (significant / interval) change in X" leaves X
positive; a hedged negative ("may not be demonstrated") is uncertain; "plate" no longer matches
inside "endplate", and lung fibrosis is not Pleural Other (two unmention lists of medvl's own). The labeler reproduces the labeler's published output on its sample
reports exactly (tested), and is checked on report language in the tests.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

OBSERVATIONS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion",
                "Lung Opacity", "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
                "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
TOP5 = ["Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion"]
POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
BLANK = math.nan
PHRASES_DIR = Path(__file__).resolve().parent / "chexpert_phrases"
_OTHER_FINDINGS = "other finding"  # the no_finding.txt list: abnormalities outside the 13

# ---- cue lists (medvl's own) ---------------------------------------------------------------

PRE_UNCERTAIN = [r"cannot exclude", r"can not exclude", r"cannot rule out", r"can not rule out",
                 r"no evidence to rule out", r"no new", r"not excluded", r"cannot be excluded",
                 r"not be excluded", r"not ruled out"]
POST_UNCERTAIN_FIRST = [r"cannot be excluded", r"can not be excluded", r"(?:is|are) not excluded",
                        r"not be excluded", r"cannot be ruled out", r"not (?:been )?ruled out",
                        r"(?:may|might|could|would) not be (?:seen|demonstrated|visualized|identified|appreciated|"
                        r"detected|evident|apparent)"]
#: "no (significant / interval) change in X": X is there, unchanged — not a negation of X
NO_CHANGE_IN = re.compile(r"(?<![a-z])no (?:\w+ )?changes? (?:in|of)(?: the| a)?(?: \w+){0,3}$")
PRE_NEGATION = [r"no", r"not", r"without", r"negative for", r"free of", r"absence of", r"absent",
                r"resolution of", r"resolved", r"removal of", r"removed", r"clearing of", r"cleared",
                r"history of", r"disappearance of", r"drainage of", r"rule out", r"ruled out",
                r"normal", r"unremarkable", r"clear", r"within normal limits", r"never"]
_ADVERB = r"(?:(?:significantly|substantially|markedly|definitely|clearly|grossly|appreciably|currently|now) )?"
POST_NEGATION = [r"(?:is|are|was|were|appears?|remains?)?\s*(?:now\s+)?(?:grossly\s+)?(?:normal|unremarkable)",
                 r"(?:is|are|was|were|appears?|remains?)? ?of normal (?:size|caliber|calibre)",
                 r"within normal limits", r"(?:at )?(?:the )?upper limits? of normal", r"is clear",
                 r"are clear", r"(?:is|are|was|were|has been|have been) (?:not|no longer) " + _ADVERB + r"(?:seen|"
                 r"identified|present|visualized|demonstrated|appreciated|evident|enlarged)",
                 r"not " + _ADVERB + r"(?:seen|identified|present|enlarged)", r"absent", r"(?:has|have)? ?(?:since )?resolved",
                 r"(?:has|have) been removed", r"removed", r"ruled out", r"excluded", r"not enlarged",
                 r"no longer (?:seen|present|visualized)"]
PRE_UNCERTAIN_LATE = [r"possible", r"possibly", r"presumably", r"presumed", r"probable", r"probably",
                      r"questionable", r"question of", r"suggestion of", r"suspect", r"suspected",
                      r"suspicious for", r"suspicion (?:of|for)", r"concern(?:ing)? for", r"worrisome for",
                      r"may", r"might", r"could", r"would", r"maybe", r"can represent", r"can reflect",
                      r"versus", r"vs", r"or", r"and/or", r"differential", r"secondary to",
                      r"compatible with", r"correlate clinically", r"clinical correlation",
                      r"borderline", r"less likely", r"equivocal", r"indeterminate", r"cannot"]
#: coordination that makes both findings uncertain, right after the mention ("X or Y")
POST_ALTERNATIVE = [r"or", r"versus", r"vs", r"and/or"]
POST_UNCERTAIN = [r"(?:is|are|was|were)? ?suspected", r"(?:is|are) (?:questionable|possible|likely)",
                  r"(?:could|may|might|can) be (?:present|seen)",
                  r"not (?:well|clearly) (?:seen|visualized|evaluated|assessed)",
                  r"(?:poorly|incompletely) (?:seen|visualized|evaluated|assessed)", r"obscured",
                  r"not (?:be )?appreciated", r"could appear", r"(?:is|are) not well"]
CARDIAC_WORDS = re.compile(r"cardiomediastinal|pericardial|mediastin|contour|configuration|"
                           r"silhouette|size|heart|shadow")
STABLE_CUE = [r"stable", r"unchanged", r"not changed", r"similar to prior", r"similar to the prior",
              r"no change", r"not significantly changed"]
ENLARGED = re.compile(r"enlarg|cardiomegaly|widen")
ALWAYS_UNCERTAIN = re.compile(r"vascular congestion|pulmonary congestion|indistinctness|vascular prominence")

BREAKS = {"but", "however", "although", "though", "which", "whereas", "while", "except",
          "aside", "apart", "otherwise", "given", "since", "because"}
NEW_CLAUSE_AFTER_AND = {"the", "a", "an", "there", "no", "it", "this", "these", "that", "is", "are",
                        "heart", "lungs", "lung", "cardiac", "mediastinal", "interval", "pulmonary",
                        "osseous", "bony", "visualized", "mild", "moderate", "severe", "small",
                        "large", "new", "stable", "unchanged"}
#: a word after "and" that starts a new noun phrase but can share the mention's predicate ("the heart size
#: and pulmonary vascularity appear within normal limits": both are normal)
SHARED_SUBJECT_AFTER_AND = {"heart", "lungs", "lung", "cardiac", "mediastinal", "pulmonary", "osseous", "bony"}
PLURAL_VERBS = {"are", "appear", "remain", "were", "have", "look", "demonstrate"}
PRE_WINDOW, POST_WINDOW = 12, 10

_SENT_SPLIT = re.compile(r"(?<!\d)[.!?](?!\d)|\n|;|\s(?=\d+[.)]\s)")
_TOKEN = re.compile(r"[a-z0-9]+(?:[-/][a-z0-9]+)*|,|:")


@dataclass
class Mention:
    observation: str
    start: int  # token index
    end: int  # exclusive
    text: str
    label: float = POSITIVE


def _cue_regex(cues: list[str]) -> re.Pattern:
    return re.compile(r"(?<![a-z0-9])(?:" + "|".join(cues) + r")(?![a-z0-9])")


_RE_PRE_UNC = _cue_regex(PRE_UNCERTAIN)
_RE_POST_UNC_FIRST = _cue_regex(POST_UNCERTAIN_FIRST)
_RE_PRE_NEG = _cue_regex(PRE_NEGATION)
_RE_POST_NEG = _cue_regex(POST_NEGATION)
_RE_PRE_UNC_LATE = _cue_regex(PRE_UNCERTAIN_LATE)
_RE_POST_UNC = _cue_regex(POST_UNCERTAIN)
_RE_STABLE = _cue_regex(STABLE_CUE)
_RE_POST_ALT = _cue_regex(POST_ALTERNATIVE)


def _file_name(obs: str) -> str:
    return obs.lower().replace(" ", "_")


@lru_cache(maxsize=4)
def _load_phrases(root: str) -> tuple[list[tuple[str, re.Pattern]], dict[str, re.Pattern | None]]:
    base = Path(root)
    mentions: list[tuple[str, re.Pattern]] = []
    unmentions: dict[str, re.Pattern | None] = {}
    for obs in OBSERVATIONS + [_OTHER_FINDINGS]:
        name = "no_finding" if obs == _OTHER_FINDINGS else _file_name(obs)
        if obs == "No Finding":
            continue
        p = base / "mention" / f"{name}.txt"
        phrases = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []
        if phrases:
            mentions.append((obs, re.compile("|".join(_phrase_re(x) for x in sorted(phrases, key=len, reverse=True)))))
        u = base / "unmention" / f"{name}.txt"
        uphr = [ln.strip() for ln in u.read_text().splitlines() if ln.strip()] if u.exists() else []
        unmentions[obs] = re.compile("|".join(_phrase_re(x) for x in uphr)) if uphr else None
    return mentions, unmentions


def _phrase_re(phrase: str) -> str:
    """Phrases match as substrings, as in the reference ("mediastinal silhouette" is found
    in "cardiomediastinal silhouette"); ``_`` in the lists stands for a word boundary
    (``_line_`` is the word "line", ``_mediastinum`` is not "cardiomediastinum")."""
    core = re.escape(phrase.strip("_").replace("_", " "))
    left = r"(?<![a-z0-9])" if phrase.startswith("_") else ""
    right = r"(?![a-z0-9])" if phrase.endswith("_") else ""
    return left + core + right


class CheXpertLabeler:
    """``label(report)`` -> {observation: 1.0 positive / 0.0 negative / -1.0 uncertain / nan}."""

    def __init__(self, phrases_dir: str | Path = PHRASES_DIR):
        self.mentions, self.unmentions = _load_phrases(str(phrases_dir))

    # -- sentence and mention finding ------------------------------------------------------
    @staticmethod
    def sentences(report: str) -> list[str]:
        text = report.lower().replace("\r", "\n")
        return [s.strip() for s in _SENT_SPLIT.split(text) if s and s.strip()]

    def find_mentions(self, sentence: str) -> tuple[list[str], list[tuple[int, int]], list[Mention]]:
        toks = [(m.group(0), m.start(), m.end()) for m in _TOKEN.finditer(sentence)]
        words = [t for t, _, _ in toks]
        starts, ends = [a for _, a, _ in toks], [b for _, _, b in toks]
        out: list[Mention] = []
        for obs, rx in self.mentions:
            un = self.unmentions.get(obs)
            blocked = [(m.start(), m.end()) for m in un.finditer(sentence)] if un else []
            for m in rx.finditer(sentence):
                if blocked and any(a <= m.start() < b for a, b in blocked):
                    continue
                # the tokens the match overlaps, by bisection (a scan per match was quadratic: a
                # 4,000-word sentence of mentions took 2.6 s)
                first, last = bisect_right(ends, m.start()), bisect_left(starts, m.end())
                if first < last:
                    out.append(Mention(obs, first, last, m.group(0)))
        return words, list(zip(starts, ends)), out

    # -- scopes ----------------------------------------------------------------------------
    @staticmethod
    def _pre_scope(words: list[str], start: int) -> str:
        k = start
        while k > 0 and start - k < PRE_WINDOW:
            w = words[k - 1]
            if w in BREAKS or w == ":":
                break
            if w in ("with", "and") and k - 1 > 0 and words[k - 2] not in (",", "or", "and"):
                # "X with Y" / "X and there is Y": the cue before X does not reach Y unless the
                # words in between are a list (",", "or")
                if w == "with":
                    break
            k -= 1
        return " ".join(words[k:start])

    @staticmethod
    def _post_scope(words: list[str], end: int) -> str:
        k = end
        while k < len(words) and k - end < POST_WINDOW:
            w = words[k]
            if w in BREAKS or w in (":", "with", "without"):
                break
            if w in ("and", ",") and k + 1 < len(words) and words[k + 1] in NEW_CLAUSE_AFTER_AND:
                if not (w == "and" and words[k + 1] in SHARED_SUBJECT_AFTER_AND and _shared_predicate(words, k + 1)):
                    break
            k += 1
        return " ".join(words[end:k])

    def classify(self, words: list[str], m: Mention) -> float:
        pre = self._pre_scope(words, m.start)
        post = self._post_scope(words, m.end)
        near_pre = " ".join(pre.split()[-4:])
        if _RE_PRE_UNC.search(pre) or _RE_POST_UNC_FIRST.search(post):
            return UNCERTAIN
        negated_before = _RE_PRE_NEG.search(pre) and not NO_CHANGE_IN.search(pre)
        if negated_before or _RE_POST_NEG.match(post.lstrip(", ")) or _post_neg_anywhere(post):
            return NEGATIVE
        if m.observation == "Edema" and ALWAYS_UNCERTAIN.search(m.text + " " + post[:30]):
            return UNCERTAIN
        if CARDIAC_WORDS.search(m.text) and not ENLARGED.search(m.text + " " + near_pre) \
                and (_RE_STABLE.search(near_pre) or _RE_STABLE.search(post)):
            return UNCERTAIN  # "stable heart size" does not say enlarged; "stable enlargement of the heart" does
        if _RE_PRE_UNC_LATE.search(pre) or _RE_POST_UNC.search(post) or _RE_POST_ALT.match(post.lstrip(", ")):
            return UNCERTAIN
        return POSITIVE

    # -- whole reports ---------------------------------------------------------------------
    def label_mentions(self, report: str) -> list[Mention]:
        out = []
        for sent in self.sentences(report):
            words, _, mentions = self.find_mentions(sent)
            for m in mentions:
                m.label = self.classify(words, m)
                out.append(m)
        return out

    def label(self, report: str) -> dict[str, float]:
        """The 14 labels of one report. An empty text gets none at all (every label blank — "No
        Finding" included): nothing was said, so nothing is labelled."""
        if not isinstance(report, str) or not report.strip():
            return {o: BLANK for o in OBSERVATIONS}
        found: dict[str, list[float]] = {}
        for m in self.label_mentions(report):
            found.setdefault(m.observation, []).append(m.label)
        out = {o: BLANK for o in OBSERVATIONS}
        for obs, labels in found.items():
            if obs == _OTHER_FINDINGS:
                continue
            out[obs] = POSITIVE if POSITIVE in labels else UNCERTAIN if UNCERTAIN in labels else NEGATIVE
        abnormal = [o for o in OBSERVATIONS if o not in ("No Finding", "Support Devices")
                    and out[o] in (POSITIVE, UNCERTAIN)]
        other = found.get(_OTHER_FINDINGS, [])
        if not abnormal and POSITIVE not in other and UNCERTAIN not in other:
            out["No Finding"] = POSITIVE
        return out

    def label_many(self, reports: Iterable[str]) -> list[dict[str, float]]:
        return [self.label(r) for r in reports]


def _shared_predicate(words: list[str], j: int) -> bool:
    """Whether the noun phrase at ``words[j]`` after "and" is the second subject of one plural verb
    ("X and pulmonary vascularity *are* normal") rather than the start of a new clause: a plural verb
    within four words, before any singular verb, comma or clause break."""
    for t in range(j, min(j + 5, len(words))):
        if words[t] in PLURAL_VERBS:
            return True
        if words[t] in ("is", "was", "has", ",", ":") or words[t] in BREAKS:
            return False
    return False


def _post_neg_anywhere(post: str) -> bool:
    """Negating phrases that may follow the mention after a list ("effusion and edema are
    not seen"): only the unambiguous verb phrases, anywhere in the post scope."""
    return bool(re.search(r"(?<![a-z])(?:(?:is|are|was|were|has been|have been) (?:not|no longer) "
                          r"(?:seen|identified|present|visualized|demonstrated|evident)|have resolved|"
                          r"has resolved|(?:is|are|appears?|remains?) (?:grossly )?(?:normal|unremarkable|absent)|"
                          r"resolved|upper limits? of normal|within normal limits|of normal size)(?![a-z])", post))


# ---- clinical-efficacy scores ---------------------------------------------------------------

def binarise(labels: dict[str, float], uncertain: str = "positive") -> list[int]:
    """14 labels -> 0/1: positive -> 1; uncertain -> 1 (``positive``) or 0 (``negative``);
    negative and blank -> 0."""
    if uncertain not in ("positive", "negative"):
        raise ValueError("uncertain must be 'positive' or 'negative'")
    u = 1 if uncertain == "positive" else 0
    out = []
    for o in OBSERVATIONS:
        v = labels.get(o, BLANK)
        out.append(1 if v == POSITIVE else u if v == UNCERTAIN else 0)
    return out


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def clinical_efficacy(ref_labels: Sequence[dict[str, float]], hyp_labels: Sequence[dict[str, float]],
                      uncertain: str = "positive") -> dict:
    """Micro / macro precision, recall, F1 over the 14 observations and over the 5 main ones
    (CheXbert's top 5), with sklearn's ``zero_division=0`` convention, plus per-label values.

    ``uncertain="positive"`` (default) is F1CheXbert's "rrg" convention used by recent
    report-generation papers; ``"negative"`` is R2Gen's ``compute_ce.py`` convention.
    """
    R = [binarise(x, uncertain) for x in ref_labels]
    H = [binarise(x, uncertain) for x in hyp_labels]
    per_label = {}
    for j, o in enumerate(OBSERVATIONS):
        tp = sum(1 for r, h in zip(R, H) if r[j] and h[j])
        fp = sum(1 for r, h in zip(R, H) if not r[j] and h[j])
        fn = sum(1 for r, h in zip(R, H) if r[j] and not h[j])
        p, rc, f = _prf(tp, fp, fn)
        per_label[o] = {"precision": p, "recall": rc, "f1": f, "support": tp + fn, "tp": tp, "fp": fp, "fn": fn}
    out: dict = {"uncertain_as": uncertain, "per_label": per_label}
    for tag, names in (("14", OBSERVATIONS), ("5", TOP5)):
        tp = sum(per_label[o]["tp"] for o in names)
        fp = sum(per_label[o]["fp"] for o in names)
        fn = sum(per_label[o]["fn"] for o in names)
        p, rc, f = _prf(tp, fp, fn)
        out[f"micro_precision_{tag}"], out[f"micro_recall_{tag}"], out[f"micro_f1_{tag}"] = p, rc, f
        for k in ("precision", "recall", "f1"):
            out[f"macro_{k}_{tag}"] = sum(per_label[o][k] for o in names) / len(names)
    return out
