"""Each seed's workflow end to end on files in that seed's own layout, run from a working directory
other than the data's, with the commands docs/seeds.md gives (small fixtures made here, stand-in
images at the seeds' paths)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medvl.cli import main

RECIPES = Path(__file__).parents[1] / "recipes"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    o = capsys.readouterr()
    return code, o.out, o.err


def _image(path: Path, shade: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(shade).integers(0, 255, (48, 48), dtype=np.uint8)).save(path)


# ---- MMKD-CLIP -----------------------------------------------------------------------------------
TEACHERS = {"BMCA": (512, 768), "BiomedCLIP": (512, 512), "UniMedCLIP": (512, 512)}  # projected, raw widths


def mmkd_tree(root: Path, n: int = 12) -> Path:
    """MMKD-CLIP's layout: meta.jsonl rows (folderid, id, imgpath, metapath, txt, available_clips) and
    features/<folderid>/<id>/clips_output.pt + clips_project_output.pt, torch.save'd dicts of 1-D tensors."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        folder, sid = f"{i // 5:03d}", f"{i:05d}"
        clips = sorted(TEACHERS) if i % 3 else ["BMCA", "BiomedCLIP"]
        _image(root / "images" / folder / f"{sid}.jpg", i)
        d = root / "features" / folder / sid
        d.mkdir(parents=True)
        for fname, which in (("clips_project_output.pt", 0), ("clips_output.pt", 1)):
            torch.save({f"{t}_{m}": torch.randn(TEACHERS[t][which], generator=g) for t in clips
                        for m in ("img", "txt")}, d / fname)
        rows.append({"folderid": folder, "id": sid, "imgpath": f"images/{folder}/{sid}.jpg",
                     "metapath": f"meta/{folder}/{sid}.json", "txt": f"axial ct of the abdomen, case {i}",
                     "available_clips": clips})
    (root / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "meta.jsonl"


def test_mmkd_clip_real_layout_validates_and_trains_from_another_directory(tmp_path, monkeypatch, capsys):
    meta = mmkd_tree(tmp_path / "mmkd")
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    from medvl.data.formats import get_format
    conv = get_format("mmkd-clip").read(meta)
    s = conv.samples[1]
    assert s.teacher_features["BMCA_img"] == "features/000/00001/clips_project_output.pt#BMCA_img"
    raw = get_format("mmkd-clip").read(meta, features="raw").samples[1]
    from medvl.data.formats.mmkd import load_teacher_feature
    assert load_teacher_feature(raw.teacher_features["BMCA_img"], meta.parent).shape == (768,)
    code, out, err = run(capsys, "data", "validate", meta, "--format", "mmkd-clip")
    assert code == 0, out + err
    code, out, err = run(capsys, "train", RECIPES / "mmkd-stage2.yaml", f"data.path={meta}", "model=test-tiny",
                         "max_steps=2", "batch_size=4", "warmup_steps=1", "precision=fp32", "output_dir=run", "log_every=1")
    assert code == 0, out + err
    assert (work / "run" / "model").exists()
    log = [json.loads(l) for l in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all({"clip", "mse", "cross"} <= set(r) for r in log)  # the teachers were used
    assert "12 image-text pairs; left out: nothing" in out + err


def test_mmkd_validate_reports_missing_teacher_features(tmp_path, monkeypatch, capsys):
    meta = mmkd_tree(tmp_path / "mmkd", n=4)
    import shutil
    shutil.rmtree(tmp_path / "mmkd" / "features" / "000" / "00002")
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "data", "validate", meta, "--format", "mmkd-clip")
    assert code == 2 and "no teacher feature file was found" in out + err and "00002" in out + err


# ---- shared: a tiny composed model for a few steps (the mechanics, not the numbers) ------------------
TINY = ["vision={name: hf, hf_config: {model_type: siglip_vision_model, hidden_size: 32, intermediate_size: 64, "
        "num_hidden_layers: 1, num_attention_heads: 2, image_size: 32, patch_size: 8}}",
        "llm={model_type: qwen2, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
        "num_attention_heads: 2, num_key_value_heads: 1, tie_word_embeddings: true}",
        "vocab_size=300", "allow_frozen_random=true", "precision=fp32", "max_steps=2", "batch_size=4",
        "warmup_steps=1", "log_every=1", "epochs=1", "system_prompt=null"]


def train_tiny(capsys, recipe: str, *overrides) -> Path:
    code, out, err = run(capsys, "train", RECIPES / recipe, *TINY, *overrides)
    assert code == 0, out + err
    return Path("run") / "model"


def jl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- LLaMA-Factory sharegpt + dataset_info.json (ClinKD's data, Qwen2-VL boxes) -------------------
def llamafactory_tree(root: Path) -> Path:
    for k in range(4):
        _image(root / "mllm_med" / f"{k}.png", 10 + k)
    rows = [
        {"messages": [{"role": "user", "content": "<image>What modality is this?"},
                      {"role": "assistant", "content": "ct scan"},
                      {"role": "user", "content": "Which organ is shown?"},
                      {"role": "assistant", "content": "the liver"},
                      {"role": "user", "content": "Is it normal?"}, {"role": "assistant", "content": "no"}],
         "images": ["mllm_med/0.png"]},
        {"messages": [{"role": "user", "content": "<image>Where is the left lung?"},
                      {"role": "assistant", "content": "<|object_ref_start|>left lung<|object_ref_end|>"
                                                       "<|box_start|>(247,265),(367,497)<|box_end|>"}],
         "images": ["mllm_med/1.png"]},
        {"messages": [{"role": "user", "content": "<image>Locate the heart."},
                      {"role": "assistant", "content": "<|object_ref_start|>heart<|object_ref_end|>"
                                                       "<|box_start|>(400,420),(700,780)<|box_end|>"}],
         "images": ["mllm_med/2.png"]},
        {"messages": [{"role": "user", "content": "<image>Is there a fracture?"},
                      {"role": "assistant", "content": "yes"}], "images": ["mllm_med/3.png"]},
    ]
    (root / "med.json").write_text(json.dumps(rows))
    (root / "dataset_info.json").write_text(json.dumps({
        "identity": {"file_name": "identity.json"},  # another entry, alpaca-formatted, as in LLaMA-Factory's data/
        "mllm_med": {"file_name": "med.json", "formatting": "sharegpt",
                     "columns": {"messages": "messages", "images": "images"},
                     "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                              "assistant_tag": "assistant"}}}))
    return root / "dataset_info.json"


def test_llamafactory_sharegpt_workflow(tmp_path, monkeypatch, capsys):
    info = llamafactory_tree(tmp_path / "data")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    code, out, err = run(capsys, "data", "validate", info)
    assert code == 2 and "--dataset NAME" in err  # two entries: it says how to pick one
    code, out, err = run(capsys, "data", "validate", info, "--dataset", "mllm_med")
    assert code == 0 and "4 samples" in out, out + err
    code, out, err = run(capsys, "data", "convert", "--from", "sharegpt", "--to", "medvl", info, "conv/med.jsonl",
                         "--dataset", "mllm_med")
    assert code == 0, out + err
    code, out, err = run(capsys, "data", "validate", "conv/med.jsonl")  # paths rewritten for the new folder
    assert code == 0, out + err
    samples = jl_rows(Path("conv/med.jsonl"))
    assert samples[1]["boxes"][0]["bbox"] == [247, 265, 367, 497]
    model = train_tiny(capsys, "vlm-sft-vqarad.yaml", f"data.path={info}", "data.options={dataset: mllm_med}",
                       "output_dir=run")
    code, out, err = run(capsys, "predict", "--model", model, "--data", "conv/med.jsonl", "--out", "preds.jsonl",
                         "--max-new-tokens", "4")
    assert code == 0, out + err
    preds = {p["id"]: p for p in jl_rows(Path("preds.jsonl"))}
    assert preds["0"]["question"] == "Is it normal?" and preds["1"]["question"] == "Where is the left lung?"
    code, out, err = run(capsys, "eval", "grounding", "--pred", "preds.jsonl", "--ref", "conv/med.jsonl",
                         "--out", "g.json")
    assert code == 0 and "2 of 4 record(s) have no reference box" in out, out + err
    assert json.loads(Path("g.json").read_text())["n"] == 2


# ---- MedM-VL 2D / 3D JSON ------------------------------------------------------------------------
def medmvl_tree(root: Path) -> tuple[Path, Path]:
    rows2d, rows3d = [], []
    qa = [("Is there a pleural effusion?", "yes"), ("What organ is shown?", "the chest"),
          ("Is the heart enlarged?", "no"), ("What modality is used?", "x-ray")] * 2
    for k, (q, a) in enumerate(qa):
        _image(root / "images" / f"cxr{k}.png", 30 + k)
        rows2d.append({"id": f"m{k}", "image": [f"images/cxr{k}.png"],
                       "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})
    (root / "volumes").mkdir(parents=True)
    for k in range(2):
        np.save(root / "volumes" / f"ct{k}.npy", np.random.default_rng(k).normal(size=(8, 32, 32)).astype("float32"))
        rows3d.append({"id": f"v{k}", "image3d": f"volumes/ct{k}.npy",
                       "conversations": [{"from": "human", "value": "<image3d>\nDescribe the CT."},
                                         {"from": "gpt", "value": "no acute abnormality."}]})
    (root / "finetune_2d.json").write_text(json.dumps(rows2d))
    (root / "finetune_3d.json").write_text(json.dumps(rows3d))
    return root / "finetune_2d.json", root / "finetune_3d.json"


def test_medmvl_workflow_2d_and_3d(tmp_path, monkeypatch, capsys):
    f2d, f3d = medmvl_tree(tmp_path / "medmvl")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for f in (f2d, f3d):
        code, out, err = run(capsys, "data", "validate", f, "--format", "medm-vl", "--decode")
        assert code == 0, out + err
    model = train_tiny(capsys, "vlm-sft-vqarad.yaml", f"data.path={f2d}", "data.format=medm-vl", "output_dir=run")
    code, out, err = run(capsys, "predict", "--model", model, "--data", f2d, "--format", "medm-vl",
                         "--out", "answers.jsonl", "--max-new-tokens", "4")
    assert code == 0, out + err
    code, out, err = run(capsys, "eval", "vqa", "--pred", "answers.jsonl", "--ref", f2d, "--ref-format", "medm-vl",
                         "--out", "v.json")
    assert code == 0, out + err
    assert json.loads(Path("v.json").read_text())["join"]["questions_agreeing"] == 8
    # MedM-VL's own inference output: a JSON list of answers in the data file's order
    Path("medmvl_out.json").write_text(json.dumps([r["prediction"] for r in jl_rows(Path("answers.jsonl"))]))
    code, out, err = run(capsys, "eval", "vqa", "--pred", "medmvl_out.json", "--ref", f2d, "--ref-format", "medm-vl")
    assert code == 0 and "by position" in out, out + err
    # 3D: a vit3d tower on the volumes
    code, out, err = run(capsys, "train", RECIPES / "vlm-sft-vqarad.yaml", *TINY, f"data.path={f3d}",
                         "data.format=medm-vl", "vision={name: vit3d, volume_size: [8, 32, 32], patch_size: [4, 16, 16], "
                         "width: 32, depth: 1, heads: 2}", "freeze={vision: full}", "output_dir=run3d")
    assert code == 0, out + err


# ---- medcap: captions, vision tower + connector trained, LM frozen --------------------------------
def test_medcap_captions_workflow(tmp_path, monkeypatch, capsys):
    root = tmp_path / "roco"
    lines = ["image,caption"]
    for k in range(8):
        _image(root / "img" / f"r{k}.jpg", 50 + k)
        lines.append(f"img/r{k}.jpg,\"Axial CT of the abdomen showing a {['cyst', 'mass'][k % 2]} in the liver.\"")
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    code, out, err = run(capsys, "data", "validate", root / "captions.csv", "--format", "captions")
    assert code == 0, out + err
    model = train_tiny(capsys, "vlm-vision-tune.yaml", f"data.path={root / 'captions.csv'}", "data.format=captions",
                       "output_dir=run")
    from medvl.models.vlm import load_vlm
    trained = load_vlm(model)
    assert trained is not None
    code, out, err = run(capsys, "predict", "--model", model, "--data", root / "captions.csv", "--format", "captions",
                         "--out", "caps.jsonl", "--max-new-tokens", "6")
    assert code == 0, out + err
    code, out, err = run(capsys, "eval", "report", "--pred", "caps.jsonl", "--ref", root / "captions.csv",
                         "--ref-format", "captions", "--metrics", "bleu,rouge-l")
    assert code == 0 and "bleu4" in out, out + err


# ---- MIMIC-CXR layout + LLaVA-Med answer file ------------------------------------------------------
def test_mimic_report_workflow_with_llava_med_answers(tmp_path, monkeypatch, capsys):
    import csv
    import shutil
    root = tmp_path / "mimic-cxr-jpg"
    shutil.copytree(Path(__file__).parent / "fixtures" / "formats" / "mimic", root)
    with open(root / "mimic-cxr-2.0.0-metadata.csv") as f:
        for k, r in enumerate(csv.DictReader(f)):
            _image(root / "files" / f"p{r['subject_id'][:2]}" / f"p{r['subject_id']}" / f"s{r['study_id']}" /
                   f"{r['dicom_id']}.jpg", 70 + k)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    code, out, err = run(capsys, "data", "convert", "--from", "mimic-cxr", "--to", "medvl", root, "out/findings.jsonl",
                         "--opt", "section=findings", "--opt", "views=PA,AP")
    assert code == 0, out + err
    code, out, err = run(capsys, "data", "validate", "out/findings.jsonl", "--decode")  # no --image-root needed
    assert code == 0, out + err
    model = train_tiny(capsys, "vlm-report-mimic.yaml", f"data.path={root}", "output_dir=run", "max_length=256")
    code, out, err = run(capsys, "predict", "--model", model, "--data", "out/findings.jsonl", "--out", "answers.jsonl",
                         "--pred-format", "llava-med", "--max-new-tokens", "8")
    assert code == 0, out + err
    rows = jl_rows(Path("answers.jsonl"))
    assert set(rows[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    code, out, err = run(capsys, "eval", "report", "--pred", "answers.jsonl", "--ref", "out/findings.jsonl",
                         "--metrics", "bleu,rouge-l,chexpert", "--out", "r.json")
    assert code == 0, out + err
    res = json.loads(Path("r.json").read_text())
    assert res["join"]["questions_agreeing"] == res["n"] > 0


def test_clinkd_native_qwen2vl_distill_and_reflect_offline(tmp_path, monkeypatch, capsys):
    """ClinKD's recipe on a tiny Qwen2-VL made offline (`medvl lm tiny-vlm`): logit KD from a teacher, the
    modality gap, LLaMA-Factory data with Qwen2-VL boxes, then a reflective-correction round."""
    info = llamafactory_tree(tmp_path / "data")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    code, out, err = run(capsys, "lm", "tiny-vlm", "qwen2-vl", "q2")
    assert code == 0, out + err
    code, out, err = run(capsys, "train", RECIPES / "clinkd-qwen2vl.yaml", "native=q2", "distill.teacher=q2",
                         f"data.path={info}", "data.options={dataset: mllm_med}", "precision=fp32", "max_steps=2",
                         "batch_size=2", "grad_accum=1", "max_length=512", "warmup_steps=1", "log_every=1",
                         "output_dir=run", "reflect.rounds=1")
    assert code == 0 and "reflect round 1" in out, out + err
    log = jl_rows(Path("run/round0/metrics.jsonl"))
    assert {"kd", "ce"} <= set(log[-1])  # the distillation loss ran
    from transformers import AutoConfig
    assert AutoConfig.from_pretrained("run/round1/model").medvl_position_gap == 1
