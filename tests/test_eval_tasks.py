"""VQA, classification, retrieval, grounding and bootstrap."""

import json
from pathlib import Path

import numpy as np
import pytest

from medvl.eval.bootstrap import bootstrap_ci, bootstrap_mean
from medvl.eval.classification import (average_precision, classification_scores, iou, multilabel_scores,
                                       parse_boxes_from_text, retrieval_scores, roc_auc)
from medvl.eval.suites import evaluate_grounding, evaluate_reports, evaluate_vqa
from medvl.eval.vqa import normalise_answer
from medvl.errors import MedvlUserError

VQA = json.loads((Path(__file__).parent / "fixtures" / "metrics" / "vqa_out.json").read_text())


def test_vqa_fixture():
    items = VQA["per_item"]
    res = evaluate_vqa([x["gt"] for x in items], [x["pred"] for x in items], [x["type"] for x in items])
    m = res["metrics"]
    assert m["closed_accuracy"] == pytest.approx(0.4)  # whole words, every closed question counted
    assert m["closed_accuracy_llava_med"] == pytest.approx(VQA["LLaVA-Med run_eval (original)"]["yes/no accuracy"])
    assert m["open_recall"] == pytest.approx(VQA["LLaVA-Med run_eval (original)"]["recall (open)"])
    assert m["open_exact"] == pytest.approx(VQA["strict normalized exact-match accuracy"]["open"])
    assert m["closed_exact"] == pytest.approx(VQA["strict normalized exact-match accuracy"]["closed"])
    assert [x["f1"] for x in res["per_sample"] if x["answer_type"] == "OPEN"] == \
        pytest.approx([x["f1"] for x in items if x["type"] == "OPEN"])
    for x in items:
        assert normalise_answer(x["pred"]) == x["norm_pred"].replace("x ray", "x ray")


def test_vqa_breakdown_by_question_type():
    res = evaluate_vqa(["yes", "no", "left"], ["yes", "yes", "left side"], ["CLOSED", "CLOSED", "OPEN"],
                       ["PRES", "PRES, POS", "POS"])
    assert res["by_question_type"]["PRES"]["closed_accuracy"] == 0.5
    assert res["by_question_type"]["POS"]["n"] == 2


def test_auc_ap_match_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(100):
        y = rng.integers(0, 2, 40)
        s = np.round(rng.random(40), 1)
        if y.min() == y.max():
            continue
        assert roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s))
        assert average_precision(y, s) == pytest.approx(sk.average_precision_score(y, s))
    Y = rng.integers(0, 2, (30, 3))
    S = rng.random((30, 3))
    ml = multilabel_scores(Y, S, ["a", "b", "c"])
    assert ml["auc_micro"] == pytest.approx(sk.roc_auc_score(Y.ravel(), S.ravel()))
    assert ml["auc_macro"] == pytest.approx(sk.roc_auc_score(Y, S, average="macro"))


def test_classification_scores_match_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    yt, yp = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    S = rng.random((200, 5))
    S = S / S.sum(1, keepdims=True)  # sklearn's multi-class AUC wants probabilities
    c = classification_scores(list(yt), list(yp), S, classes=list(range(5)))
    assert c["accuracy"] == pytest.approx(sk.accuracy_score(yt, yp))
    assert c["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(yt, yp))
    assert c["macro_f1"] == pytest.approx(sk.f1_score(yt, yp, average="macro"))
    assert np.array_equal(np.array(c["confusion_matrix"]), sk.confusion_matrix(yt, yp))
    assert c["auc_macro"] == pytest.approx(sk.roc_auc_score(yt, S, multi_class="ovr"))


def test_retrieval_open_clip_and_multi_caption():
    sim = np.array([[0.9, 0.8, 0.1, 0.0], [0.95, 0.7, 0.2, 0.1], [0.1, 0.2, 0.8, 0.9], [0.0, 0.1, 0.85, 0.95]])
    r = retrieval_scores(sim, ks=(1, 2))
    # open_clip: ranks of the diagonal; image 0 ranks text 0 first, image 1 ranks text 1 second, ...
    assert r["image_to_text_R@1"] == 0.5 and r["image_to_text_R@2"] == 1.0
    assert r["image_to_text_mean_rank"] == 1.5 and r["image_to_text_median_rank"] == 1.0
    assert r["text_to_image_R@1"] == 0.25 and r["text_to_image_mean_rank"] == 1.75
    # a second caption for image 0: any positive in the top k is a hit
    sim2 = np.hstack([sim, np.array([[0.1], [0.99], [0.0], [0.0]])])
    r2 = retrieval_scores(sim2, text_to_image=[0, 1, 2, 3, 0], ks=(1,))
    assert r2["text_to_image_R@1"] == pytest.approx(1 / 5)


def test_grounding_parse_and_iou():
    assert parse_boxes_from_text("<|box_start|>(10,20),(110,220)<|box_end|>") == [[10, 20, 110, 220]]
    assert parse_boxes_from_text("<ref>liver</ref><box_start>(1,2),(3,4)<box_end>") == [[1, 2, 3, 4]]
    assert parse_boxes_from_text("the box is [0.1, 0.2, 0.5, 0.6].") == [[0.1, 0.2, 0.5, 0.6]]
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    res = evaluate_grounding([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]],
                             ["<box>(0,0),(10,10)</box>", "no box here", [5, 0, 15, 10]], ["CT", "CT", "MRI"])
    assert res["metrics"]["acc@0.5"] == pytest.approx(1 / 3) and res["n_unparsed"] == 1
    assert res["by_modality"]["CT"]["acc@0.5"] == 0.5


