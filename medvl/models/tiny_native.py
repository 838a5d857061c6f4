"""Tiny native Hugging Face VLMs built offline: a Qwen2-VL, Qwen2.5-VL or LLaVA folder with random
weights, a BPE tokenizer trained on the bundled VQA-RAD texts and the family's own processor.

What for: running a recipe written for a hub model (ClinKD's Qwen2-VL-7B -> 2B, a LLaVA LoRA)
end to end where the hub cannot be reached — a smoke run, a CI job, a test of one's own data
pipeline — before spending GPU hours on the real model. The folders load with
``AutoModelForImageTextToText`` / ``AutoProcessor`` like the hub's, so every medvl command that
takes ``native: PATH`` or ``--model PATH`` takes them. Their answers mean nothing: the weights are
random (sizes: ~0.2 M parameters, a 400-token vocabulary).

The configs follow the smallest shapes transformers accepts for each family (M-RoPE sections that
sum to half a head, Qwen2.5-VL's windowed vision attention with one full-attention block),
recorded in ``shared/DEPENDENCIES.md`` when they were first tried.
"""

from __future__ import annotations

from pathlib import Path

import torch

from medvl.data.bundled import load_bundled
from medvl.errors import MedvlUserError
from medvl.models.tokenizers import build_bpe_tokenizer

KINDS = ("qwen2-vl", "qwen2.5-vl", "llava")
_QWEN_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
#: Qwen2-VL's box and reference tokens (grounding data renders boxes with them)
_BOX_TOKENS = ("<|box_start|>", "<|box_end|>", "<|object_ref_start|>", "<|object_ref_end|>")


def _tokenizer(vocab_size: int = 400, split: str = "test"):
    texts = [t.text for s in load_bundled("vqa-rad", split) for t in s.conversation]
    return build_bpe_tokenizer(texts, vocab_size=vocab_size)


def tiny_qwen2vl(width: int = 64, seed: int = 0, boxes: bool = False, *, layers: int = 1, heads: int = 4,
                 kv_heads: int = 2, vision_depth: int = 1, vision_width: int = 32, vision_heads: int = 2,
                 vocab_size: int = 0, tokenizer_vocab: int = 400, tokenizer_split: str = "test"):
    """A :class:`medvl.models.native.NativeVLM` over a random Qwen2-VL of hidden size ``width`` (the other
    sizes as given; ``vocab_size`` pads the embedding table past the tokenizer's, as hub models do)."""
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    from medvl.models.native import NativeVLM
    tok = _tokenizer(tokenizer_vocab, tokenizer_split)
    tok.add_tokens(list(_QWEN_TOKENS + (_BOX_TOKENS if boxes else ())), special_tokens=True)
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_TOKENS}
    torch.manual_seed(seed)
    half = width // heads // 2  # head_dim / 2: the rotary sections must sum to it
    mrope = [2, 3, 3] if (width, heads) == (64, 4) else [half - 2 * (half // 3), half // 3, half // 3]
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=max(vocab_size, len(tok)), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope}),
        vision_config=dict(depth=vision_depth, embed_dim=vision_width, hidden_size=width, num_heads=vision_heads,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56),
                            tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=tok.chat_template)
    return NativeVLM(Qwen2VLForConditionalGeneration(cfg).eval(), proc)


def tiny_qwen25vl(seed: int = 0, boxes: bool = False):
    """Qwen2.5-VL (windowed vision attention, the same M-RoPE) from a tiny config."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    from medvl.models.native import NativeVLM
    tok = _tokenizer()
    tok.add_tokens(list(_QWEN_TOKENS + (_BOX_TOKENS if boxes else ())), special_tokens=True)
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_TOKENS}
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    proc = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
                               tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=tok.chat_template)
    vlm = NativeVLM(Qwen2_5_VLForConditionalGeneration(cfg).eval(), proc)
    vlm.model.generation_config.eos_token_id = tok.eos_token_id
    return vlm


def tiny_llava(seed: int = 0):
    """LLaVA (a SigLIP tower, the LLaVA projector, a Qwen2 LM) from a tiny config."""
    from transformers import (CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                              Qwen2Config, SiglipVisionConfig)

    from medvl.models.native import NativeVLM
    tok = _tokenizer()
    img = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                       num_attention_heads=2, image_size=32, patch_size=8),
                      text_config=Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                              tie_word_embeddings=True, pad_token_id=tok.pad_token_id),
                      image_token_id=img, vision_feature_select_strategy="full", vision_feature_layer=-1)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="full",
                          num_additional_image_tokens=0, chat_template=tok.chat_template)
    return NativeVLM(LlavaForConditionalGeneration(cfg).eval(), proc)


def make_tiny_native(kind: str, out: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny random native VLM of ``kind`` (one of :data:`KINDS`) to the folder ``out``."""
    if kind not in KINDS:
        raise MedvlUserError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MedvlUserError("the folder is not empty (pass --overwrite to replace it)", path=out)
    vlm = {"qwen2-vl": lambda: tiny_qwen2vl(seed=seed, boxes=True), "qwen2.5-vl": lambda: tiny_qwen25vl(seed, True),
           "llava": lambda: tiny_llava(seed)}[kind]()
    return vlm.save(out)
