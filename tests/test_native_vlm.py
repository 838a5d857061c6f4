"""Native Hugging Face VLMs (tiny configs built offline) through medvl's interface."""

import pytest
import torch

from medvl.data.bundled import load_bundled
from medvl.models.native import NativeVLM
from medvl.train.vlm import train_native

pytest.importorskip("torchvision")


def _tok():
    from medvl.models.tiny_native import _tokenizer
    return _tokenizer()


def tiny_llava():
    from medvl.models.tiny_native import tiny_llava as build
    return build()


def tiny_qwen2vl(width: int = 64, seed: int = 0):
    from medvl.models.tiny_native import tiny_qwen2vl as build
    return build(width, seed)


@pytest.mark.parametrize("build", [tiny_llava, tiny_qwen2vl], ids=["llava", "qwen2-vl"])
def test_native_train_generate_save(build, tmp_path):
    vlm = build()
    train = load_bundled("vqa-rad", "train")[:8]
    e = vlm.encode(train[0])
    learned = vlm.tok.decode(e["labels"][0][e["labels"][0] != -100])
    assert learned.startswith(train[0].conversation[-1].text)  # loss on the answer only
    res = train_native(vlm, train, epochs=1, batch_size=4, precision="fp32")
    assert len(res["losses"]) == 2 and all(l == l for l in res["losses"])
    answers = vlm.generate(load_bundled("vqa-rad", "test")[:3], batch_size=3, max_new_tokens=4)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    vlm.save(tmp_path / "m")
    back = NativeVLM.from_pretrained(tmp_path / "m")
    x = back.collate([back.encode(train[1])])
    y = vlm.collate([vlm.encode(train[1])])
    with torch.no_grad():
        assert torch.allclose(back.model(**x).logits, vlm.model(**y).logits, atol=1e-5)


def test_native_vlm_through_the_recipe(tmp_path):
    from medvl.train.vlm import VLMTrainConfig, train_vlm
    tiny_llava().save(tmp_path / "llava")
    cfg = VLMTrainConfig(native=str(tmp_path / "llava"), stage="sft", epochs=1, batch_size=4, precision="fp32",
                         output_dir=str(tmp_path / "out"))
    res = train_vlm(cfg, load_bundled("vqa-rad", "train")[:8], progress=False)
    assert res["steps"] == 2 and res["trainable"]["vision"] == 0 and res["trainable"]["llm"] > 0
    assert res["trainable"]["connector"] > 0
    back = NativeVLM.from_pretrained(tmp_path / "out" / "model")
    assert len(back.generate(load_bundled("vqa-rad", "test")[:2], max_new_tokens=2)) == 2


def test_predict_chat_and_load_work_on_a_native_folder(tmp_path, capsys):
    import json

    import medvl
    from medvl.cli import main
    tiny_llava().save(tmp_path / "llava")
    pipe = medvl.load(tmp_path / "llava")
    assert type(pipe).__name__ == "NativePipeline"
    img = load_bundled("vqa-rad", "test")[0].images[0].path
    assert isinstance(pipe.answer(img, "Is this a CT?", max_new_tokens=3), str)
    assert main(["predict", "--model", str(tmp_path / "llava"), "--data", "vqa-rad/test", "--out",
                 str(tmp_path / "p.jsonl"), "--max-new-tokens", "2", "--batch-size", "64"]) == 0
    assert len({json.loads(x)["id"] for x in (tmp_path / "p.jsonl").read_text().splitlines()}) == 451
    assert main(["chat", "--model", str(tmp_path / "llava"), "--image", img, "--max-new-tokens", "2", "Which organ?"]) == 0


