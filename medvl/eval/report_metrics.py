"""The report-generation metrics, one registered object each (exact names, :class:`Registry`).

A metric says what text it reads (``normalised``: the references and predictions after the
run's normalisation, its keys tagged ``[r2gen]``; ``raw``: the texts as given, for metrics with
their own tokenisation: the METEOR jar, BERTScore, the CheXpert labeler, rouge-score,
CXR-Report-Metric's BLEU-2), whether higher is better, and how it is computed: per corpus
(``scores``), per sample (``per_sample``, which :func:`medvl.eval.suites.evaluate_reports`
bootstraps by resampling when the metric is a mean over samples) and, where a corpus score is
not a mean (BLEU, CheXpert F1), its own bootstrap. Adding a metric is one ``register`` here and
its test; ``medvl eval report --metrics`` and its help read the names from this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from medvl.eval import bootstrap as bs
from medvl.eval import meteor  # by module: whether the jar is available is decided per call
from medvl.eval import nlg
from medvl.eval.bertscore import BERTScorer
from medvl.eval.chexpert import CheXpertLabeler, clinical_efficacy
from medvl.registry import Registry


@dataclass
class MetricInput:
    refs: list[str]
    """references as given"""
    hyps: list[str]
    R: list[str]
    """references after the run's normalisation"""
    H: list[str]
    tag: str
    """the normalisation's key suffix, e.g. ``[r2gen]``"""
    bootstrap: int = 0
    seed: int = 0
    progress: bool = False
    uncertain: str = "positive"
    bertscore_model: str | None = None
    bertscore_layers: int | None = None
    bertscore_idf: bool = False


@dataclass
class MetricOutput:
    scores: dict[str, float] = field(default_factory=dict)
    per_sample: dict[str, list[float]] = field(default_factory=dict)
    ci: dict[str, dict] = field(default_factory=dict)
    """intervals the metric computes itself (corpus scores that are not means over samples)"""
    stats: dict[str, list] = field(default_factory=dict)
    """per-sample sufficient statistics, by score key"""
    extra: dict[str, Any] = field(default_factory=dict)
    """notes and breakdowns that go into the result beside the scores"""

    def add(self, res: dict, suffix: str = "") -> MetricOutput:
        """Merge one of :mod:`medvl.eval.nlg`'s result dicts (scores, ``per_sample``, ``stats``)."""
        for k, v in res.items():
            if k == "stats":
                self.stats[next(iter(res["per_sample"])) + suffix] = v
            elif k != "per_sample":
                self.scores[k + suffix] = v
        for k, v in res.get("per_sample", {}).items():
            self.per_sample[k + suffix] = v
        return self


@dataclass(frozen=True)
class ReportMetric:
    name: str
    about: str
    compute: Callable[[MetricInput], MetricOutput]
    text: str = "normalised"
    """normalised | raw: what the metric reads"""
    higher_is_better: bool = True


REPORT_METRICS: Registry[ReportMetric] = Registry("report metric")
DEFAULT_REPORT_METRICS = ("bleu", "rouge-l", "cider-d", "meteor", "chexpert")


def _metric(name: str, about: str, text: str = "normalised"):
    def wrap(fn: Callable[[MetricInput], MetricOutput]):
        REPORT_METRICS.register(name, ReportMetric(name, about, fn, text))
        return fn
    return wrap


@_metric("bleu", "BLEU-1..4 (pycocoevalcap); bootstrap resamples the per-sample n-gram statistics")
def _bleu(x: MetricInput) -> MetricOutput:
    res = nlg.bleu(x.R, x.H)
    out = MetricOutput().add(res, x.tag)
    if x.bootstrap:  # exact corpus BLEU per draw
        n = len(x.R)
        st = np.asarray(res["stats"], dtype=float)
        idx = np.random.default_rng(x.seed).integers(0, n, (x.bootstrap, n))
        draws = nlg.bleu_from_stats(st[idx].sum(axis=1))  # [B, 4]
        for k in range(4):
            lo, hi = np.percentile(draws[:, k], [2.5, 97.5])
            out.ci[f"bleu{k + 1}{x.tag}"] = {"low": float(lo), "high": float(hi), "std": float(draws[:, k].std()),
                                             "n_boot": x.bootstrap, "seed": x.seed, "level": 0.95}
    return out


@_metric("bleu2-cxr", "CXR-Report-Metric's sentence BLEU-2 (its own tokenisation)", text="raw")
def _bleu2_cxr(x: MetricInput) -> MetricOutput:
    return MetricOutput().add(nlg.bleu2_cxr(x.refs, x.hyps))


