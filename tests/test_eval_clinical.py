"""The CheXpert rule labeler and the clinical-efficacy scores."""

import csv
import math
from pathlib import Path

import pytest

from conftest import shared
from medvl.eval.chexpert import OBSERVATIONS, CheXpertLabeler, binarise, clinical_efficacy

LAB = CheXpertLabeler()
N = math.nan


def same(a, b):
    return a == b or (math.isnan(a) and math.isnan(b))


def test_sample_reports_match_the_published_labels():
    path = shared("chexpert_labeler_rules", "labeled_reports.csv")
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 4
    for r in rows:
        got = LAB.label(r["Reports"])
        for o in OBSERVATIONS:
            want = float(r[o]) if r[o] else N
            assert same(got[o], want), (r["Reports"][:40], o, got[o], want)


@pytest.mark.parametrize("text,obs,want", [
    ("No evidence of pneumothorax.", "Pneumothorax", 0.0),
    ("No pleural effusion, pneumothorax, or focal consolidation.", "Consolidation", 0.0),
    ("Pneumonia cannot be excluded.", "Pneumonia", -1.0),
    ("Cannot exclude a small left effusion.", "Pleural Effusion", -1.0),
    ("Opacity at the left base may represent atelectasis.", "Atelectasis", -1.0),
    ("Opacity at the left base may represent atelectasis.", "Lung Opacity", 1.0),
    ("The previously seen right pneumothorax has resolved.", "Pneumothorax", 0.0),
    ("Interval resolution of the left pleural effusion.", "Pleural Effusion", 0.0),
    ("Unchanged small bilateral pleural effusions.", "Pleural Effusion", 1.0),
    ("Stable cardiomediastinal silhouette.", "Enlarged Cardiomediastinum", -1.0),
    ("Heart size is unchanged.", "Cardiomegaly", -1.0),
    ("IMPRESSION: 1. Moderate cardiomegaly. 2. Small right pleural effusion. 3. No pneumothorax.", "Pneumothorax", 0.0),
    ("IMPRESSION: 1. Moderate cardiomegaly. 2. Small right pleural effusion. 3. No pneumothorax.", "Pleural Effusion", 1.0),
    ("Mild pulmonary vascular congestion.", "Edema", -1.0),
    ("Right lower lobe opacity concerning for pneumonia.", "Pneumonia", -1.0),
    ("The heart is normal in size.", "Cardiomegaly", 0.0),
    ("Heart size is at the upper limits of normal.", "Cardiomegaly", 0.0),
    ("Endotracheal tube has been removed.", "Support Devices", 0.0),
    ("Right IJ central venous catheter tip in the SVC.", "Support Devices", 1.0),
    ("Small pericardial effusion.", "Pleural Effusion", N),
    ("Calcified nodule in the left upper lobe.", "Lung Lesion", N),
    ("Pleural effusion and atelectasis are not seen.", "Atelectasis", 0.0),
    ("Left effusion is present and there is no pneumothorax.", "Pleural Effusion", 1.0),
    ("Atelectasis versus consolidation at the right base.", "Consolidation", -1.0),
    ("There is no new consolidation.", "Consolidation", -1.0),
    ("Possible small left pleural effusion.", "Pleural Effusion", -1.0),
    ("Lungs are clear. No pneumothorax or effusion. Normal heart size.", "No Finding", 1.0),
    ("Nasogastric tube in the stomach. No focal consolidation.", "No Finding", 1.0),
    ("Moderate emphysema. No effusion.", "No Finding", N),
    # issue 34's error classes, seen against expert labels (held-out reports with MeSH indexing)
    ("The heart size and pulmonary vascularity appear within normal limits.", "Cardiomegaly", 0.0),
    ("The cardiomediastinal silhouette and pulmonary vasculature are within normal limits.",
     "Enlarged Cardiomediastinum", 0.0),
    ("Cardiomediastinal silhouette and pulmonary vasculature are normal.", "Enlarged Cardiomediastinum", 0.0),
    ("Heart size and lungs are normal.", "Cardiomegaly", 0.0),
    ("Cardiomegaly and the lungs are clear.", "Cardiomegaly", 1.0),  # "the": a new clause
    ("The heart is of normal size.", "Cardiomegaly", 0.0),
    ("The heart is not significantly enlarged.", "Cardiomegaly", 0.0),
    ("The lungs are grossly unremarkable.", "No Finding", 1.0),
    ("No significant change in right pneumothorax.", "Pneumothorax", 1.0),
    ("No interval change in the left pleural effusion.", "Pleural Effusion", 1.0),
    ("A small pneumothorax may not be demonstrated on this supine film.", "Pneumothorax", -1.0),
    ("Degenerative changes of the thoracic spine endplates.", "Support Devices", N),
    ("Mild scarring and fibrosis in the left apex.", "Pleural Other", N),
    ("Cystic fibrosis with bronchiectasis.", "Pleural Other", N),
    ("Pleural thickening and fibrosis at the right base.", "Pleural Other", 1.0),
    ("Stable enlargement of the heart.", "Cardiomegaly", 1.0),
    ("Stable enlargement of the cardiac silhouette.", "Cardiomegaly", 1.0),
    ("Sternotomy wires and a plate in the cervical spine.", "Support Devices", 1.0),
])
def test_report_language(text, obs, want):
    assert same(LAB.label(text)[obs], want)


