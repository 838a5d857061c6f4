"""``medvl eval ...`` end to end on files: joins, bad input, outputs."""

import json
import re

import numpy as np
import pytest

from medvl.cli import main
from medvl.data.bundled import load_bundled
from medvl.data.schema import write_jsonl

REFS = ["The heart size is normal. No pleural effusion.", "Small left pleural effusion.", "No acute process."]
HYPS = ["Heart size is normal. No effusion.", "Left pleural effusion.", "No acute cardiopulmonary process."]


def jl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def run(capsys, *argv):
    code = main(list(argv))
    o = capsys.readouterr()
    return code, o.out, o.err


@pytest.fixture
def files(tmp_path):
    p = jl(tmp_path / "pred.jsonl", [{"id": f"s{i}", "prediction": h} for i, h in enumerate(HYPS)])
    r = tmp_path / "ref.csv"
    r.write_text("id,reference\n" + "\n".join(f's{i},"{t}"' for i, t in enumerate(REFS)) + "\n")
    return p, str(r)


def test_report_end_to_end(capsys, files, tmp_path):
    p, r = files
    code, out, _ = run(capsys, "eval", "report", "--pred", p, "--ref", r, "--metrics", "bleu,rouge-l,cider-d,chexpert",
                       "--out", str(tmp_path / "res.json"), "--html", str(tmp_path / "res.html"), "--bootstrap", "50")
    assert code == 0 and "bleu4[r2gen]" in out and "chexpert_micro_f1_14" in out and "95% CI" in out
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["n"] == 3 and res["normalisation"] == "r2gen" and res["ids"] == ["s0", "s1", "s2"]
    page = (tmp_path / "res.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page.split("<body>")[1][:2000]


def test_missing_ids_are_an_error_unless_allowed(capsys, files, tmp_path):
    p, r = files
    p2 = jl(tmp_path / "p2.jsonl", [{"id": "s0", "prediction": HYPS[0]}, {"id": "zz", "prediction": "x"}])
    code, _, err = run(capsys, "eval", "report", "--pred", p2, "--ref", r, "--metrics", "bleu")
    assert code == 2 and "1 prediction id(s) not in" in err and "zz" in err and "2 reference id(s) without" in err
    code, out, _ = run(capsys, "eval", "report", "--pred", p2, "--ref", r, "--metrics", "bleu", "--allow-missing",
                       "--out", str(tmp_path / "o.json"))
    assert code == 0 and "scored 1 shared ids" in out
    assert json.loads((tmp_path / "o.json").read_text())["missing"]["predictions_without_reference"] == ["zz"]


@pytest.mark.parametrize("content,needle", [
    (b'{"id": "s0", "prediction": null}\n', "null/NaN"),
    (b'{"id": "s0", "prediction": NaN}\n', "null/NaN"),
    (b'{"id": "s0", "prediction": "a"}\n{"id": "s0", "prediction": "b"}\n', "duplicate id"),
    (b'{"id": "s0", "prediction": "caf\xe9"}\n', "not UTF-8"),
    (b'{"prediction": "x"}\n', "no id column"),
    (b'', "no records"),
    (b'{"id": "s0", "prediction": "a"\n', "malformed JSON"),
])
def test_bad_prediction_files(capsys, files, tmp_path, content, needle):
    _, r = files
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    code, _, err = run(capsys, "eval", "report", "--pred", str(bad), "--ref", r, "--metrics", "bleu")
    assert code == 2 and needle in err and "bad.jsonl" in err and "Traceback" not in err


def test_vqa_against_the_canonical_dataset(capsys, tmp_path):
    test = load_bundled("vqa-rad", "test")
    write_jsonl(test, tmp_path / "ref.jsonl")
    preds = [{"id": s.id, "answer": s.conversation[1].text if i % 4 else "I cannot tell"} for i, s in enumerate(test)]
    p = jl(tmp_path / "pred.jsonl", preds)
    code, out, _ = run(capsys, "eval", "vqa", "--pred", p, "--ref", str(tmp_path / "ref.jsonl"),
                       "--out", str(tmp_path / "v.json"))
    assert code == 0
    res = json.loads((tmp_path / "v.json").read_text())
    assert res["counts"]["n_closed"] == 272 and res["counts"]["n_open"] == 179
    assert 0.70 < res["metrics"]["closed_accuracy"] < 0.80 and "PRES" in res["by_question_type"]
    # the bundled split by name gives the same scores; a split it lacks is one clear error
    code, _, _ = run(capsys, "eval", "vqa", "--pred", p, "--ref", "vqa-rad/test", "--out", str(tmp_path / "b.json"))
    assert code == 0 and json.loads((tmp_path / "b.json").read_text())["metrics"] == res["metrics"]
    code, _, err = run(capsys, "eval", "vqa", "--pred", p, "--ref", "vqa-rad/validation")
    assert code == 2 and "has splits train, test, not 'validation'" in err


def test_cls_retrieval_grounding(capsys, tmp_path):
    p = jl(tmp_path / "p.jsonl", [{"id": "a", "prediction": "CHEST", "scores": {"CHEST": 0.8, "HEAD": 0.1, "ABD": 0.1}},
                                  {"id": "b", "prediction": "HEAD", "scores": {"CHEST": 0.2, "HEAD": 0.5, "ABD": 0.3}},
                                  {"id": "c", "prediction": "HEAD", "scores": {"CHEST": 0.1, "HEAD": 0.5, "ABD": 0.4}}])
    r = jl(tmp_path / "r.jsonl", [{"id": "a", "label": "CHEST"}, {"id": "b", "label": "HEAD"}, {"id": "c", "label": "ABD"}])
    code, out, _ = run(capsys, "eval", "cls", "--pred", p, "--ref", r, "--html", str(tmp_path / "c.html"))
    assert code == 0 and "balanced_accuracy" in out and "auc_macro" in out
    np.save(tmp_path / "sim.npy", np.eye(4) + 0.1)
    code, out, _ = run(capsys, "eval", "retrieval", "--sim", str(tmp_path / "sim.npy"), "--k", "1,2")
    assert code == 0 and re.search(r"image_to_text_R@1 +1.0000", out)
    np.save(tmp_path / "bad.npy", np.full((2, 2), np.nan))
    code, _, err = run(capsys, "eval", "retrieval", "--sim", str(tmp_path / "bad.npy"))
    assert code == 2 and "NaN" in err
    gp = jl(tmp_path / "gp.jsonl", [{"id": "a", "prediction": "<|box_start|>(10,10),(50,50)<|box_end|>"},
                                    {"id": "b", "prediction": "I am not sure"}])
    gr = jl(tmp_path / "gr.jsonl", [{"id": "a", "box": [10, 10, 50, 52], "modality": "CT"},
                                    {"id": "b", "box": [0, 0, 5, 5], "modality": "MRI"}])
    code, out, _ = run(capsys, "eval", "grounding", "--pred", gp, "--ref", gr, "--out", str(tmp_path / "g.json"))
    assert code == 0
    g = json.loads((tmp_path / "g.json").read_text())
    assert g["metrics"]["acc@0.5"] == 0.5 and g["n_unparsed"] == 1 and g["by_modality"]["CT"]["acc@0.5"] == 1.0


def _llava_med_answers(tmp_path, test, own_ids=True):
    """A LLaVA-Med answer file: its own question_id (0, 1, ...), the prompt, the answer text."""
    rows = []
    for k, s in enumerate(test):
        q = s.conversation[0].text.replace("<image>", "").strip()
        rows.append({"question_id": k if own_ids else s.id, "prompt": q + "\n<image>", "text": s.conversation[-1].text,
                     "answer_id": f"a{k}", "model_id": "llava-med", "metadata": {}})
    return jl(tmp_path / "answers.jsonl", rows)


def test_ids_that_name_other_questions_are_refused_and_join_question_pairs_them(capsys, tmp_path):
    """A LLaVA-Med answer file keyed by its own question_id shares ids with VQA-RAD that name other
    questions: scoring those pairs (as --allow-missing did) is refused; --join question scores them right."""
    test = load_bundled("vqa-rad", "test")[:40]
    ans = _llava_med_answers(tmp_path, test)
    code, out, err = run(capsys, "eval", "vqa", "--pred", ans, "--ref", "vqa-rad/test", "--allow-missing")
    assert code == 2 and "name different questions" in err and "--join question" in err
    code, out, err = run(capsys, "eval", "vqa", "--pred", ans, "--ref", "vqa-rad/test", "--join", "question",
                         "--allow-missing", "--out", str(tmp_path / "r.json"))
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["n"] == 40 and res["join"]["by"] == "question"
    assert res["metrics"]["closed_accuracy"] == 1.0  # the answers are the references: every pair is right
    # keyed by the right ids, the question check passes and counts what it compared
    ok = _llava_med_answers(tmp_path, test, own_ids=False)
    code, out, err = run(capsys, "eval", "vqa", "--pred", ok, "--ref", "vqa-rad/test", "--allow-missing",
                         "--out", str(tmp_path / "r2.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "r2.json").read_text())["join"]["questions_agreeing"] == 40


def test_empty_references_refused_or_skipped_and_counted(capsys, tmp_path):
    p = jl(tmp_path / "p.jsonl", [{"id": f"s{i}", "prediction": h} for i, h in enumerate(HYPS)] + [
        {"id": "s3", "prediction": ""}])
    r = jl(tmp_path / "r.jsonl", [{"id": f"s{i}", "reference": t} for i, t in enumerate(REFS)] + [
        {"id": "s3", "reference": "Clear lungs."}, ])
    r_empty = jl(tmp_path / "re.jsonl", [{"id": "s0", "reference": ""}] + [
        {"id": f"s{i}", "reference": t} for i, t in enumerate(REFS) if i] + [{"id": "s3", "reference": "Clear."}])
    code, out, err = run(capsys, "eval", "report", "--pred", p, "--ref", r_empty, "--metrics", "bleu,chexpert")
    assert code == 2 and "1 reference(s) are empty" in err and "--empty-refs skip" in err
    code, out, err = run(capsys, "eval", "report", "--pred", p, "--ref", r_empty, "--metrics", "bleu,chexpert",
                         "--empty-refs", "skip", "--out", str(tmp_path / "o.json"))
    assert code == 0 and "1 empty reference(s) skipped" in out and "1 empty prediction(s)" in out
    res = json.loads((tmp_path / "o.json").read_text())
    assert res["n"] == 3 and res["empty"] == {"references_skipped": ["s0"], "predictions_scored_empty": ["s3"]}
    assert "s0" not in res["ids"]
