"""Building a composed VLM (vision tower -> connector -> LM) and its tokenizer from recipe sections."""

from __future__ import annotations


def build_composed(vision: dict, connector: dict, llm: dict, texts: list[str], *, vocab_size: int = 1024,
                   position_gap: int = 0, tokenizer=None):
    """A new composed VLM and its tokenizer from a recipe's sections: ``llm`` is an LM config (trained
    from scratch, with a BPE tokenizer trained on ``texts`` — deterministic, so a resumed run rebuilds
    the same vocabulary — or ``tokenizer`` when given, e.g. a teacher's) or ``{"source": hub id /
    folder}`` (a pretrained LM and its own tokenizer, with ``<image>`` added; a named offline source of
    :mod:`medvl.models.lm_sources` such as ``smollm2-135m-instruct`` is fetched and converted once)."""
    from medvl.models.tokenizers import build_bpe_tokenizer
    from medvl.models.vlm import MedVLM, MedVLMConfig

    if "source" in llm:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from medvl.models.lm_sources import resolve_lm_source
        path = resolve_lm_source(llm["source"])  # hub id / folder as is; a named offline source converted once
        tok = AutoTokenizer.from_pretrained(path)
        if "<image>" not in tok.get_vocab():
            tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        mcfg = MedVLMConfig(vision=vision, connector=connector, llm_source=llm["source"],
                            image_token_id=tok.convert_tokens_to_ids("<image>"), position_gap=position_gap)
        model = MedVLM(mcfg, llm=AutoModelForCausalLM.from_pretrained(path, dtype="float32"))
        model.llm.resize_token_embeddings(len(tok), mean_resizing=False)  # <image> rows are overwritten by image features
    else:
        tok = tokenizer if tokenizer is not None else build_bpe_tokenizer(texts, vocab_size=vocab_size)
        tc = dict(llm, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), bos_token_id=tok.bos_token_id)
        mcfg = MedVLMConfig(vision=vision, connector=connector, text_config=tc,
                            image_token_id=tok.convert_tokens_to_ids("<image>"), position_gap=position_gap)
        model = MedVLM(mcfg)
    return model, tok