def test_clinical_efficacy_against_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    import numpy as np
    rng = np.random.default_rng(0)
    vals = [1.0, 0.0, -1.0, N]
    refs = [{o: vals[rng.integers(4)] for o in OBSERVATIONS} for _ in range(60)]
    hyps = [{o: vals[rng.integers(4)] for o in OBSERVATIONS} for _ in range(60)]
    for unc in ("positive", "negative"):
        ce = clinical_efficacy(refs, hyps, unc)
        Y = np.array([binarise(r, unc) for r in refs])
        P = np.array([binarise(h, unc) for h in hyps])
        top5 = [OBSERVATIONS.index(o) for o in ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")]
        for tag, cols in (("14", list(range(14))), ("5", top5)):
            for avg in ("micro", "macro"):
                assert ce[f"{avg}_f1_{tag}"] == pytest.approx(sk.f1_score(Y[:, cols], P[:, cols], average=avg, zero_division=0))
                assert ce[f"{avg}_precision_{tag}"] == pytest.approx(sk.precision_score(Y[:, cols], P[:, cols], average=avg, zero_division=0))
                assert ce[f"{avg}_recall_{tag}"] == pytest.approx(sk.recall_score(Y[:, cols], P[:, cols], average=avg, zero_division=0))


def test_uncertain_policy_changes_the_score():
    ref = [LAB.label("Possible pneumonia.")]
    hyp = [LAB.label("Pneumonia.")]
    assert clinical_efficacy(ref, hyp, "positive")["per_label"]["Pneumonia"]["f1"] == 1.0
    assert clinical_efficacy(ref, hyp, "negative")["per_label"]["Pneumonia"]["f1"] == 0.0


def test_phrases_ship_with_the_package():
    from medvl.eval.chexpert import PHRASES_DIR
    assert (PHRASES_DIR / "mention" / "pleural_effusion.txt").exists()
    assert "MIT" in (PHRASES_DIR / "LICENSE").read_text()
    assert Path(PHRASES_DIR).is_relative_to(Path(__file__).resolve().parent.parent / "medvl")


def test_a_huge_sentence_is_labelled_in_linear_time():
    """A 20,000-word sentence of mentions (a hostile report) returns promptly: token lookup was a scan
    per mention (quadratic: 4,000 words took 2.6 s, 20,000 would take about a minute)."""
    import time
    t = time.perf_counter()
    got = LAB.label(" ".join(["opacity"] * 20_000))
    assert got["Lung Opacity"] == 1.0 and time.perf_counter() - t < 15
