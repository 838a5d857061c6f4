"""The command line: exit codes, one-line errors without tracebacks, skipped counts."""

import json
import subprocess
import sys

import pytest

from conftest import shared
from medvl.cli import main
from medvl.data.bundled import load_bundled
from medvl.data.schema import write_jsonl


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_formats_lists_all(capsys):
    code, out, _ = run(capsys, "data", "formats", "-v")
    assert code == 0
    for name in ("llava", "sharegpt", "medm-vl", "grounding", "vqa-rad", "slake", "vqa-med-2019",
                 "mimic-cxr", "iu-xray", "captions", "mmkd-clip", "medvl"):
        assert f"\n{name} " in "\n" + out
    assert "read option lang" in out


def test_convert_reports_skips(capsys, fixtures, tmp_path):
    code, out, _ = run(capsys, "data", "convert", "--from", "llava", "--to", "medvl",
                       str(fixtures / "llava_med.json"), str(tmp_path / "o.jsonl"),
                       "--skipped", str(tmp_path / "skipped.jsonl"))
    assert code == 0
    assert "4 record(s), 3 converted" in out and "unknown speaker 'robot'" in out
    assert json.loads((tmp_path / "skipped.jsonl").read_text())["id"] == "bad_4"
    code, _, err = run(capsys, "data", "convert", "--from", "llava", "--to", "medvl", "--strict",
                       str(fixtures / "llava_med.json"), str(tmp_path / "o.jsonl"))
    assert code == 2 and "--strict" in err


def test_convert_skips_invalid_records(capsys, tmp_path):
    rows = [{"id": "ok", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
            {"id": "two", "image": "a.png", "conversations": [{"from": "human", "value": "<image><image>Q"}, {"from": "gpt", "value": "A"}]}]
    (tmp_path / "in.json").write_text(json.dumps(rows))
    code, out, _ = run(capsys, "data", "convert", "--from", "llava", "--to", "sharegpt",
                       str(tmp_path / "in.json"), str(tmp_path / "out.json"))
    assert code == 0 and "invalid: 2 '<image>' placeholder(s)" in out
    assert len(json.loads((tmp_path / "out.json").read_text())) == 1


@pytest.mark.parametrize("argv,needle", [
    (["data", "convert", "--from", "lava", "--to", "medvl", "x", "y"], "unknown data format 'lava'"),
    (["data", "convert", "--from", "llava", "--to", "medvl", "/nonexistent.json", "y"], "file not found"),
    (["data", "convert", "--from", "vqa-rad", "--to", "medvl", "--opt", "lang=en", "x", "y"], "no read option 'lang'"),
    (["data", "stats", "nope-dataset"], "not a bundled dataset"),
])
def test_user_errors_exit_2(capsys, argv, needle):
    code, _, err = run(capsys, *argv)
    assert code == 2 and needle in err and "Traceback" not in err


def test_malformed_json_names_the_file(capsys, tmp_path):
    (tmp_path / "bad.json").write_text('[{"id": 1, "image": "a.png",\n "conversations": [}]')
    code, _, err = run(capsys, "data", "convert", "--from", "llava", "--to", "medvl",
                       str(tmp_path / "bad.json"), str(tmp_path / "o.jsonl"))
    assert code == 2 and "bad.json" in err and "malformed JSON" in err and "line 2" in err


def test_validate_broken_file(capsys, tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    lines = [
        json.dumps({"id": "ok", "images": [], "conversation": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "yo"}]}),
        "{broken",
        json.dumps({"id": "mismatch", "images": [{"path": "a.png"}], "conversation": [{"role": "user", "text": "no placeholder"}]}),
        json.dumps({"id": "missing", "images": [{"path": "gone.png"}], "conversation": [{"role": "user", "text": "<image>"}]}),
        json.dumps({"id": "corrupt", "images": [{"path": "a.png"}], "conversation": [{"role": "user", "text": "<image>"}]}),
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    code, _, err = run(capsys, "data", "validate", str(tmp_path / "d.jsonl"), "--decode")
    assert code == 2
    assert "line 2: malformed JSON" in err
    assert "record 1 (id='mismatch'): 0 '<image>' placeholder(s) in the conversation but 1 image(s)" in err
    assert "record 2 (id='missing'): image 0: file not found" in err and "gone.png" in err
    assert "record 3 (id='corrupt'): image 0:" in err and "a.png" in err
    assert "Traceback" not in err


def test_validate_ok_and_stats_on_bundled(capsys, tmp_path):
    write_jsonl(load_bundled("vqa-rad", "test"), tmp_path / "t.jsonl")
    code, out, _ = run(capsys, "data", "validate", str(tmp_path / "t.jsonl"))
    assert code == 0 and out.startswith("OK") and "451 samples" in out
    code, out, _ = run(capsys, "data", "stats", "vqa-rad/test", "--json")
    st = json.loads(out)
    assert st["samples"] == 451 and st["labels"]["answer_type"]["CLOSED"] == 272


def test_stats_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    code, out, _ = run(capsys, "data", "stats", "vqa-rad", "--plot", str(tmp_path / "s.png"))
    assert code == 0 and (tmp_path / "s.png").stat().st_size > 1000


def test_validate_other_format_real_data(capsys):
    src = shared("vqa_rad", "testset.json")
    code, out, _ = run(capsys, "data", "validate", str(src), "--format", "vqa-rad", "--opt", "image_dir=images")
    assert code == 0 and "451 samples" in out


def test_console_script_exit_code(tmp_path):
    """The installed entry point, as a user runs it: exit code 2, one line, no traceback."""
    r = subprocess.run([sys.executable, "-m", "medvl.cli", "data", "validate", str(tmp_path / "none.jsonl")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "file not found" in r.stderr


def test_tour(capsys, tmp_path):
    code, out, _ = run(capsys, "data", "tour", "--out", str(tmp_path))
    assert code == 0 and "MISMATCH" not in out
    assert (tmp_path / "contact_sheet.png").exists()


def test_train_keys_prints_every_recipe_key_with_its_doc(capsys):
    import dataclasses as dc

    from medvl.data.pairs import DataConfig
    from medvl.train.clip import ClipTrainConfig
    from medvl.train.keys import field_docs
    from medvl.train.vlm_config import DATA_KEYS, VLMTrainConfig
    for cls in (VLMTrainConfig, ClipTrainConfig, DataConfig):  # a new key without a doc fails here
        docs = field_docs(cls)
        assert [f.name for f in dc.fields(cls) if not docs.get(f.name)] == [], cls.__name__
    assert main(["train", "--keys", "vlm"]) == 0
    out = capsys.readouterr().out
    for f in dc.fields(VLMTrainConfig):
        assert f"  {f.name}: " in out
    assert all(f"  {k}: " in out for k in DATA_KEYS) and "describe" in out
    assert main(["train", "--keys", "clip"]) == 0 and "text_mode" in capsys.readouterr().out
    assert main(["train", "--keys", "gan"]) == 2 and "vlm, clip" in capsys.readouterr().err
    assert main(["train"]) == 2 and "--keys" in capsys.readouterr().err
