"""Native Hugging Face VLMs (tiny configs built offline) through medvl's interface."""

import pytest
import torch

from medvl.data.bundled import load_bundled
from medvl.models.native import NativeVLM
from medvl.train.vlm import train_native
from medvl.models.tokenizers import build_bpe_tokenizer

pytest.importorskip("torchvision")


def _tok():
    texts = [t.text for s in load_bundled("vqa-rad", "test") for t in s.conversation]
    return build_bpe_tokenizer(texts, vocab_size=400)


def tiny_llava():
    from transformers import (CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                              Qwen2Config, SiglipVisionConfig)
    tok = _tok()
    img = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                       num_attention_heads=2, image_size=32, patch_size=8),
                      text_config=Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                              pad_token_id=tok.pad_token_id),
                      image_token_id=img, vision_feature_select_strategy="full", vision_feature_layer=-1)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="full",
                          num_additional_image_tokens=0, chat_template=tok.chat_template)
    return NativeVLM(LlavaForConditionalGeneration(cfg).eval(), proc)


def tiny_qwen2vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor
    tok = _tok()
    tok.add_tokens(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"], special_tokens=True)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}
    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    ip = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56)
    from transformers import Qwen2VLVideoProcessor
    proc = Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                            chat_template=tok.chat_template)
    return NativeVLM(Qwen2VLForConditionalGeneration(cfg).eval(), proc)


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
