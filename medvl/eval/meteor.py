"""METEOR: the METEOR 1.5 jar through one long-lived JVM, or a native approximation.

``meteor`` (:class:`MeteorJar`) is the number papers report: pycocoevalcap's
``Meteor`` — ``meteor-1.5.jar - - -stdio -l en -norm`` (Denkowski & Lavie, WMT 2014) with
its paraphrase table — returning the jar's **corpus** score (statistics aggregated over
segments, not the mean of per-segment scores) and the per-segment scores. medvl talks the
jar's stdio protocol itself (``SCORE`` lines for statistics, one ``EVAL`` line for the
scores) through a single process started on first use and reused, with a writer thread
so that thousands of segments stream without a pipe deadlock. Needs Java and the jar
shipped in the ``pycocoevalcap`` wheel (``pip install 'medvl[eval]'``).

``meteor-native`` (:func:`meteor_native`) needs neither: the METEOR 1.5 scoring formula
(parameters alpha 0.85, beta 0.20, gamma 0.60, delta 0.75; module weights exact 1.0,
stem 0.6) over an alignment from the exact and Porter-stem modules only (medvl's own
Porter stemmer, :mod:`medvl.eval.porter`; the jar uses Snowball) (no WordNet
synonyms, no paraphrase table), with medvl's own function-word list and a greedy
alignment that prefers continuing chunks instead of the jar's beam search. It is **not**
the jar's number: docs/evaluation.md records the measured difference. It is named
differently so the two are never mixed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Sequence

from medvl.errors import MedvlUserError
from medvl.eval.nlg import as_ref_lists
from medvl.eval.porter import stem

# ---- the jar ------------------------------------------------------------------------------


def find_meteor_jar() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("pycocoevalcap")  # a namespace package: no __file__
    for root in (spec.submodule_search_locations or []) if spec else []:
        jar = Path(root) / "meteor" / "meteor-1.5.jar"
        if jar.exists():
            return jar
    return None


def jar_available() -> bool:
    return find_meteor_jar() is not None and shutil.which("java") is not None


class MeteorJar:
    """One METEOR 1.5 JVM, started lazily, reused for every call, closed at exit."""

    _instance: "MeteorJar | None" = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        jar = find_meteor_jar()
        if jar is None or shutil.which("java") is None:
            raise MedvlUserError("METEOR (jar) needs Java and pycocoevalcap: install a JRE and "
                                 "pip install 'medvl[eval]', or use the metric 'meteor-native'")
        self.proc = subprocess.Popen(
            ["java", "-jar", "-Xmx2G", str(jar), "-", "-", "-stdio", "-l", "en", "-norm"],
            cwd=str(jar.parent), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=dict(os.environ, LC_ALL="C.UTF-8"))

    @classmethod
    def shared(cls) -> "MeteorJar":
        with cls._lock:
            if cls._instance is None or cls._instance.proc.poll() is not None:
                cls._instance = cls()
            return cls._instance

    def _stream(self, lines: list[str], n_out: int) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None

        def write() -> None:
            for ln in lines:
                self.proc.stdin.write((ln + "\n").encode("utf-8"))
            self.proc.stdin.flush()

        t = threading.Thread(target=write, daemon=True)
        t.start()
        out = [self.proc.stdout.readline().decode("utf-8").strip() for _ in range(n_out)]
        t.join()
        return out

    def score(self, refs: Sequence[Sequence[str]], hyps: Sequence[str]) -> tuple[float, list[float]]:
        with self._lock:
            score_lines = []
            for rs, h in zip(refs, hyps):
                h = h.replace("|||", "").replace("  ", " ")
                score_lines.append(" ||| ".join(["SCORE", " ||| ".join(rs), h]))
            stats = self._stream(score_lines, len(score_lines))
            out = self._stream(["EVAL ||| " + " ||| ".join(stats)], len(stats) + 1)
        try:
            per = [float(x) for x in out[:-1]]
            return float(out[-1]), per
        except ValueError:
            raise MedvlUserError(f"the METEOR jar returned an unexpected line: {out[-1][:200]!r}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


def meteor_jar(refs: Sequence[str | Sequence[str]], hyps: Sequence[str]) -> dict:
    corpus, per = MeteorJar.shared().score(as_ref_lists(refs), list(hyps))
    return {"meteor": corpus, "per_sample": {"meteor": per}}


# ---- native -------------------------------------------------------------------------------

ALPHA, BETA, GAMMA, DELTA = 0.85, 0.20, 0.60, 0.75
W_EXACT, W_STEM = 1.0, 0.6

#: closed-class English words (articles, pronouns, prepositions, conjunctions, auxiliaries,
#: determiners); punctuation tokens are function words too. Written for medvl.
FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every either neither no nor not all both half
i me my mine myself you your yours yourself yourselves he him his himself she her hers herself
it its itself we us our ours ourselves they them their theirs themselves one ones
who whom whose which what whatever whichever whoever where when why how whether
and or but if then else than so yet because although though while unless until since as
of in on at by for with without within into onto from to toward towards over under above below
between among through throughout during before after about against along across around behind
beyond beside besides near off out up down upon via per like unlike despite except
be am is are was were been being have has had having do does did doing done
will would shall should can could may might must ought
there here also too very just only even still again ever never
s 's 't n't 'll 're 've 'd 'm
""".split())
_NATIVE_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[^\sa-z0-9]")


