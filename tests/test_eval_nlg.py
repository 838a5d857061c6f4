"""NLG metrics against the reference numbers (always) and the live reference packages
(when installed: they are dev dependencies)."""

import json
import random
from pathlib import Path

import pytest

from medvl.eval.nlg import bleu, bleu2_cxr, cider_d, lcs_length, rouge_l, rouge_score_f1
from medvl.eval.text import normalise, ptb, r2gen_clean

FIX = json.loads((Path(__file__).parent / "fixtures" / "metrics" / "nlg_out.json").read_text())
RAW = FIX["inputs"]["raw"]
NORMS = {"raw": "raw", "r2gen": "r2gen_clean", "ptb": "ptb"}


def texts(norm):
    return normalise(RAW["refs"], norm), normalise(RAW["hyps"], norm)


@pytest.mark.parametrize("norm", ["r2gen", "ptb"])
def test_normalisations_match_reference_outputs(norm):
    key = NORMS[norm]
    for side in ("refs", "hyps"):
        assert normalise(RAW[side], norm) == FIX["inputs"][key][side]


@pytest.mark.parametrize("norm", ["raw", "r2gen", "ptb"])
def test_bleu_rouge_cider_match_pycocoevalcap_fixture(norm):
    R, H = texts(norm)
    key = NORMS[norm]
    b = bleu(R, H)
    ref = FIX[f"pycocoevalcap.Bleu4[{key}]"]
    assert [b[f"bleu{k}"] for k in range(1, 5)] == pytest.approx(ref["corpus_bleu1-4"], abs=1e-6)
    assert b["per_sample"]["bleu1"] == pytest.approx(ref["per_pair_bleu1"], abs=1e-6)
    assert b["per_sample"]["bleu4"] == pytest.approx(ref["per_pair_bleu4"], abs=1e-6)
    r = rouge_l(R, H)
    assert r["rouge_l"] == pytest.approx(FIX[f"pycocoevalcap.Rouge[{key}]"]["mean"], abs=1e-6)
    assert r["per_sample"]["rouge_l"] == pytest.approx(FIX[f"pycocoevalcap.Rouge[{key}]"]["per_pair"], abs=1e-6)
    c = cider_d(R, H)
    assert c["cider_d"] == pytest.approx(FIX[f"pycocoevalcap.Cider(CIDEr-D)[{key}]"]["mean"], abs=1e-6)
    assert c["per_sample"]["cider_d"] == pytest.approx(FIX[f"pycocoevalcap.Cider(CIDEr-D)[{key}]"]["per_pair"], abs=1e-6)


def test_bleu_epsilons_never_zero():
    b = bleu(["a b c d"], ["x y z w"])
    assert 0 < b["bleu4"] < 1e-6


def test_rouge_score_variants_and_bleu2_cxr():
    for stem, key in ((False, "rouge_score.RougeScorer(use_stemmer=False)[raw]"),
                      (True, "rouge_score.RougeScorer(use_stemmer=True)[raw]")):
        if stem:
            pytest.importorskip("nltk")
        for kind in ("rouge1", "rouge2", "rougeL"):
            res = rouge_score_f1(RAW["refs"], RAW["hyps"], kind, stem=stem)
            name = f"{kind}_f1" + ("_stem" if stem else "")
            assert res[name] == pytest.approx(FIX[key][kind]["mean_F"], abs=1e-6)
            assert res["per_sample"][name] == pytest.approx(FIX[key][kind]["per_pair_F"], abs=1e-6)
    b = bleu2_cxr(RAW["refs"], RAW["hyps"])
    ref = FIX["fast_bleu bigram (CXR-Report-Metric bleu_score, per pair)"]
    assert b["per_sample"]["bleu2_cxr"] == pytest.approx(ref["per_pair"], abs=1e-6)


def test_lcs_bit_parallel_equals_dp():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 30))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 30))]
        dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(len(a)):
            for j in range(len(b)):
                dp[i + 1][j + 1] = dp[i][j] + 1 if a[i] == b[j] else max(dp[i][j + 1], dp[i + 1][j])
        assert lcs_length(a, b) == dp[-1][-1]


def test_r2gen_keeps_hyphens_and_drops_list_numbers():
    assert r2gen_clean("1. Right-sided PICC. 2. No effusion.") == "right-sided picc . no effusion ."
    assert ptb("Heart size is normal.  Can't exclude (small) effusion") == \
        "heart size is normal ca n't exclude -lrb- small -rrb- effusion"


# ---- live references on randomised corpora --------------------------------------------------

