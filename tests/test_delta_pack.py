"""LM blocks saved as few-bit deltas against their named source (medvl lm pack): the codec's error
bound, a round trip through save_vlm / load_vlm, the CLI, and a changed source refused."""

from __future__ import annotations

import json

import pytest
import torch

from medvl.errors import MedvlUserError
from medvl.models import lm_sources
from medvl.models.delta_codec import decode, encode
from medvl.models.vlm import MedVLM, MedVLMConfig, load_vlm

SIGLIP = {"name": "hf", "hf_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                                      "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}}
TEXT = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_stay_within_half_a_step(bits):
    torch.manual_seed(bits)
    d = torch.randn(24, 192) * torch.rand(24, 1) * 0.02  # rows of different magnitude
    codes, scales = encode(d, bits, group=64)
    assert codes.dtype == torch.uint8 and codes.shape == (24, 192 * bits // 8)
    assert scales.dtype == torch.bfloat16 and scales.shape == (24, 3)
    err = (decode(codes, scales, bits) - d).abs().reshape(24, 3, 64)
    assert (err <= scales.float().unsqueeze(-1) / 2 + 1e-7).all()
    assert decode(*encode(torch.zeros(4, 64), bits), bits).abs().max() == 0  # an unchanged matrix stays unchanged


def test_codec_refuses_what_it_cannot_pack():
    with pytest.raises(ValueError, match="bits must be one of"):
        encode(torch.zeros(4, 64), bits=3)
    with pytest.raises(ValueError, match="must divide the input size"):
        encode(torch.zeros(4, 96), bits=4, group=64)


@pytest.fixture
def tuned(tmp_path, monkeypatch):
    """A tiny VLM whose LM is a saved 'source' (named tiny-src) plus a small fine-tuning delta."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    tc = dict(TEXT)
    src = AutoModelForCausalLM.from_config(AutoConfig.for_model(tc.pop("model_type"), **tc))
    src.save_pretrained(tmp_path / "src")
    real = lm_sources.resolve_lm_source
    monkeypatch.setattr(lm_sources, "resolve_lm_source",
                        lambda s, **k: str(tmp_path / "src") if s == "tiny-src" else real(s, **k))
    model = MedVLM(MedVLMConfig(vision=SIGLIP, text_config=TEXT, llm_source="tiny-src", image_token_id=95)).eval()
    model.llm.load_state_dict(src.state_dict())
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if ".layers." in name:
                p.add_(0.02 * p.abs().mean() * torch.randn_like(p))  # what training changes
    return model, tmp_path


def test_blocks_saved_as_deltas_load_back_close_and_smaller(tuned):
    model, tmp = tuned
    full = model.save_vlm(tmp / "full")
    packed = model.save_vlm(tmp / "packed", delta_bits=4)
    spec = json.loads((packed / "config.json").read_text())["llm_from_source"]["deltas"]
    assert spec["bits"] == 4 and spec["group"] == 64 and len(spec["fingerprint"]) == 64
    assert len(spec["keys"]) == 2 * 7 and all(".layers." in k for k in spec["keys"])  # q k v o gate up down x 2
    assert (packed / "model.safetensors").stat().st_size < 0.6 * (full / "model.safetensors").stat().st_size
    back = load_vlm(packed).state_dict()
    want = model.state_dict()
    assert set(back) == set(want)
    from safetensors.torch import load_file
    src = load_file(str(tmp / "src" / "model.safetensors"))
    for k in spec["keys"]:  # each entry within half a 4-bit step of its group's delta (absmax / 7 / 2)
        delta = (want[k] - src[k[len("llm."):]]).reshape(want[k].shape[0], -1, 64)
        step = delta.abs().amax(-1, keepdim=True) / 7
        assert 0 < (back[k] - want[k]).abs().max() and \
            ((back[k] - want[k]).reshape(delta.shape).abs() <= step * 0.51 + 1e-6).all(), k
    for k, v in want.items():
        if k not in spec["keys"]:
            assert torch.equal(back[k], v), k  # everything else exactly as saved (fp32)
    x = torch.randint(0, 90, (1, 12))
    with torch.no_grad():
        a = model.llm(input_ids=x).logits
        b = load_vlm(packed).llm(input_ids=x).logits
    assert torch.allclose(a, b, atol=0.05 * a.abs().max().item()), (a - b).abs().max()
    # saving the loaded model again, in full, records no deltas (it holds decoded weights)
    again = load_vlm(packed).save_vlm(tmp / "again")
    assert json.loads((again / "config.json").read_text())["llm_from_source"] is None


def test_a_changed_source_is_refused_and_bad_requests_are_clear(tuned):
    from transformers import AutoModelForCausalLM
    model, tmp = tuned
    packed = model.save_vlm(tmp / "packed", delta_bits=2)
    with pytest.raises(MedvlUserError, match="delta bits must be one of 2, 4, 8"):
        model.save_vlm(tmp / "x", delta_bits=3)
    with pytest.raises(MedvlUserError, match="positive multiple of 2 at 4 bits"):
        model.save_vlm(tmp / "x", delta_bits=4, delta_group=3)
    src = AutoModelForCausalLM.from_pretrained(tmp / "src")
    with torch.no_grad():
        src.model.layers[1].mlp.up_proj.weight[0, 0] += 1.0
    src.save_pretrained(tmp / "src")
    with pytest.raises(MedvlUserError, match="not the one this model's block deltas were taken against"):
        load_vlm(packed)
    model.config.llm_source = str(tmp / "src")  # a local folder can move: never a base for deltas
    with pytest.raises(MedvlUserError, match="named LM source or hub id"):
        model.save_vlm(tmp / "y", delta_bits=4)


def test_medvl_lm_pack_writes_a_new_folder(tuned, capsys):
    from medvl.cli import main
    model, tmp = tuned
    model.save_vlm(tmp / "run")
    (tmp / "run" / "tokenizer").mkdir()
    (tmp / "run" / "tokenizer" / "tokenizer.json").write_text("{}")
    (tmp / "run" / "results.json").write_text("{}")
    assert main(["lm", "pack", str(tmp / "run"), str(tmp / "small"), "--bits", "4"]) == 0
    assert "4-bit deltas against tiny-src" in capsys.readouterr().out
    assert (tmp / "small" / "tokenizer" / "tokenizer.json").is_file()
    assert not (tmp / "small" / "results.json").exists()  # the scores were the unpacked model's
    assert load_vlm(tmp / "small").config.llm_from_source["deltas"]["bits"] == 4
    assert main(["lm", "pack", str(tmp / "run"), str(tmp / "small")]) == 2  # will not overwrite (user error)
    assert "not empty" in capsys.readouterr().err
