"""N-gram report-generation metrics: BLEU, ROUGE-L, CIDEr-D, and their named variants.

Each function takes references (one string, or a list of strings, per sample) and one
hypothesis per sample, already normalised (see :mod:`medvl.eval.text`), and returns the
corpus score and the per-sample scores. What each matches (checked by the parity tests
against the live packages and the fixtures of ``shared/METRICS.md``):

* :func:`bleu` — pycocoevalcap ``Bleu(4)`` (Papineni et al. 2002 as coco-caption codes
  it): whitespace tokens, clipped n-gram counts, **corpus** BLEU from summed statistics,
  brevity penalty with the *closest* reference length, and coco-caption's epsilons
  (``(correct + 1e-15) / (guess + 1e-9)``) so a zero count gives ~1e-9, not 0. Per-sample
  values are pycocoevalcap's per-image scores.
* :func:`bleu2_cxr` — CXR-Report-Metric's per-report BLEU-2 (fast_bleu bigram weights
  (1/2, 1/2), nltk smoothing ``method1``, its own tokenisation), a *different* metric,
  named separately.
* :func:`rouge_l` — pycocoevalcap ``Rouge``: LCS F-measure with **beta = 1.2** on
  space-split tokens (case-sensitive), max precision / recall over references, mean over
  samples. LCS lengths use the bit-parallel algorithm (Allison & Dix 1986; Hyyrö 2004).
* :func:`rouge_score_f1` — Google's ``rouge-score`` ROUGE-L / 1 / 2 F1 (lower-cased
  ``[a-z0-9]+`` tokens, optional Porter stemming of tokens longer than 3 characters with
  nltk's ``PorterStemmer``, best reference by F1), the variant HF ``evaluate`` and RadEval use.
* :func:`cider_d` — pycocoevalcap ``Cider`` (= CIDEr-D, Vedantam et al. 2015): TF-IDF
  n-gram vectors (n = 1..4) with document frequencies from the **evaluated references**,
  clipped products, Gaussian length penalty sigma = 6 on bigram counts, x10. A score
  therefore depends on the whole evaluated set.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

from medvl.eval.text import cxr_tokens

TINY, SMALL = 1e-15, 1e-9  # coco-caption's BLEU epsilons


def as_ref_lists(refs: Sequence[str | Sequence[str]]) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in refs]


def _ngrams(words: list[str], n: int) -> Counter:
    c: Counter = Counter()
    for k in range(1, n + 1):
        c.update(zip(*(words[i:] for i in range(k))))
    return c


# ---- BLEU ------------------------------------------------------------------------------

def bleu(refs: Sequence[str | Sequence[str]], hyps: Sequence[str], n: int = 4) -> dict:
    """Corpus BLEU-1..n and per-sample BLEU-1..n (pycocoevalcap semantics)."""
    refs_l = as_ref_lists(refs)
    tot_guess, tot_correct = [0] * n, [0] * n
    tot_test = tot_ref = 0
    per = [[] for _ in range(n)]
    stats = []  # per sample: guess[0..n-1], correct[0..n-1], testlen, reflen
    for rs, h in zip(refs_l, hyps):
        hw = h.split()
        testlen = len(hw)
        ref_words = [r.split() for r in rs]
        reflen = min((abs(len(w) - testlen), len(w)) for w in ref_words)[1]
        maxref: dict = {}
        for w in ref_words:
            for g, c in _ngrams(w, n).items():
                if c > maxref.get(g, 0):
                    maxref[g] = c
        correct = [0] * n
        for g, c in _ngrams(hw, n).items():
            m = maxref.get(g)
            if m:
                correct[len(g) - 1] += min(c, m)
        guess = [max(0, testlen - k) for k in range(n)]
        score, ratio = 1.0, (testlen + TINY) / (reflen + SMALL)
        for k in range(n):
            score *= (correct[k] + TINY) / (guess[k] + SMALL)
            v = score ** (1.0 / (k + 1))
            per[k].append(v * math.exp(1 - 1 / ratio) if ratio < 1 else v)
            tot_guess[k] += guess[k]
            tot_correct[k] += correct[k]
        tot_test += testlen
        tot_ref += reflen
        stats.append(guess + correct + [testlen, reflen])
    corpus = bleu_from_stats([tot_guess + tot_correct + [tot_test, tot_ref]], n)[0]
    out: dict = {f"bleu{k + 1}": float(corpus[k]) for k in range(n)}
    out["per_sample"] = {f"bleu{k + 1}": per[k] for k in range(n)}
    out["stats"] = stats
    return out


def bleu_from_stats(sums, n: int = 4):
    """Corpus BLEU-1..n from summed statistics rows ``[guess*n, correct*n, testlen, reflen]``
    (vectorised over rows, so a bootstrap resamples statistics instead of texts)."""
    import numpy as np

    S = np.asarray(sums, dtype=float)  # [B, 2n + 2]
    guess, correct, test, ref = S[:, :n], S[:, n:2 * n], S[:, 2 * n], S[:, 2 * n + 1]
    logp = np.cumsum(np.log((correct + TINY) / (guess + SMALL)), axis=1)  # [B, n]
    scores = np.exp(logp / np.arange(1, n + 1))
    ratio = (test + TINY) / (ref + SMALL)
    bp = np.where(ratio < 1, np.exp(1 - 1 / np.minimum(ratio, 1.0)), 1.0)
    return scores * bp[:, None]  # [B, n]


def bleu2_cxr(refs: Sequence[str], hyps: Sequence[str]) -> dict:
    """CXR-Report-Metric BLEU-2 per report (nltk ``sentence_bleu`` weights (.5, .5),
    smoothing ``method1`` with epsilon 0.1), on raw text with its own tokenisation."""
    per = []
    for r, h in zip(refs, hyps):
        rw, hw = cxr_tokens(r if isinstance(r, str) else r[0]), cxr_tokens(h)
        if not hw:
            per.append(0.0)
            continue
        rc, hc = _ngrams(rw, 2), _ngrams(hw, 2)
        num = [0, 0]
        den = [max(1, len(hw) - k) for k in range(2)]  # nltk's denominator is at least 1
        for g, c in hc.items():
            num[len(g) - 1] += min(c, rc.get(g, 0))
        if num[0] == 0:  # nltk returns 0 when no unigram matches
            per.append(0.0)
            continue
        logp = 0.0
        for k in range(2):
            logp += 0.5 * math.log((num[k] if num[k] else 0.1) / den[k])
        bp = 1.0 if len(hw) > len(rw) else math.exp(1 - len(rw) / len(hw))
        per.append(bp * math.exp(logp))
    return {"bleu2_cxr": sum(per) / len(per) if per else 0.0, "per_sample": {"bleu2_cxr": per}}


# ---- ROUGE-L ----------------------------------------------------------------------------

def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel over ``a``."""
    if not a or not b:
        return 0
    masks: dict = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(refs: Sequence[str | Sequence[str]], hyps: Sequence[str], beta: float = 1.2) -> dict:
    """pycocoevalcap ROUGE-L: mean over samples of the LCS F-beta (beta = 1.2)."""
    per = []
    for rs, h in zip(as_ref_lists(refs), hyps):
        hw = h.split(" ")
        p_max = r_max = 0.0
        for r in rs:
            rw = r.split(" ")
            lcs = lcs_length(rw, hw)
            p_max = max(p_max, lcs / len(hw))
            r_max = max(r_max, lcs / len(rw))
        per.append(((1 + beta ** 2) * p_max * r_max) / (r_max + beta ** 2 * p_max)
                   if p_max and r_max else 0.0)
    return {"rouge_l": sum(per) / len(per) if per else 0.0, "per_sample": {"rouge_l": per}}