def test_bootstrap_is_seeded():
    v = np.random.default_rng(0).random(100)
    a, b = bootstrap_mean(v, 500, seed=3), bootstrap_mean(v, 500, seed=3)
    assert a == b and a["low"] < v.mean() < a["high"]
    c = bootstrap_ci(lambda idx: float(v[idx].mean()), 100, 200, seed=1)
    assert c["low"] < v.mean() < c["high"]


def test_report_suite_bad_input():
    with pytest.raises(MedvlUserError, match="2 predictions but 1 references"):
        evaluate_reports(["a"], ["a", "b"])
    with pytest.raises(MedvlUserError, match="unknown report metric"):
        evaluate_reports(["a"], ["a"], metrics=["bleu5"])
    res = evaluate_reports(["no effusion", "small effusion"], ["", "small effusion"], metrics=["bleu", "rouge-l"],
                           normalisation="raw", bootstrap=50)
    assert res["n_empty_predictions"] == 1 and "bleu4[raw]" in res["ci"]


def test_empty_references_are_refused_and_empty_texts_never_labelled():
    import math
    from medvl.eval.chexpert import CheXpertLabeler
    with pytest.raises(MedvlUserError, match="1 reference"):
        evaluate_reports(["", "small effusion"], ["no effusion", "small effusion"], metrics=["bleu"])
    lab = CheXpertLabeler()
    assert all(math.isnan(v) for v in lab.label("").values())  # blank: not even "No Finding"
    assert all(math.isnan(v) for v in lab.label("   \n").values())
    assert lab.label("The lungs are clear.")["No Finding"] == 1.0


def test_chexpert_bootstrap_gives_every_micro_and_macro_score_an_interval():
    refs = ["Small left pleural effusion.", "No acute process.", "Cardiomegaly with edema.", "Right pneumothorax."] * 5
    hyps = ["Left pleural effusion.", "No acute process.", "Enlarged heart.", "No pneumothorax."] * 5
    res = evaluate_reports(refs, hyps, metrics=["chexpert"], bootstrap=30)
    for k in ("chexpert_micro_f1_14", "chexpert_macro_f1_14", "chexpert_micro_f1_5", "chexpert_macro_f1_5"):
        assert k in res["metrics"] and k in res["ci"], k
        assert 0.0 <= res["ci"][k]["low"] <= res["ci"][k]["high"] <= 1.0 and res["ci"][k]["n_boot"] == 30


def test_report_metrics_are_one_registry():
    """Each metric is one registered object; the command line's list is the registry's."""
    import contextlib
    import io

    from medvl.cli import main
    from medvl.eval.report_metrics import REPORT_METRICS, MetricOutput, ReportMetric
    from medvl.eval.suites import evaluate_reports
    assert all(REPORT_METRICS.get(n).about and REPORT_METRICS.get(n).text in ("normalised", "raw")
               for n in REPORT_METRICS)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        main(["eval", "report", "--help"])
    assert all(n in "".join(buf.getvalue().split()) for n in REPORT_METRICS)  # help wraps at hyphens
    if "test-length" not in REPORT_METRICS:  # adding a metric is one register call
        REPORT_METRICS.register("test-length", ReportMetric(
            "test-length", "words per prediction", lambda x: MetricOutput(
                scores={"length": sum(len(h.split()) for h in x.hyps) / len(x.hyps)},
                per_sample={"length": [float(len(h.split())) for h in x.hyps]}), text="raw"))
    got = evaluate_reports(["a b c", "d e"], ["a b", "d e f g"], metrics=["test-length", "rouge-l"], bootstrap=50)
    assert got["metrics"]["length"] == 3.0 and "length" in got["ci"] and "rouge_l[r2gen]" in got["metrics"]