def _tokens(text: str) -> list[str]:
    return _NATIVE_TOKEN.findall(text.lower())


def _is_function(tok: str) -> bool:
    return tok in FUNCTION_WORDS or not tok[0].isalnum()


def _align(h: list[str], r: list[str], stem) -> list[tuple[int, int, float]]:
    """(hyp index, ref index, module weight) one-to-one matches: exact first, then stem;
    within a stage each hypothesis word takes the free reference position that continues
    the previous match, else the nearest one."""
    pairs: list[tuple[int, int, float]] = []
    used_h: set[int] = set()
    used_r: set[int] = set()
    for weight, key in ((W_EXACT, lambda w: w), (W_STEM, stem)):
        ref_pos: dict[str, list[int]] = {}
        for j, w in enumerate(r):
            if j not in used_r:
                ref_pos.setdefault(key(w), []).append(j)
        by_h = {i: j for i, j, _ in pairs}
        for i, w in enumerate(h):
            if i in used_h:
                continue
            cands = [j for j in ref_pos.get(key(w), []) if j not in used_r]
            if not cands:
                continue
            prev = by_h.get(i - 1)
            target = prev + 1 if prev is not None else (i * len(r) / max(len(h), 1))
            j = min(cands, key=lambda c: (abs(c - target), c))
            pairs.append((i, j, weight))
            by_h[i] = j
            used_h.add(i)
            used_r.add(j)
    return sorted(pairs)


def _stats(h: list[str], r: list[str], stem) -> tuple[float, ...]:
    pairs = _align(h, r, stem)
    hc = sum(1 for w in h if not _is_function(w))
    rc = sum(1 for w in r if not _is_function(w))
    mh_c = mh_f = mr_c = mr_f = 0.0
    for i, j, wt in pairs:
        if _is_function(h[i]):
            mh_f += wt
        else:
            mh_c += wt
        if _is_function(r[j]):
            mr_f += wt
        else:
            mr_c += wt
    chunks, prev = 0, None
    for i, j, _ in pairs:
        if prev is None or not (i == prev[0] + 1 and j == prev[1] + 1):
            chunks += 1
        prev = (i, j)
    return (hc, len(h) - hc, rc, len(r) - rc, mh_c, mh_f, mr_c, mr_f, chunks, len(pairs))


def _score(st: Sequence[float]) -> float:
    hc, hf, rc, rf, mh_c, mh_f, mr_c, mr_f, chunks, m = st
    p_den = DELTA * hc + (1 - DELTA) * hf
    r_den = DELTA * rc + (1 - DELTA) * rf
    if m == 0 or p_den == 0 or r_den == 0:
        return 0.0
    p = (DELTA * mh_c + (1 - DELTA) * mh_f) / p_den
    r = (DELTA * mr_c + (1 - DELTA) * mr_f) / r_den
    if p == 0 or r == 0:
        return 0.0
    fmean = p * r / (ALPHA * p + (1 - ALPHA) * r)
    # a hypothesis that is the reference, matched in one chunk, gets no penalty (as the jar)
    frag = 0.0 if chunks == 1 and m == hc + hf == rc + rf else chunks / m
    return (1 - GAMMA * frag ** BETA) * fmean


def meteor_from_stats(summed: Sequence[float]) -> float:
    """Corpus METEOR (native) from summed per-segment statistics."""
    return _score(summed)


def meteor_native(refs: Sequence[str | Sequence[str]], hyps: Sequence[str]) -> dict:
    """Approximate METEOR 1.5 (exact + stem modules); corpus score from summed statistics,
    best reference per segment by score."""
    per, total, stats = [], [0.0] * 10, []
    for rs, hyp in zip(as_ref_lists(refs), hyps):
        h = _tokens(hyp)
        best = max((_stats(h, _tokens(r), stem) for r in rs), key=_score)
        per.append(_score(best))
        stats.append(best)
        total = [a + b for a, b in zip(total, best)]
    return {"meteor_native": _score(total), "per_sample": {"meteor_native": per}, "stats": stats}