def test_native_lora_trains_adapters_and_exports_merged_and_adapter(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from medvl.errors import MedvlUserError
    from medvl.train.vlm import VLMTrainConfig, train_vlm
    tiny_qwen2vl().save(tmp_path / "q")
    lora = {"r": 4, "alpha": 8, "target_modules": r".*\.(q_proj|v_proj)$", "export": "adapter"}
    cfg = VLMTrainConfig(native=str(tmp_path / "q"), stage="sft", freeze={"llm": "lora"}, lora=lora, epochs=1,
                         batch_size=4, precision="fp32", output_dir=str(tmp_path / "out"), warmup_steps=1)
    res = train_vlm(cfg, load_bundled("vqa-rad", "train")[:8], progress=False)
    n_llm = sum(p.numel() for n, p in NativeVLM.from_pretrained(tmp_path / "q").model.named_parameters()
                if "language_model" in n)
    assert res["trainable"]["vision"] == 0 and res["trainable"]["connector"] > 0
    assert 0 < res["trainable"]["llm"] < n_llm / 10  # adapters only
    back = NativeVLM.from_pretrained(tmp_path / "out" / "model")  # merged: a plain model
    assert not any("lora" in k for k in back.model.state_dict())
    assert len(back.generate(load_bundled("vqa-rad", "test")[:2], max_new_tokens=2)) == 2
    peft = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(str(tmp_path / "q")),
                                     str(tmp_path / "out" / "adapter"))
    assert any("lora_A" in k for k in peft.state_dict())
    # the adapter is the trained model: the connector trained in full travels in modules_to_save
    assert peft.peft_config["default"].modules_to_save
    plain_model = peft.merge_and_unload().eval()
    plain, trained = plain_model.state_dict(), back.model.state_dict()
    assert set(plain) == set(trained)
    assert max(float((plain[k].float() - trained[k].float()).abs().max()) for k in plain) < 1e-6
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        assert torch.allclose(plain_model(input_ids=ids).logits, back.model.eval()(input_ids=ids).logits, atol=1e-5)
    bad = VLMTrainConfig(native=str(tmp_path / "q"), freeze={"llm": "lora"}, lora={"target_modules": r".*\.nope$"},
                         epochs=1, batch_size=4, precision="fp32", output_dir=str(tmp_path / "bad"))
    with pytest.raises(MedvlUserError, match="match no Linear"):
        train_vlm(bad, load_bundled("vqa-rad", "train")[:8], progress=False)


def test_native_recipe_resumes_exactly(tmp_path):
    from medvl.train.vlm import VLMTrainConfig, train_vlm
    tiny_llava().save(tmp_path / "llava")
    train = load_bundled("vqa-rad", "train")[:8]

    def cfg(out, **kw):
        return VLMTrainConfig(native=str(tmp_path / "llava"), epochs=2, batch_size=4, precision="fp32",
                              output_dir=str(tmp_path / out), warmup_steps=1, **kw)
    a = train_vlm(cfg("a"), train, progress=False)
    train_vlm(cfg("b", stop_after_steps=3), train, progress=False)  # stopped inside epoch 2
    b = train_vlm(cfg("b"), train, progress=False)
    assert a["steps"] == b["steps"] == 4
    sa, sb = a["model"].model.state_dict(), b["model"].model.state_dict()
    # equal to ~1e-9 (one float32 ulp): after reloading, the optimizer's state tensors sit at other addresses
    # and the CPU kernels may vectorise their sums differently; two uninterrupted runs are bit-identical
    assert all(torch.allclose(sa[k], sb[k], atol=1e-7, rtol=0) for k in sa)


@pytest.mark.parametrize("build", [tiny_llava, tiny_qwen2vl], ids=["llava", "qwen2-vl"])
def test_native_answer_logits_give_the_models_own_loss(build):
    from medvl.models.native import answer_logits
    vlm = build()
    batch = vlm.collate([vlm.encode(s) for s in load_bundled("vqa-rad", "train")[:3]])
    with torch.no_grad():
        logits, target = answer_logits(vlm.model, batch)
        ref = vlm.model(**batch).loss
    assert torch.allclose(torch.nn.functional.cross_entropy(logits, target), ref, atol=1e-5)


