"""The ``vlm`` recipe's typed config: the engine's keys plus what to build and how to train it, and the
checks of its nested sections (unknown keys with the closest name; an LM config's keys against its
transformers config class). Read once when the recipe is loaded (:func:`medvl.train.config.from_dict`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from medvl.errors import MedvlUserError
from medvl.train.config import TrainerConfig, closest


@dataclass
class VLMTrainConfig(TrainerConfig):
    """The vlm recipe: the engine's keys (TrainerConfig) plus what to build and how to train it."""

    stage: str = "sft"
    """align (connector only), sft (connector + LM) or vision-tune (tower + connector, LM frozen: medcap); freeze overrides per module"""
    native: str = ""
    """a native Hugging Face VLM (folder or hub id: LLaVA, Qwen2-VL ...) to train instead of composing one"""
    data: dict = field(default_factory=lambda: {"path": "vqa-rad/train", "format": "medvl", "options": {},
                                                "image_root": ""})
    """training data: a bundled name (vqa-rad/train) or a file in any format of `medvl data formats`"""
    vision: dict = field(default_factory=lambda: {"name": "medclip", "source": "medclip-r10t-minilm"})
    """the vision tower (keys below: name hf / medclip / vit3d / slice2d, source, image_size, window ...)"""
    connector: dict = field(default_factory=lambda: {"name": "mlp2x_gelu"})
    """the projector from tower to LM: {name: mlp2x_gelu | linear | ...} (medvl.models.connectors)"""
    llm: dict = field(default_factory=lambda: {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 704,
                                               "num_hidden_layers": 4, "num_attention_heads": 4,
                                               "num_key_value_heads": 2, "tie_word_embeddings": True,
                                               "max_position_embeddings": 512})
    """an LM config (trained from scratch), or {"source": hub id / path}"""
    vocab_size: int = 1024
    """size of the BPE tokenizer trained on the training texts (LM from scratch only)"""
    freeze: dict = field(default_factory=dict)
    """per-module overrides of the stage's policy: {vision|connector|llm: frozen|full|lora, embeddings: frozen|full}"""
    lora: dict = field(default_factory=lambda: {"r": 8, "alpha": 16, "dropout": 0.05,
                                                "target_modules": r".*\.(q_proj|k_proj|v_proj|o_proj)$"})
    """LoRA settings for modules whose policy is 'lora' (peft): r, alpha, dropout, target_modules (a regex over
    full module names, or a list of names); adapters are merged at export (native models: export: adapter also
    writes the peft adapter)"""
    question_only: bool = False
    """drop the images (and their placeholders): the language-prior baseline"""
    max_length: int = 128
    """tokens per sample, image tokens included; longer samples are cut (answers counted when cut)"""
    output_dir: str = "runs/vlm"
    lr_schedule: str = "ramped_cosine"
    clip_grad: float = 1.0
    packing: bool = False
    """pack samples into rows of pack_length tokens with per-sample position ids, no attention across
    samples (transformers builds block-causal masks from restarting position ids); no padding at all"""
    pack_length: int = 1024
    """tokens per packed row (with packing: true)"""
    group_by_length: bool = True
    """batch samples of similar length (little padding, no cross-sample attention as packing would need)"""
    distill: dict = field(default_factory=dict)
    """logit distillation (ClinKD): {teacher: VLM folder | teacher_cache: folder from `medvl distill
    cache-teacher`, alpha: 0.5, kind: forward|reverse|jsd, temperature: 1.0, t2_scale: false, beta: 0.5,
    vocab: error|common, topk: 0 (live teacher: keep only its top k), device: cpu}; loss
    (alpha*KD + CE)/(1+alpha) over answer tokens; the student uses the teacher's tokenizer"""
    reflect: dict = field(default_factory=dict)
    """reflective correction training (ClinKD; medvl.distill.reflect): {rounds: 1, epochs: epochs // 3,
    task: vqa|grounding, f1_threshold: 0.5, semantic_threshold: 0.0}; empty = off"""
    init_from: str = ""
    """start from this VLM folder's weights and tokenizer (a previous stage or round) instead of a new model"""
    init_connector: str = ""
    """start a new model's connector from this VLM folder's or shipped model's (LLaVA's pretrained projector)"""
    gradient_checkpointing: bool = False
    """recompute the LM's activations during backward: much less activation memory for ~30% more compute"""
    attn_implementation: str = "auto"
    """the LM's attention kernel while training: auto (eager on the CPU up to max_length 256 — 1.2-2x faster than
    sdpa's CPU backward below 128 tokens, even at 128-256 —, the model's own otherwise; a native VLM keeps its
    own), eager or sdpa (medvl.train.attention)"""
    system_prompt: Optional[str] = None
    """the system turn of every conversation, written into the saved tokenizer's chat template (a new model
    only): null keeps the template's own (SmolLM2 adds a 16-token default to every prompt); "" an empty turn"""
    eval: dict = field(default_factory=dict)
    """validation during training (composed VLMs; medvl.train.validation): {holdout: 0.1, by: image|sample} or
    {data: a data section}; every_epochs: 1, metric: mean|closed_accuracy|open_recall|..., keep: best|last"""
    allow_frozen_random: bool = False
    """freeze a module (vision / connector / llm) that starts from random weights; refused otherwise, since it
    would stay random for the whole run (a from-scratch LM under stage align or vision-tune)"""
    def check(self, where: str = "recipe") -> None:
        """The engine's ranges, then the nested sections' keys (closest name suggested for a typo)."""
        super().check(where)
        import dataclasses as dc

        from medvl.models.vision_towers import VisionConfig
        if self.native:
            return
        _check_keys(self.vision, [f.name for f in dc.fields(VisionConfig)], f"{where}.vision")
        check_llm_section(self.llm, f"{where}.llm")
        _check_keys(self.lora, LORA_KEYS, f"{where}.lora")
        for k, sec in enumerate(self.data.get("sources") or [self.data]):
            if isinstance(sec, dict):
                _check_keys(sec, DATA_KEYS, f"{where}.data" + (f".sources.{k}" if self.data.get("sources") else ""))
        if self.max_length < 8:
            raise MedvlUserError(f"{where}.max_length = {self.max_length}: must be at least 8")

    position_gap: int = 0
    """modality-gap position ids: skip this many positions before and after every image block (ClinKD's
    "Med-CLIP guided RoPE"; medvl.models.position_ids); saved in the model config, used in generation"""