def random_corpus(n=400, seed=1):
    rng = random.Random(seed)
    vocab = ("no acute cardiopulmonary process . the heart size is normal , lungs are clear small left "
             "pleural effusion with basilar atelectasis moderate cardiomegaly right PICC line tip SVC "
             "mild pulmonary edema unchanged stable new right-sided 2.5 cm").split()
    refs, hyps = [], []
    for _ in range(n):
        r = [rng.choice(vocab) for _ in range(rng.randint(1, 40))]
        h = [w for w in r if rng.random() > 0.3] + [rng.choice(vocab) for _ in range(rng.randint(0, 8))]
        rng.shuffle(h) if rng.random() < 0.2 else None
        refs.append(" ".join(r))
        hyps.append(" ".join(h) or "no")
    return refs, hyps


@pytest.mark.parametrize("norm", ["raw", "r2gen"])
def test_live_pycocoevalcap_parity(norm):
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    refs, hyps = random_corpus()
    R, H = normalise(refs, norm), normalise(hyps, norm)
    g = {i: [r] for i, r in enumerate(R)}
    res = {i: [h] for i, h in enumerate(H)}
    pb, pb_per = Bleu(4).compute_score(g, res, verbose=0)
    ob = bleu(R, H)
    assert [ob[f"bleu{k}"] for k in range(1, 5)] == pytest.approx(pb, abs=1e-12)
    for k in range(4):
        assert ob["per_sample"][f"bleu{k + 1}"] == pytest.approx(pb_per[k], abs=1e-12)
    pr, pr_per = Rouge().compute_score(g, res)
    assert rouge_l(R, H)["per_sample"]["rouge_l"] == pytest.approx(list(pr_per), abs=1e-12)
    pc, pc_per = Cider().compute_score(g, res)
    oc = cider_d(R, H)
    assert oc["cider_d"] == pytest.approx(pc, abs=1e-9)
    assert oc["per_sample"]["cider_d"] == pytest.approx(list(pc_per), abs=1e-9)


def test_live_multi_reference_bleu_closest_length():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    refs = [["a b c d e f", "a b c"], ["x y", "x y z w v"]]
    hyps = ["a b c d", "x y z"]
    pb, _ = Bleu(4).compute_score({i: r for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)}, verbose=0)
    ob = bleu(refs, hyps)
    assert [ob[f"bleu{k}"] for k in range(1, 5)] == pytest.approx(pb, abs=1e-12)


@pytest.mark.parametrize("stem", [False, True])
def test_live_rouge_score_parity(stem):
    rs = pytest.importorskip("rouge_score.rouge_scorer")
    refs, hyps = random_corpus(300, seed=2)
    sc = rs.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=stem)
    ref = [sc.score(r, h) for r, h in zip(refs, hyps)]
    for kind in ("rouge1", "rouge2", "rougeL"):
        ours = rouge_score_f1(refs, hyps, kind, stem)["per_sample"][f"{kind}_f1" + ("_stem" if stem else "")]
        assert ours == pytest.approx([x[kind].fmeasure for x in ref], abs=1e-12)


def test_live_nltk_and_sacrebleu_parity():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    sacrebleu = pytest.importorskip("sacrebleu")
    from medvl.eval.text import cxr_tokens
    refs, hyps = random_corpus(300, seed=3)
    sm = nltk_bleu.SmoothingFunction().method1
    ref = [nltk_bleu.sentence_bleu([cxr_tokens(r)], cxr_tokens(h), weights=(0.5, 0.5), smoothing_function=sm)
           for r, h in zip(refs, hyps)]
    assert bleu2_cxr(refs, hyps)["per_sample"]["bleu2_cxr"] == pytest.approx(ref, abs=1e-12)
    # one reference, pre-tokenised lower-cased text: corpus BLEU-4 equals sacrebleu's (METRICS.md §4.1)
    R, H = normalise(refs, "ptb"), normalise(hyps, "ptb")
    sb = sacrebleu.corpus_bleu(H, [R], tokenize="none", force=True).score / 100
    assert bleu(R, H)["bleu4"] == pytest.approx(sb, abs=1e-6)


def test_live_ptb_tokenizer_parity():
    pytest.importorskip("pycocoevalcap")
    import shutil
    if shutil.which("java") is None:
        pytest.skip("Java is not installed (the PTB tokenizer reference is a jar)")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    texts = ["Is/Are the lungs normal size?", "Can this image highlight bone fractures (if present)?",
             "Chronic sinusitis vs. hemorrhage", "Don't can't won't it's the patient's", "2.5 cm, 1,000 mL; 10:30",
             "IMPRESSION: 1. Mild congestion. 2. Effusions cannot be excluded.", "He said \"no effusion\".",
             "nodular sclerosing hodgkin\u2019s lymphoma", "arnold\u2013chiari malformation i with syrinx",
             "INDICATION: ___F with ascites?? fever!", "right-sided PICC terminates in the SVC."]
    res = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert [ptb(t) for t in texts] == [res[i][0] for i in range(len(texts))]