def test_clinkd_native_teacher_live_and_cached(tmp_path):
    """Qwen2-VL -> Qwen2-VL of another width over one tokenizer: live teacher, cached top-k teacher; a
    teacher with another tokenizer is refused."""
    from medvl.distill.teacher import cache_teacher
    from medvl.errors import MedvlUserError
    from medvl.train.vlm import VLMTrainConfig, train_vlm
    tiny_qwen2vl(width=96, seed=1).save(tmp_path / "teacher")
    tiny_qwen2vl(width=64).save(tmp_path / "student")
    train = load_bundled("vqa-rad", "train")[:8]

    def cfg(out, distill):
        return VLMTrainConfig(native=str(tmp_path / "student"), epochs=1, batch_size=4, precision="fp32",
                              warmup_steps=1, log_every=1, output_dir=str(tmp_path / out),
                              distill={"alpha": 0.5, "temperature": 0.5, **distill})
    live = train_vlm(cfg("live", {"teacher": str(tmp_path / "teacher")}), train, progress=False)
    assert live["steps"] == 2 and {"kd", "ce"} <= set(live["log"][-1]) and live["log"][-1]["kd"] > 0
    info = cache_teacher(tmp_path / "teacher", train, tmp_path / "cache", topk=8, max_length=1024, progress=False)
    assert info["samples"] == 8 and info["answer_tokens"] > 8
    cached = train_vlm(cfg("cached", {"teacher_cache": str(tmp_path / "cache")}), train, progress=False)
    assert cached["steps"] == 2 and cached["log"][-1]["kd"] > 0
    tiny_llava().save(tmp_path / "other")  # a tokenizer without Qwen2-VL's vision tokens
    with pytest.raises(MedvlUserError, match="tokenizer differs"):
        train_vlm(cfg("bad", {"teacher": str(tmp_path / "other")}), train, progress=False)


def test_clinkd_qwen2vl_recipe_runs_on_tiny_configs(tmp_path, capsys):
    """recipes/clinkd-qwen2vl.yaml (the published setting with hub ids), pointed at tiny local models and a
    ShareGPT file; then SASG and pseudo-labels with the native models."""
    import json
    from pathlib import Path

    from medvl.cli import main
    from medvl.data.schema import write_jsonl
    from medvl.distill.pseudo import pseudo_label
    tiny_qwen2vl(width=96, seed=1).save(tmp_path / "teacher")
    tiny_qwen2vl(width=64).save(tmp_path / "student")
    write_jsonl(load_bundled("vqa-rad", "train")[:8], tmp_path / "d.jsonl")
    assert main(["data", "convert", "--from", "medvl", "--to", "sharegpt", str(tmp_path / "d.jsonl"),
                 str(tmp_path / "bird.json")]) == 0
    recipe = str(Path(__file__).resolve().parent.parent / "recipes" / "clinkd-qwen2vl.yaml")
    code = main(["train", recipe, f"native={tmp_path / 'student'}", f"distill.teacher={tmp_path / 'teacher'}",
                 f"data.path={tmp_path / 'bird.json'}", f"output_dir={tmp_path / 'run'}", "batch_size=4",
                 "grad_accum=1", "warmup_steps=1", "precision=fp32", "max_length=1024"])
    assert code == 0, capsys.readouterr().err
    model = tmp_path / "run" / "model"
    assert json.loads((model / "config.json").read_text())["medvl_position_gap"] == 1
    out = tmp_path / "sasg.jsonl"
    assert main(["predict", "--model", str(model), "--data", str(tmp_path / "d.jsonl"), "--out", str(out), "--sasg", "3",
                 "--max-new-tokens", "3"]) == 0
    assert len(out.read_text().splitlines()) == 8
    kept, rep = pseudo_label(tmp_path / "teacher", load_bundled("vqa-rad", "train")[:4], max_new_tokens=3,
                             progress=False)
    assert rep["questions"] == 4 and rep["kept"] + rep["empty_answer"] == 4