DATA_KEYS = {
    "path": "a bundled name (vqa-rad/train), a dataset file or folder, or a dataset_info.json (ShareGPT)",
    "format": "its format (any name of `medvl data formats`; default medvl)",
    "options": "reader options, as for `medvl data convert --opt`",
    "image_root": "folder relative image paths resolve against (default: the data file's)",
    "holdout": "fraction of images held out by image (medvl.data.splits); 0 = none",
    "holdout_seed": "seed of that split (default 0)",
    "part": "train (default), holdout or all: which side of the split to use",
    "sources": "a list of data sections mixed into one training set (each with the keys here)",
    "weight": "a source's share: 3 = three copies, 0.5 = a seeded half, 0 = none (its held-out images still apply)",
    "question_only": "a source's samples without their images (modality dropout in the data)",
    "describe": "true: add one 'Describe this image.' sample per image written from its answers; only: just those",
    "exclude_images_of": "bundled:vqa-rad drops images that also occur in the bundled VQA-RAD (counted)",
}
LORA_KEYS = {"r": "rank (default 8)", "alpha": "scale numerator (default 16)", "dropout": "(default 0.05)",
             "target_modules": "a regex over full module names, or a list of names",
             "export": "merged (default: adapters merged into the weights) or adapter (native models: also the peft "
                       "adapter, with every module trained in full in modules_to_save)"}


def _check_keys(section: dict, known, where: str) -> None:
    for k in section:
        if k not in known:
            raise MedvlUserError(f"{where}: unknown key {k!r}{closest(k, known)}; known: {', '.join(known)}")


def check_llm_section(llm: dict, where: str = "recipe.llm") -> None:
    """A pretrained source takes {source, num_hidden_layers}; an LM config's keys are checked against
    its transformers config class, so a typo (``hiden_size``) is an error with the closest name instead
    of an attribute Hugging Face keeps silently (it built a 4,096-wide model once)."""
    if "source" in llm:
        _check_keys(llm, ("source", "num_hidden_layers"), where)
        return
    if "model_type" not in llm:
        raise MedvlUserError(f"{where}: give source (a pretrained LM) or model_type and its sizes (an LM from scratch)")
    from transformers import AutoConfig
    try:
        known = set(AutoConfig.for_model(str(llm["model_type"])).to_dict())
    except ValueError:
        raise MedvlUserError(f"{where}.model_type: unknown model type {llm['model_type']!r}") from None
    for k in llm:
        if k not in known and closest(k, known):  # a near miss of a real key: a typo; novel keys pass
            raise MedvlUserError(f"{where}: unknown key {k!r}{closest(k, known)}")