def _rs_tokens(text: str, stemmer) -> list[str]:
    import re
    toks = re.split(r"\s+", re.sub(r"[^a-z0-9]+", " ", text.lower()))
    if stemmer is not None:
        toks = [stemmer.stem(t) if len(t) > 3 else t for t in toks]
    return [t for t in toks if t and re.fullmatch(r"[a-z0-9]+", t)]


def rouge_score_f1(refs: Sequence[str | Sequence[str]], hyps: Sequence[str], kind: str = "rougeL",
                   stem: bool = False) -> dict:
    """rouge-score's F1 (``rougeL``, ``rouge1`` or ``rouge2``), best reference by F1."""
    stemmer = None
    if stem:
        try:
            from nltk.stem import porter
        except ImportError:
            from medvl.errors import MedvlUserError
            raise MedvlUserError("ROUGE with stemming needs nltk's Porter stemmer: pip install 'medvl[eval]'") from None
        stemmer = porter.PorterStemmer()
    cache: dict[str, list[str]] = {}

    def tok(s: str) -> list[str]:
        if s not in cache:
            cache[s] = _rs_tokens(s, stemmer)
        return cache[s]

    per = []
    for rs, h in zip(as_ref_lists(refs), hyps):
        hw = tok(h)
        best = 0.0
        for r in rs:
            rw = tok(r)
            if not rw or not hw:
                f = 0.0
            elif kind == "rougeL":
                lcs = lcs_length(rw, hw)
                p, rc = lcs / len(hw), lcs / len(rw)
                f = 2 * p * rc / (p + rc) if p + rc > 0 else 0.0
            else:
                k = {"rouge1": 1, "rouge2": 2}[kind]
                hc = Counter(zip(*(hw[i:] for i in range(k))))
                rcn = Counter(zip(*(rw[i:] for i in range(k))))
                ov = sum((hc & rcn).values())
                p = ov / max(sum(hc.values()), 1)
                rc = ov / max(sum(rcn.values()), 1)
                f = 2 * p * rc / (p + rc) if p + rc > 0 else 0.0
            best = max(best, f)
        per.append(best)
    name = f"{kind}_f1" + ("_stem" if stem else "")
    return {name: sum(per) / len(per) if per else 0.0, "per_sample": {name: per}}