@pytest.mark.parametrize("build", [tiny_llava, tiny_qwen2vl], ids=["llava", "qwen2-vl"])
def test_native_supervises_every_assistant_turn(build, tmp_path):
    """A LLaMA-Factory-style record with three answers learns all three (it learned only the last)."""
    from PIL import Image
    from medvl.data.schema import Media, Sample, Turn
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "a.png")
    answers = ["ct scan", "the liver", "no"]
    s = Sample("mt", [Media(str(tmp_path / "a.png"))], [
        Turn("user", "<image>\nWhat modality is this?"), Turn("assistant", answers[0]),
        Turn("user", "Which organ?"), Turn("assistant", answers[1]),
        Turn("user", "Is it normal?"), Turn("assistant", answers[2])])
    vlm = build()
    vlm.max_length = 4096
    e = vlm.encode(s)
    ids, labels = e["input_ids"][0].tolist(), e["labels"][0].tolist()
    from test_vlm import supervised_spans
    spans = supervised_spans(ids, labels)
    assert len(spans) == 3
    for (a, b), answer in zip(spans, answers):
        text = vlm.tok.decode(ids[a:b])
        assert text.startswith(answer) and "user" not in text and "<image>" not in text
    last = Sample("mt2", s.images, s.conversation, meta={"loss_on": "last"})
    e2 = vlm.encode(last)
    (a, b), = supervised_spans(e2["input_ids"][0].tolist(), e2["labels"][0].tolist())
    assert vlm.tok.decode(e2["input_ids"][0, a:b]).startswith("no")


def test_native_qwen2vl_trains_on_boxes_in_its_own_syntax(tmp_path):
    import json
    from PIL import Image
    from medvl.data.formats import get_format
    Image.new("RGB", (64, 64), (80, 80, 80)).save(tmp_path / "cxr.png")
    (tmp_path / "g.json").write_text(json.dumps([{"id": "g1", "image": "cxr.png", "conversations": [
        {"from": "human", "value": "<image>\nWhere is the left lung?"},
        {"from": "gpt", "value": "<ref>left lung</ref><box_start>(247,265),(367,497)<box_end>"}]}]))
    s = get_format("grounding").read(tmp_path / "g.json", image_dir=str(tmp_path)).samples[0]
    vlm = tiny_qwen2vl()
    vlm.tok.add_tokens(["<|box_start|>", "<|box_end|>", "<|object_ref_start|>", "<|object_ref_end|>"],
                       special_tokens=True)
    e = vlm.encode(s)
    learned = vlm.tok.decode(e["input_ids"][0][e["labels"][0] != -100])
    assert "<|box_start|>" in learned and "(247,265),(367,497)" in learned.replace(" ", "")
    assert "<box/>" not in learned


def test_reflective_correction_rounds_on_a_native_qwen2vl(tmp_path):
    """`reflect.rounds=1` on a native model crashed after round 0 ('NativeVLM' has no attribute 'vision')."""
    import json
    from medvl.train.reflect import run_reflective
    from medvl.train.vlm import VLMTrainConfig
    tiny_qwen2vl().save(tmp_path / "qwen")
    cfg = VLMTrainConfig(native=str(tmp_path / "qwen"), stage="sft", freeze={"vision": "full"}, epochs=1,
                         batch_size=4, precision="fp32", lr=1e-3, warmup_steps=1, log_every=1, max_length=512,
                         reflect={"rounds": 1, "epochs": 1}, output_dir=str(tmp_path / "r"))
    res = run_reflective(cfg, load_bundled("vqa-rad", "train")[:8], progress=False)
    log = [json.loads(x) for x in (tmp_path / "r" / "reflection.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["answered"] == 8
    assert (tmp_path / "r" / "round1" / "model" / "config.json").exists()
    assert res["model"].model.config.model_type == "qwen2_vl"
