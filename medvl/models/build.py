"""Building a composed VLM (vision tower -> connector -> LM) and its tokenizer from recipe sections."""

from __future__ import annotations
from medvl.errors import MedvlUserError
from medvl.models.tokenizers import build_bpe_tokenizer


def build_composed(vision: dict, connector: dict, llm: dict, texts: list[str], *, vocab_size: int = 1024,
                   position_gap: int = 0, tokenizer=None, system_prompt: str | None = None):
    """A new composed VLM and its tokenizer from a recipe's sections: ``llm`` is an LM config (trained
    from scratch, with a BPE tokenizer trained on ``texts`` — deterministic, so a resumed run rebuilds
    the same vocabulary — or ``tokenizer`` when given, e.g. a teacher's) or ``{"source": hub id /
    folder}`` (a pretrained LM and its own tokenizer, with ``<image>`` added; a named offline source of
    :mod:`medvl.models.lm_sources` such as ``smollm2-135m-instruct`` is fetched and converted once;
    with ``num_hidden_layers: k`` only its first k blocks are kept, :func:`_keep_layers`). A
    ``system_prompt`` is written into the tokenizer's chat template (:func:`with_system_prompt`), so
    training, ``predict``, ``chat`` and ``serve`` all render the same turns from the saved folder."""
    from medvl.models.vlm import MedVLM, MedVLMConfig

    if "source" in llm:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from medvl.models.lm_sources import resolve_lm_source
        path = resolve_lm_source(llm["source"])  # hub id / folder as is; a named offline source converted once
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            from medvl.errors import MedvlUserError
            from medvl.models.lm_sources import LM_SOURCES
            raise MedvlUserError(
                f"llm.source {llm['source']!r}: not a folder here, and the hub has no such model or cannot be reached "
                f"({str(e).splitlines()[0][:120]}); offline, use a folder, a .gguf file or a named source "
                f"({', '.join(LM_SOURCES)})") from None
        if "<image>" not in tok.get_vocab():
            tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        mcfg = MedVLMConfig(vision=vision, connector=connector, llm_source=llm["source"],
                            image_token_id=tok.convert_tokens_to_ids("<image>"), position_gap=position_gap)
        model = MedVLM(mcfg, llm=_keep_layers(AutoModelForCausalLM.from_pretrained(path, dtype="float32"),
                                              llm.get("num_hidden_layers")))
        model.llm.resize_token_embeddings(len(tok), mean_resizing=False)  # <image> rows are overwritten by image features
        model.config.text_config_dict = model.llm.config.to_dict()  # the saved config must have the resized vocabulary
    else:
        tok = tokenizer if tokenizer is not None else build_bpe_tokenizer(texts, vocab_size=vocab_size)
        tc = dict(llm, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), bos_token_id=tok.bos_token_id)
        mcfg = MedVLMConfig(vision=vision, connector=connector, text_config=tc,
                            image_token_id=tok.convert_tokens_to_ids("<image>"), position_gap=position_gap)
        model = MedVLM(mcfg)
    if system_prompt is not None:
        tok.chat_template = with_system_prompt(tok.chat_template, system_prompt)
    return model, tok


def with_system_prompt(template: str, system_prompt: str) -> str:
    """A chat template that gives every conversation without a system turn this one.

    Design choice: an instruct LM's template may add its own default system turn to every prompt
    (SmolLM2's: "You are a helpful AI assistant named SmolLM, trained by Hugging Face", 16 tokens
    of a VQA-RAD sample's ~66). A VLM fine-tuned on short questions gains nothing from it and pays
    for it in every training step and every prefill; ``""`` leaves an empty system turn (5 tokens
    with ChatML). The choice lives in the template, which is saved with the model's tokenizer, so
    every consumer of the folder (medvl or plain ``apply_chat_template``) renders the same prompt.
    A conversation that brings its own system turn keeps it."""
    import json
    if not template:
        from medvl.errors import MedvlUserError
        raise MedvlUserError("system_prompt needs a tokenizer with a chat template")
    return ("{% if messages and messages[0]['role'] != 'system' %}{% set messages = "
            f"[{{'role': 'system', 'content': {json.dumps(system_prompt)}}}] + messages %}}{{% endif %}}" + template)


def _keep_layers(lm, k):
    """The pretrained LM cut to its first ``k`` decoder blocks (embeddings, final norm and head kept).

    Design choice: a cheap LM that still starts from pretrained token embeddings and early-layer
    features. Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers") show that
    deep blocks of pretrained LMs can be removed with little loss once briefly fine-tuned; here the cut
    is far deeper (8 of 30 blocks of SmolLM2-135M in the default VLM) and the fine-tuning is the VLM's SFT, so the kept
    model is a well-initialised small LM, not a compressed copy of the full one. The saved config
    records the new depth, so the folder reloads like any other."""
    if not k:
        return lm
    layers = lm.model.layers
    if not isinstance(k, int) or isinstance(k, bool) or not 0 < k <= len(layers):
        raise MedvlUserError(f"llm.num_hidden_layers with a pretrained source keeps its first k blocks: "
                             f"1 <= k <= {len(layers)}, got {k!r}")
    lm.model.layers = layers[:k]
    lm.config.num_hidden_layers = k
    if getattr(lm.config, "layer_types", None):
        lm.config.layer_types = lm.config.layer_types[:k]
    return lm


def load_connector(model, path) -> None:
    """Copy a VLM folder's connector weights into ``model.connector`` (strict: every key, every shape) — a
    pretrained projector, as LLaVA's ``pretrain_mm_mlp_adapter``."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise MedvlUserError("init_connector: no model.safetensors here", path=path)
    state = {k.removeprefix("connector."): v for k, v in load_file(str(path / "model.safetensors")).items()
             if k.startswith("connector.")}
    if not state:
        raise MedvlUserError("init_connector: this VLM has no connector weights", path=path)
    own = model.connector.state_dict()
    wrong = [f"{k} {tuple(v.shape)} here, {tuple(state[k].shape)} there" for k, v in own.items()
             if k in state and v.shape != state[k].shape]
    if wrong or set(own) != set(state):
        raise MedvlUserError("init_connector: its connector does not fit this model's (same connector name, "
                             "vision tower output and LM width needed): " +
                             "; ".join(wrong or [f"keys {sorted(set(own) ^ set(state))[:4]}"]), path=path)
    model.connector.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