# ---- CIDEr-D ------------------------------------------------------------------------------

def cider_d(refs: Sequence[str | Sequence[str]], hyps: Sequence[str], n: int = 4, sigma: float = 6.0) -> dict:
    """pycocoevalcap CIDEr-D: mean over samples, per-sample scores."""
    refs_l = as_ref_lists(refs)
    ref_counts = [[_ngrams(r.split(), n) for r in rs] for rs in refs_l]
    df: Counter = Counter()
    for rcs in ref_counts:
        df.update({g for c in rcs for g in c})
    log_n = math.log(float(len(refs_l))) if refs_l else 0.0
    log_df = {g: math.log(max(1.0, v)) for g, v in df.items()}

    def vec(counts: Counter):
        v = [dict() for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            w = tf * (log_n - log_df.get(g, 0.0))
            v[k][g] = w
            norm[k] += w * w
            if k == 1:
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    two_s2 = 2 * sigma ** 2
    per = []
    for rcs, h in zip(ref_counts, hyps):
        vh, nh, lh = vec(_ngrams(h.split(), n))
        total = 0.0
        for rc in rcs:
            vr, nr, lr = vec(rc)
            penalty = math.exp(-((lh - lr) ** 2) / two_s2)
            s = 0.0
            for k in range(n):
                vrk = vr[k]
                val = sum(min(w, vrk[g]) * vrk[g] for g, w in vh[k].items() if g in vrk)
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                s += val * penalty
            total += s / n
        per.append(total / len(rcs) * 10.0)
    return {"cider_d": sum(per) / len(per) if per else 0.0, "per_sample": {"cider_d": per}}