@_metric("rouge-l", "ROUGE-L F (pycocoevalcap, beta 1.2)")
def _rouge_l(x: MetricInput) -> MetricOutput:
    return MetricOutput().add(nlg.rouge_l(x.R, x.H), x.tag)


def _rouge_score(kind: str, stem: bool = False):
    def compute(x: MetricInput) -> MetricOutput:
        return MetricOutput().add(nlg.rouge_score_f1(x.refs, x.hyps, kind, stem=stem))
    return compute


for _name, _kind, _stem in (("rouge-score-l", "rougeL", False), ("rouge-score-l-stem", "rougeL", True),
                            ("rouge-score-1", "rouge1", False), ("rouge-score-2", "rouge2", False)):
    REPORT_METRICS.register(_name, ReportMetric(_name, f"Google rouge-score {_kind} F1{' (Porter stems)' if _stem else ''}",
                                                _rouge_score(_kind, _stem), text="raw"))


@_metric("cider-d", "CIDEr-D (pycocoevalcap: document frequencies from the references, sigma 6, x10)")
def _cider_d(x: MetricInput) -> MetricOutput:
    return MetricOutput().add(nlg.cider_d(x.R, x.H), x.tag)


@_metric("meteor", "METEOR 1.5: the jar when Java and pycocoevalcap are installed, else meteor_native (the key "
         "says which)", text="raw")
def _meteor(x: MetricInput) -> MetricOutput:
    if meteor.jar_available():
        return MetricOutput(extra={"meteor_ci_note": "no CI for the jar's corpus METEOR (its statistics are not "
                                                     "resampled)"} if x.bootstrap else {}).add(meteor.meteor_jar(x.refs, x.hyps))
    out = MetricOutput(extra={"meteor_note": "METEOR jar unavailable (needs Java and pycocoevalcap): reported "
                                             "meteor_native instead, which is not the jar's number"})
    return _with_meteor_native_ci(out.add(meteor.meteor_native(x.refs, x.hyps)), x)


@_metric("meteor-native", "an approximation of METEOR (exact + Porter-stem matches, greedy alignment)", text="raw")
def _meteor_native(x: MetricInput) -> MetricOutput:
    return _with_meteor_native_ci(MetricOutput().add(meteor.meteor_native(x.refs, x.hyps)), x)


def _with_meteor_native_ci(out: MetricOutput, x: MetricInput) -> MetricOutput:
    if x.bootstrap and "meteor_native" in out.stats:  # corpus METEOR from resampled statistics
        from medvl.eval import bootstrap as bs
        st = np.asarray(out.stats["meteor_native"], dtype=float)
        out.ci["meteor_native"] = bs.bootstrap_ci(lambda idx: meteor.meteor_from_stats(st[idx].sum(axis=0)), len(x.refs),
                                                  x.bootstrap, x.seed)
    return out


@_metric("bertscore", "BERTScore P / R / F1 (default encoder all-MiniLM-L6-v2; the key names the encoder)", text="raw")
def _bertscore(x: MetricInput) -> MetricOutput:
    scorer = BERTScorer(x.bertscore_model, x.bertscore_layers, x.bertscore_idf)
    res = scorer.score(x.refs, x.hyps, progress=x.progress)
    out = MetricOutput()
    for k in ("precision", "recall", "f1"):
        out.scores[f"{scorer.name}_{k}"] = res[k]
        out.per_sample[f"{scorer.name}_{k}"] = res["per_sample"][k]
    return out


@_metric("chexpert", "CheXpert clinical efficacy: micro / macro P, R, F1 over 14 and 5 observations (medvl's rule "
         "labeler); bootstrap resamples reports", text="raw")
def _chexpert(x: MetricInput) -> MetricOutput:
    lab = CheXpertLabeler()
    rl, hl = lab.label_many(x.refs), lab.label_many(x.hyps)
    ce = clinical_efficacy(rl, hl, uncertain=x.uncertain)
    names = [k for k in ce if k.startswith(("micro_", "macro_"))]
    out = MetricOutput(scores={f"chexpert_{k}": ce[k] for k in names},
                       extra={"chexpert": {"uncertain_as": x.uncertain, "per_label": ce["per_label"]}})
    if x.bootstrap:  # every micro / macro score from the same resamples
        def draw(idx):
            d = clinical_efficacy([rl[i] for i in idx], [hl[i] for i in idx], uncertain=x.uncertain)
            return {k: d[k] for k in names}
        out.ci.update({f"chexpert_{k}": v for k, v in bs.bootstrap_ci_many(draw, len(x.refs), x.bootstrap, x.seed).items()})
    return out
