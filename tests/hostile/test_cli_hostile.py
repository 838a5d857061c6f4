"""Hostile inputs through the command line, as a user brings them: every case must exit 2 with exactly
one ``medvl: error:`` line on stderr naming what is wrong, no traceback, no output file left behind,
and return within a bound (a FIFO or a nested-alias recipe once hung).

The corpus is generated here (no large files committed): :data:`BAD_FILES` are input files of every
kind of wrongness, :data:`FILE_COMMANDS` the commands that read an input file; every pair is a case.
:data:`VALUE_CASES` are malformed values, recipes and outputs. A new command adds its argv template
to one of these lists.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from medvl.cli import main

RECIPES = Path(__file__).parents[2] / "recipes"
TIME_LIMIT_S = 60


def _write(p: Path, data: bytes | str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return p


def _latin1(d: Path, name: str) -> Path:
    return _write(d / name, '{"id": "1", "question": "Qu\u00e9 \u00f3rgano?", "answer": "h\u00edgado"}\n'.encode("latin-1"))


def _utf16(d: Path, name: str) -> Path:
    return _write(d / name, '[{"id": "1", "answer": "yes"}]'.encode("utf-16"))


def _binary(d: Path, name: str) -> Path:
    return _write(d / name, bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))


def _nul_text(d: Path, name: str) -> Path:
    return _write(d / name, b'{"id": "1"}\x00\x00\x00\n')


def _deep(d: Path, name: str) -> Path:
    return _write(d / name, "[" * 100_000 + "]" * 100_000)


def _deep_line(d: Path, name: str) -> Path:
    return _write(d / name, '{"id": "1", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")


def _folder(d: Path, name: str) -> Path:
    (d / name).mkdir(parents=True, exist_ok=True)
    return d / name


def _fifo(d: Path, name: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    os.mkfifo(d / name)
    return d / name


def _missing(d: Path, name: str) -> Path:
    return d / "no-such-dir" / name


def _malformed(d: Path, name: str) -> Path:
    return _write(d / name, '[{"id": "1", "answer": "yes",}\n')


def _top_number(d: Path, name: str) -> Path:
    return _write(d / name, "42\n")


def _dev_zero(d: Path, name: str) -> Path:
    return Path("/dev/zero")


#: name -> builder(folder, file name) of an input file that no command can use
BAD_FILES = {"latin1": _latin1, "utf16": _utf16, "binary": _binary, "nul-bytes": _nul_text, "deep-json": _deep,
             "deep-jsonl-line": _deep_line, "folder": _folder, "fifo": _fifo, "missing": _missing,
             "malformed-json": _malformed, "top-level-number": _top_number, "dev-zero": _dev_zero}

#: commands that read one input file; {f} is the hostile file, {o} an output path in the case's output folder
FILE_COMMANDS = {
    "validate-medvl": ["data", "validate", "{f}"],
    "validate-llava": ["data", "validate", "{f}", "--format", "llava"],
    "validate-sharegpt": ["data", "validate", "{f}", "--format", "sharegpt"],
    "validate-medm-vl": ["data", "validate", "{f}", "--format", "medm-vl"],
    "validate-mmkd": ["data", "validate", "{f}", "--format", "mmkd-clip"],
    "convert-llava": ["data", "convert", "--from", "llava", "--to", "medvl", "{f}", "{o}/out.jsonl"],
    "convert-slake": ["data", "convert", "--from", "slake", "--to", "llava", "{f}", "{o}/out.json"],
    "convert-vqa-rad": ["data", "convert", "--from", "vqa-rad", "--to", "medvl", "{f}", "{o}/out.jsonl"],
    "stats": ["data", "stats", "{f}"],
    "predict-data": ["predict", "--data", "{f}", "--out", "{o}/answers.jsonl"],
    "eval-report-pred": ["eval", "report", "--pred", "{f}", "--ref", "vqa-rad/test", "--out", "{o}/r.json"],
    "eval-vqa-pred": ["eval", "vqa", "--pred", "{f}", "--ref", "vqa-rad/test", "--out", "{o}/r.json"],
    "eval-vqa-ref": ["eval", "vqa", "--pred", "{good}", "--ref", "{f}", "--out", "{o}/r.json"],
    "eval-cls-pred": ["eval", "cls", "--pred", "{f}", "--ref", "{good}"],
    "eval-grounding-ref": ["eval", "grounding", "--pred", "{good}", "--ref", "{f}"],
    "eval-retrieval-sim": ["eval", "retrieval", "--sim", "{f}"],
    "train-recipe": ["train", "{f}"],
}


def _alarm(seconds: int):
    def handler(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s: the command hangs on this input")
    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    return old


def run_case(argv: list[str], capsys, out_dir: Path) -> tuple[int, str]:
    """Run one command in process within the time bound; return (exit code, stderr)."""
    old = _alarm(TIME_LIMIT_S)
    try:
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's usage errors exit 2 themselves
            code = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    err = capsys.readouterr().err
    return code, err


def assert_one_clean_error(code, err: str, out_dir: Path, name: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("usage:", "  ", "[", "WARNING"))]
    errors = [ln for ln in lines if ln.startswith(("medvl: error:", "medvl: skipped", "medvl ")) or "error:" in ln]
    assert code == 2, f"{name}: exit {code}, stderr: {err[-800:]}"
    assert "Traceback" not in err, f"{name}: a traceback: {err[-1500:]}"
    assert len([ln for ln in errors if "error:" in ln]) == 1, f"{name}: expected one error line, got: {err[-800:]}"
    left = [p for p in out_dir.rglob("*") if p.is_file()] if out_dir.exists() else []
    assert not left, f"{name}: output left behind: {left}"


@pytest.fixture
def good_files(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    _write(good / "preds.jsonl", "".join(json.dumps({"id": str(i), "prediction": "yes"}) + "\n" for i in range(3)))
    return good


@pytest.mark.parametrize("command", sorted(FILE_COMMANDS))
@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_hostile_input_file(kind, command, tmp_path, capsys, good_files, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    f = BAD_FILES[kind](tmp_path / "in", "input.json" if "json" not in kind else "input.jsonl")
    out = tmp_path / "out"
    argv = [a.format(f=f, o=out, good=good_files / "preds.jsonl") for a in FILE_COMMANDS[command]]
    code, err = run_case(argv, capsys, out)
    assert_one_clean_error(code, err, out, f"{command} on {kind}")


# ---- malformed values, recipes, outputs ---------------------------------------------------------
def _recipe(tmp: Path, text: str | bytes, name: str = "r.yaml") -> Path:
    return _write(tmp / name, text)


ALIAS_BOMB = ("recipe: vlm\na: &a [x, x, x, x, x, x, x, x, x]\n"
              + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                        for p, c in zip("abcdefgh", "bcdefghi")))

VLM = str(RECIPES / "vlm-sft-vqarad.yaml")

#: name -> builder(tmp folder, output folder) -> argv
VALUE_CASES = {
    # recipes
    "recipe-malformed-yaml": lambda t, o: ["train", _recipe(t, "recipe: vlm\nepochs: [1, 2\n")],
    "recipe-top-level-list": lambda t, o: ["train", _recipe(t, "- recipe: vlm\n- epochs: 1\n")],
    "recipe-python-tag": lambda t, o: ["train", _recipe(t, "recipe: vlm\nx: !!python/object/apply:os.system [ls]\n")],
    "recipe-binary": lambda t, o: ["train", _recipe(t, bytes(range(256)) * 8)],
    "recipe-unknown-kind": lambda t, o: ["train", _recipe(t, "recipe: vln\n")],
    "recipe-alias-bomb": lambda t, o: ["train", _recipe(t, ALIAS_BOMB)],
    "recipe-missing": lambda t, o: ["train", t / "nope.yaml"],
    "section-as-number": lambda t, o: ["train", VLM, "data=5", f"output_dir={o}"],
    "nested-typo-vision": lambda t, o: ["train", VLM, "vision.sorce=x", f"output_dir={o}"],
    "nested-typo-llm": lambda t, o: ["train", VLM, "llm.hiden_size=256", f"output_dir={o}"],
    "nested-typo-data": lambda t, o: ["train", VLM, "data.pth=x", f"output_dir={o}"],
    "nested-typo-lora": lambda t, o: ["train", VLM, "lora.rank=4", f"output_dir={o}"],
    "top-typo": lambda t, o: ["train", VLM, "epochz=3", f"output_dir={o}"],
    "lr-negative": lambda t, o: ["train", VLM, "lr=-1", f"output_dir={o}"],
    "lr-nan": lambda t, o: ["train", VLM, "lr=nan", f"output_dir={o}"],
    "lr-inf": lambda t, o: ["train", VLM, "lr=.inf", f"output_dir={o}"],
    "lr-text": lambda t, o: ["train", VLM, "lr=fast", f"output_dir={o}"],
    "epochs-fraction": lambda t, o: ["train", VLM, "epochs=1.5", f"output_dir={o}"],
    "epochs-zero": lambda t, o: ["train", VLM, "epochs=0", f"output_dir={o}"],
    "epochs-text": lambda t, o: ["train", VLM, "epochs=ten", f"output_dir={o}"],
    "batch-size-zero": lambda t, o: ["train", VLM, "batch_size=0", f"output_dir={o}"],
    "max-steps-negative": lambda t, o: ["train", VLM, "max_steps=-1", f"output_dir={o}"],
    "warmup-negative": lambda t, o: ["train", VLM, "warmup_steps=-3", f"output_dir={o}"],
    "grad-accum-zero": lambda t, o: ["train", VLM, "grad_accum=0", f"output_dir={o}"],
    "precision-unknown": lambda t, o: ["train", VLM, "precision=fp8", f"output_dir={o}", "epochs=1",
                                       "data.path=vqa-rad/test"],
    "bool-garbage": lambda t, o: ["train", VLM, "packing=maybe", f"output_dir={o}"],
    "override-not-kv": lambda t, o: ["train", VLM, "epochs"],
    "output-dir-under-a-file": lambda t, o: ["train", VLM, f"output_dir={_write(t / 'afile', 'x')}/run"],
    "output-dir-in-proc": lambda t, o: ["train", VLM, "output_dir=/proc/medvl-run"],
    # eval values
    "bootstrap-negative": lambda t, o: ["eval", "vqa", "--pred", _good_preds(t), "--ref", "vqa-rad/test",
                                        "--bootstrap", "-5"],
    "bootstrap-text": lambda t, o: ["eval", "vqa", "--pred", _good_preds(t), "--ref", "vqa-rad/test",
                                    "--bootstrap", "many"],
    "eval-out-is-folder": lambda t, o: ["eval", "vqa", "--pred", _good_preds(t), "--ref", "vqa-rad/test",
                                        "--allow-missing", "--out", _folder(t, "outdir")],
    "eval-out-in-proc": lambda t, o: ["eval", "vqa", "--pred", _good_preds(t), "--ref", "vqa-rad/test",
                                      "--allow-missing", "--out", "/proc/medvl/r.json"],
    "eval-html-under-file": lambda t, o: ["eval", "vqa", "--pred", _good_preds(t), "--ref", "vqa-rad/test",
                                          "--allow-missing", "--html", f"{_write(t / 'f2', 'x')}/r.html"],
    "cls-string-scores": lambda t, o: ["eval", "cls", "--pred", _write(t / "p.jsonl", json.dumps(
        {"id": "1", "prediction": "a", "scores": {"a": "high", "b": 0.1}}) + "\n"), "--ref", _labels(t)],
    "cls-nan-scores": lambda t, o: ["eval", "cls", "--pred", _write(t / "p.jsonl", json.dumps(
        {"id": "1", "prediction": "a", "score_a": float("nan"), "score_b": 0.1}) + "\n"), "--ref", _labels(t)],
    "retrieval-non-square": lambda t, o: ["eval", "retrieval", "--sim", _npy(t, np.zeros((3, 5)))],
    "retrieval-strings": lambda t, o: ["eval", "retrieval", "--sim", _npy(t, np.array([["a", "b"], ["c", "d"]]))],
    "retrieval-1d": lambda t, o: ["eval", "retrieval", "--sim", _npy(t, np.zeros(4))],
    "retrieval-nan": lambda t, o: ["eval", "retrieval", "--sim", _npy(t, np.full((3, 3), np.nan))],
    "retrieval-pickle": lambda t, o: ["eval", "retrieval", "--sim", _npy(t, np.array([{"a": 1}], dtype=object))],
    "retrieval-bad-k": lambda t, o: ["eval", "retrieval", "--sim", _npy(t, np.eye(3)), "--k", "1,abc"],
    "retrieval-zero-k": lambda t, o: ["eval", "retrieval", "--sim", _npy(t, np.eye(3)), "--k", "0"],
    "retrieval-t2i-range": lambda t, o: ["eval", "retrieval", "--sim", _npy(t, np.eye(3)), "--text-to-image",
                                         _write(t / "t.json", "[0, 1, 7]")],
    "retrieval-t2i-malformed": lambda t, o: ["eval", "retrieval", "--sim", _npy(t, np.eye(3)), "--text-to-image",
                                             _write(t / "t.json", "[0, 1,")],
    "retrieval-t2i-strings": lambda t, o: ["eval", "retrieval", "--sim", _npy(t, np.eye(3)), "--text-to-image",
                                           _write(t / "t.json", '["a", "b", "c"]')],
    "grounding-two-numbers": lambda t, o: ["eval", "grounding", "--pred", _good_preds(t), "--ref",
                                           _boxes(t, [1, 2])],
    "grounding-letters": lambda t, o: ["eval", "grounding", "--pred", _good_preds(t), "--ref",
                                       _boxes(t, ["a", "b", "c", "d"])],
    "grounding-no-boxes": lambda t, o: ["eval", "grounding", "--pred", _good_preds(t), "--ref", _good_preds(t, "r")],
    "report-empty-reference": lambda t, o: ["eval", "report", "--pred", _good_preds(t), "--ref", _write(
        t / "refs.jsonl", "".join(json.dumps({"id": str(i), "reference": "" if i == 1 else "no effusion"}) + "\n"
                                  for i in range(3))), "--metrics", "bleu"],
    "join-questions-differ": lambda t, o: ["eval", "vqa", "--pred", _write(t / "q.jsonl", "".join(json.dumps(
        {"id": s, "question": "is this a trick?", "prediction": "yes"}) + "\n" for s in ("0", "1", "2"))),
        "--ref", "vqa-rad/test", "--allow-missing"],
    # data and predict values
    "convert-output-under-file": lambda t, o: ["data", "convert", "--from", "medvl", "--to", "llava", "vqa-rad/test",
                                               f"{_write(t / 'f3', 'x')}/out.json"],
    "convert-output-is-folder": lambda t, o: ["data", "convert", "--from", "vqa-rad", "--to", "medvl",
                                              _vqarad(t), _folder(t, "outfolder")],
    "convert-unknown-format": lambda t, o: ["data", "convert", "--from", "lava", "--to", "medvl", _vqarad(t),
                                            f"{o}/out.jsonl"],
    "convert-unknown-option": lambda t, o: ["data", "convert", "--from", "vqa-rad", "--to", "medvl", _vqarad(t),
                                            f"{o}/out.jsonl", "--opt", "imagedir=x"],
    "convert-nothing-written": lambda t, o: ["data", "convert", "--from", "llava", "--to", "medvl", _write(
        t / "l.json", json.dumps([{"id": i, "image": "x.png"} for i in range(5)])), f"{o}/out.jsonl"],
    "dataset-info-unknown-entry": lambda t, o: ["data", "validate", _write(t / "dataset_info.json", json.dumps(
        {"a": {"file_name": "a.json", "formatting": "sharegpt"}})), "--dataset", "b"],
    "predict-out-is-folder": lambda t, o: ["predict", "--data", "vqa-rad/test", "--out", _folder(t, "pf")],
    "predict-unknown-bundled": lambda t, o: ["predict", "--data", "vqa-rad/dev", "--out", f"{o}/a.jsonl"],
    "zero-shot-fifo": lambda t, o: ["zero-shot", _fifo(t, "img.png"), "--labels", "head", "chest"],
    "zero-shot-text-as-image": lambda t, o: ["zero-shot", _write(t / "x.png", "not an image"), "--labels", "a", "b"],
    "zero-shot-nan-image": lambda t, o: ["zero-shot", _npy(t, np.where(np.eye(8) > 0, np.nan, 0.0)), "--labels",
                                         "a", "b"],
    "zero-shot-inf-image": lambda t, o: ["zero-shot", _npy(t, np.where(np.eye(8) > 0, np.inf, 0.0)), "--labels",
                                         "a", "b"],
    "llm-source-unknown": lambda t, o: ["train", str(RECIPES / "vlm-lora.yaml"), "llm.source=nope/nope",
                                        f"output_dir={o}", "data.path=vqa-rad/test"],
    "lm-tiny-vlm-not-empty": lambda t, o: ["lm", "tiny-vlm", "qwen2-vl", _write(t / "full" / "x", "x").parent],
}


def _good_preds(t: Path, name: str = "p") -> Path:
    return _write(t / f"{name}.jsonl", "".join(json.dumps({"id": str(i), "prediction": "yes"}) + "\n" for i in range(3)))


def _labels(t: Path) -> Path:
    return _write(t / "labels.jsonl", json.dumps({"id": "1", "label": "a"}) + "\n")


def _npy(t: Path, arr) -> Path:
    np.save(t / "sim.npy", arr, allow_pickle=True)
    return t / "sim.npy"


def _boxes(t: Path, box) -> Path:
    return _write(t / "boxes.jsonl", "".join(json.dumps({"id": str(i), "box": box}) + "\n" for i in range(3)))


def _vqarad(t: Path) -> Path:
    return _write(t / "vqarad.json", json.dumps([{"qid": 1, "image_name": "x.jpg", "question": "q?", "answer": "a",
                                                   "answer_type": "CLOSED", "question_type": "PRES"}]))


@pytest.mark.parametrize("name", sorted(VALUE_CASES))
def test_hostile_value(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    work, out = tmp_path / "in", tmp_path / "out"
    work.mkdir()
    code, err = run_case(VALUE_CASES[name](work, out), capsys, out)
    assert_one_clean_error(code, err, out, name)


def test_the_corpus_is_large_enough():
    assert len(BAD_FILES) * len(FILE_COMMANDS) + len(VALUE_CASES) >= 150
