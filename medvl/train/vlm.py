"""The ``vlm`` recipe (first cut): supervised training of a composed VLM on canonical data.

Stages differ only in what trains (declared per module: ``frozen`` or ``full``):

* ``align`` — connector only (LLaVA stage 1 / MedM-VL pretrain);
* ``sft`` — connector + LM (LLaVA stage 2 / MedM-VL finetune);
* ``vision-tune`` — vision tower + connector, LM frozen (medcap).

When the vision tower is frozen its tokens are computed once per distinct image and cached
(the tower is deterministic in eval mode), so each step costs the connector and the LM.
Loss is on assistant tokens only (:class:`medvl.data.collate.VLMCollator`). A checkpoint
is written atomically after every epoch and a rerun resumes from it; the log has
samples/s, tokens/s and MFU (6 x non-embedding LM parameters per token against the
machine's measured peak). 3D towers get volumes through ``preprocess_3d``. Not in this cut
yet: LoRA, packing, HF Trainer / DeepSpeed engines, native HF VLMs (see the issue).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvl.errors import MedvlUserError

STAGES = {"align": {"vision": "frozen", "connector": "full", "llm": "frozen"},
          "sft": {"vision": "frozen", "connector": "full", "llm": "full"},
          "vision-tune": {"vision": "full", "connector": "full", "llm": "frozen"}}


@dataclass
class VLMTrainConfig:
    stage: str = "sft"
    native: str = ""
    """a native Hugging Face VLM (folder or hub id: LLaVA, Qwen2-VL ...) to train instead of composing one"""
    data: dict = field(default_factory=lambda: {"path": "vqa-rad/train", "format": "medvl", "options": {},
                                                "image_root": ""})
    """training data: a bundled name (vqa-rad/train) or a file in any format of `medvl data formats`"""
    vision: dict = field(default_factory=lambda: {"name": "medclip", "source": "medclip-r10t-minilm"})
    connector: dict = field(default_factory=lambda: {"name": "mlp2x_gelu"})
    llm: dict = field(default_factory=lambda: {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 704,
                                               "num_hidden_layers": 4, "num_attention_heads": 4,
                                               "num_key_value_heads": 2, "tie_word_embeddings": True,
                                               "max_position_embeddings": 512})
    """an LM config (trained from scratch), or {"source": hub id / path}"""
    vocab_size: int = 1024
    """size of the BPE tokenizer trained on the training texts (LM from scratch only)"""
    freeze: dict = field(default_factory=dict)
    """per-module overrides of the stage's policy: {vision|connector|llm: frozen|full|lora}"""
    lora: dict = field(default_factory=lambda: {"r": 8, "alpha": 16, "dropout": 0.05,
                                                "target_modules": r".*\.(q_proj|k_proj|v_proj|o_proj)$"})
    """LoRA settings for modules whose policy is 'lora' (peft); adapters are merged at export"""
    question_only: bool = False
    """drop the images (and their placeholders): the language-prior baseline"""
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    max_length: int = 128
    precision: str = "bf16"
    seed: int = 0
    output_dir: str = "runs/vlm"
    log_every: int = 20
    packing: bool = False
    """pack samples into rows of pack_length tokens with per-sample position ids, no attention across
    samples (transformers builds block-causal masks from restarting position ids); no padding at all"""
    pack_length: int = 1024
    group_by_length: bool = True
    """batch samples of similar length (little padding, no cross-sample attention as packing would need)"""
    stop_after_epochs: int = 0
    """end this run after N epochs (checkpoint kept; a rerun resumes) — for time-boxed jobs"""
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
    distributed: str = "ddp"
    """under torchrun: ddp (replicated model) or fsdp (parameters, gradients and optimizer state sharded
    across ranks: fsdp_sharding full = ZeRO-3, grad_op = ZeRO-2; decoder layers are the shard units)"""
    fsdp_sharding: str = "full"
    position_gap: int = 0
    """modality-gap position ids: skip this many positions before and after every image block (ClinKD's
    "Med-CLIP guided RoPE"; medvl.models.position_ids); saved in the model config, used in generation"""
    peak_gflops: float = 0.0
    """the machine's peak for MFU (0: 205 for bf16, 88 for fp32 — measured on the project's 2-core CPU)"""


def strip_images(samples):
    """Copies of the samples without images or placeholders."""
    from medvl.data.schema import Sample, Turn
    out = []
    for s in samples:
        conv = [Turn(t.role, t.text.replace("<image>\n", "").replace("<image>", "")) for t in s.conversation]
        out.append(Sample(s.id, [], conv, s.boxes, s.labels, s.teacher_features, s.meta))
    return out


def load_training_samples(data: dict):
    """Samples with image paths made absolute (against data.image_root or the file's folder)."""
    from medvl.data.bundled import BUNDLED, load_bundled
    from medvl.data.formats import get_format
    from medvl.data.schema import resolve_path

    path = str(data.get("path", ""))
    name, _, split = path.partition("/")
    if not Path(path).exists() and name in BUNDLED:
        return load_bundled(name, split or "train"), {}
    fmt = get_format(data.get("format", "medvl"))
    opts = data.get("options") or {}
    fmt.check_options(opts, "read")
    conv = fmt.read(Path(path), **opts)
    root = Path(data["image_root"]) if data.get("image_root") else (Path(path) if Path(path).is_dir() else Path(path).parent)
    for s in conv.samples:
        for m in s.images:
            if m.path:
                m.path = str(resolve_path(m.path, root))
    return conv.samples, {f"read: {k}": v for k, v in conv.skip_summary()}


DISTILL_KEYS = {"teacher", "teacher_cache", "alpha", "kind", "temperature", "t2_scale", "beta", "vocab", "topk",
                "device"}


def make_teacher(cfg: VLMTrainConfig):
    """The live or cached teacher and the KD loss the ``distill`` section asks for."""
    from medvl.distill.teacher import CachedTeacher, LiveTeacher
    from medvl.losses.logit_kd import LogitKDLoss

    d = dict(cfg.distill)
    unknown = sorted(set(d) - DISTILL_KEYS)
    if unknown:
        raise MedvlUserError(f"distill: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(DISTILL_KEYS))}")
    if bool(d.get("teacher")) == bool(d.get("teacher_cache")):
        raise MedvlUserError("distill needs exactly one of teacher (a VLM folder) or teacher_cache (a cache folder)")
    kd = LogitKDLoss(alpha=float(d.get("alpha", 0.5)), kind=d.get("kind", "forward"),
                     temperature=float(d.get("temperature", 1.0)), t2_scale=bool(d.get("t2_scale", False)),
                     beta=float(d.get("beta", 0.5)), vocab=d.get("vocab", "error"))
    if d.get("teacher_cache"):
        return CachedTeacher(d["teacher_cache"]), kd
    from medvl.generate.pipeline import load_model_tokenizer, resolve_model_path
    path = resolve_model_path(d["teacher"])
    return LiveTeacher(path, load_model_tokenizer(path), cfg.max_length, device=d.get("device", "cpu"),
                       topk=int(d.get("topk", 0)), precision=cfg.precision), kd


def _fsdp_wrap(step_module, model, cfg: VLMTrainConfig, policy: dict):
    """FSDP2 (``fully_shard``) over the step module, each decoder layer its own shard unit: full =
    parameters resharded after forward (ZeRO-3), grad_op = kept gathered until backward (ZeRO-2).
    Works on CPU (gloo) as on GPUs."""
    from torch.distributed.fsdp import fully_shard
    if cfg.fsdp_sharding not in ("full", "grad_op"):
        raise MedvlUserError(f"fsdp_sharding must be full or grad_op, got {cfg.fsdp_sharding!r}")
    if "lora" in policy.values():
        raise MedvlUserError("LoRA with fsdp is not supported yet; use distributed: ddp")
    if cfg.stop_after_epochs:
        raise MedvlUserError("stop_after_epochs needs epoch checkpoints, which fsdp runs do not write yet")
    reshard = cfg.fsdp_sharding == "full"
    for layer in getattr(getattr(model.llm, "model", None), "layers", None) or []:
        fully_shard(layer, reshard_after_forward=reshard)
    fully_shard(step_module, reshard_after_forward=reshard)
    return step_module


def _fsdp_gather(step_module, model, rank: int):
    """The full state dict (a collective: every rank calls it) loaded into a fresh plain model on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from medvl.models.vlm import MedVLM
    full = get_model_state_dict(step_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return model
    plain = MedVLM(model.config)
    plain.load_state_dict({k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")}, strict=True)
    return plain


def step_module_parts(step_module) -> dict:
    inner = getattr(step_module, "module", step_module)  # DDP wraps it
    return dict(inner.parts)


def load_init(cfg: VLMTrainConfig):
    """Weights, tokenizer and model config from a previous VLM folder (strict load)."""
    from medvl.generate.pipeline import load_model_tokenizer, resolve_model_path
    from medvl.models.vlm import load_vlm
    path = resolve_model_path(cfg.init_from)
    model = load_vlm(path).train()
    if cfg.position_gap != getattr(model.config, "position_gap", 0):
        model.config.position_gap = cfg.position_gap
    return model, load_model_tokenizer(path)


def build_model_and_tokenizer(cfg: VLMTrainConfig, texts: list[str], tokenizer=None):
    from medvl.models.tokenizers import build_bpe_tokenizer
    from medvl.models.vlm import MedVLM, MedVLMConfig

    if "source" in cfg.llm:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(cfg.llm["source"])
        if "<image>" not in tok.get_vocab():
            tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        mcfg = MedVLMConfig(vision=cfg.vision, connector=cfg.connector, llm_source=cfg.llm["source"],
                            image_token_id=tok.convert_tokens_to_ids("<image>"), position_gap=cfg.position_gap)
        model = MedVLM(mcfg)
        model.llm.resize_token_embeddings(len(tok))
    else:
        tok = tokenizer if tokenizer is not None else build_bpe_tokenizer(texts, vocab_size=cfg.vocab_size)
        tc = dict(cfg.llm, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), bos_token_id=tok.bos_token_id)
        mcfg = MedVLMConfig(vision=cfg.vision, connector=cfg.connector, text_config=tc,
                            image_token_id=tok.convert_tokens_to_ids("<image>"), position_gap=cfg.position_gap)
        model = MedVLM(mcfg)
    return model, tok


def _train_native_recipe(cfg: VLMTrainConfig, samples, policy: dict, rank: int) -> dict[str, Any]:
    """A native HF VLM through the same recipe: per-module freezing, answer-only loss, export
    with its processor (first cut: single process, no resume)."""
    from medvl.models.native import NativeVLM, apply_policy, train_native

    vlm = NativeVLM.from_pretrained(cfg.native, max_length=cfg.max_length)
    if cfg.position_gap:
        vlm.set_position_gap(cfg.position_gap)
    trainable = apply_policy(vlm, policy)
    res = train_native(vlm, samples, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                       precision=cfg.precision, seed=cfg.seed)
    out = Path(cfg.output_dir)
    if rank == 0:
        vlm.save(out / "model")
        from medvl.train.config import save_resolved
        save_resolved(cfg, out / "model" / "recipe.yaml", "vlm")
    return {"model": vlm, "tokenizer": vlm.tok, "collator": None, "steps": len(res["losses"]),
            "seconds": 0.0, "dropped": {"longer than max_length": res["dropped"]} if res["dropped"] else {},
            "log": [{"loss": x} for x in res["losses"]], "samples_per_s": res["samples_per_s"],
            "trainable": trainable}


class _Step(torch.nn.Module):
    """One training step's forward as a module, so DDP can wrap it: embed the text, run the
    connector on the (cached or fresh) vision tokens, scatter, and take the answer loss —
    cross-entropy, or with ``kd`` (a :class:`medvl.losses.logit_kd.LogitKDLoss`) and the
    teacher's answer-position logits, (alpha * KD + CE) / (1 + alpha)."""

    def __init__(self, model, packing: bool, kd=None):
        super().__init__()
        self.model = model
        self.packing = packing
        self.kd = kd
        self.parts: dict = {}

    def forward(self, enc: dict, vt: torch.Tensor | None, cached: bool, teacher=None) -> torch.Tensor:
        m = self.model
        text = m.llm.get_input_embeddings()(enc["input_ids"])  # [B, T, D]
        if vt is not None:
            tokens = vt if cached else m.vision(vt)  # [n, N, Dv]
            feats = m.connector(tokens)
            mask = (enc["input_ids"] == m.config.image_token_id).unsqueeze(-1)
            text = text.masked_scatter(mask, feats.reshape(-1, feats.shape[-1]).to(text.dtype))
        if self.packing:  # no 2D mask + restarting positions -> block-causal attention per sample
            kw = {"position_ids": enc["position_ids"]}
        else:
            kw = {"attention_mask": enc["attention_mask"]}
            pos = m.position_ids(enc["input_ids"], enc["attention_mask"])  # modality-gap positions, if configured
            if pos is not None:
                kw["position_ids"] = pos
        logits, target = answer_logits(m.llm, text, enc["labels"], **kw)  # [N, V], [N]
        if self.kd is None or teacher is None:
            return torch.nn.functional.cross_entropy(logits.float(), target)
        out = self.kd(logits, teacher, target)
        self.parts = {"kd": float(out["kd"]), "ce": float(out["ce"])}
        return out["loss"]


def answer_logits(llm, inputs_embeds: torch.Tensor, labels: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """LM-head logits only at the positions that predict an answer token ([N, V]) and those tokens ([N]),
    without [B, T, vocab] logits for the prompt and image tokens (the shift is applied here)."""
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else None
    head = llm.get_output_embeddings() if hasattr(llm, "get_output_embeddings") else None
    target = labels[:, 1:]
    sel = target != -100  # [B, T-1]
    if decoder is None or head is None:
        logits = llm(inputs_embeds=inputs_embeds, use_cache=False, **kw).logits
        return logits[:, :-1][sel], target[sel]
    h = decoder(inputs_embeds=inputs_embeds, use_cache=False, **kw).last_hidden_state  # [B, T, D]
    return head(h[:, :-1][sel]), target[sel]  # [N, V], [N]


def answer_loss(llm, inputs_embeds: torch.Tensor, labels: torch.Tensor, **kw) -> torch.Tensor:
    """Next-token cross-entropy over the labelled (answer) positions: the same value as the
    model's own loss (mean over labelled tokens), with the LM head run only there."""
    logits, target = answer_logits(llm, inputs_embeds, labels, **kw)
    return torch.nn.functional.cross_entropy(logits.float(), target)


def pack(encoded: list, pack_length: int, order: list[int]) -> list[list[int]]:
    """First-fit-decreasing bins of sample indices whose lengths sum to <= pack_length."""
    items = sorted(order, key=lambda i: -len(encoded[i].input_ids))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in items:
        n = len(encoded[i].input_ids)
        for k, r in enumerate(room):
            if n <= r:
                bins[k].append(i)
                room[k] -= n
                break
        else:
            bins.append([i])
            room.append(pack_length - n)
    return bins


def packed_batch(rows: list[list], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of Encoded samples -> input_ids / labels / position_ids (restarting per sample), right-padded
    to the longest row; padding gets label -100 and its own position run."""
    from medvl.data.collate import IGNORE
    L = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), L), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), L), dtype=torch.long)
    for r, row in enumerate(rows):
        k = 0
        for e in row:
            n = len(e.input_ids)
            ids[r, k:k + n] = torch.tensor(e.input_ids)
            labels[r, k:k + n] = torch.tensor(e.labels)
            pos[r, k:k + n] = torch.arange(n)
            k += n
        pos[r, k:] = torch.arange(L - k)  # padding: a separate "sequence"
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def _with_lora(module, lora: dict, name: str):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise MedvlUserError("LoRA needs peft: pip install 'medvl[train]'") from None
    cfg = LoraConfig(r=int(lora.get("r", 8)), lora_alpha=int(lora.get("alpha", 16)),
                     lora_dropout=float(lora.get("dropout", 0.0)), target_modules=lora.get("target_modules"))
    try:
        return get_peft_model(module, cfg)
    except ValueError as e:
        raise MedvlUserError(f"LoRA on {name}: target_modules {lora.get('target_modules')!r} match no layer "
                             f"({str(e)[:120]})") from None


def image_loader_for(model):
    """Media -> pixel tensor with the tower's preprocessing (medical I/O underneath); a Media whose
    ``array`` holds an already decoded MedicalImage (an upload to the server) is not read again."""
    from medvl.data.imageio import MedicalImage, load_medical
    from medvl.data.transforms import preprocess_2d

    size = getattr(model.vision, "image_size", 0) or 224
    volume = len(model.vision.grid) == 3
    shape = model.config.vision.get("volume_size", [32, 128, 128])

    def load(media) -> torch.Tensor:
        img = media.array if isinstance(media.array, MedicalImage) else load_medical(media.path)
        if volume:  # [1, D, H, W]; a 2D image is a one-slice volume
            from medvl.data.transforms import preprocess_3d
            if img.kind != "volume":
                raise MedvlUserError("this model's vision tower takes 3D volumes, got a 2D image", path=media.path)
            return torch.from_numpy(preprocess_3d(img, shape))
        return torch.from_numpy(preprocess_2d(img, size, mode="pad"))  # [3, S, S]
    return load


def train_vlm(cfg: VLMTrainConfig, train_samples, *, progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from medvl.data.collate import VLMCollator

    if cfg.stage not in STAGES:
        raise MedvlUserError(f"stage must be one of {', '.join(STAGES)}, got {cfg.stage!r}")
    policy = {**STAGES[cfg.stage], **cfg.freeze}
    from medvl.train.clip import _dist_info
    rank, world = _dist_info()  # torchrun: DDP over gloo (CPU) or nccl; every rank builds the same model
    progress = progress and rank == 0
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    samples = strip_images(train_samples) if cfg.question_only else list(train_samples)
    if cfg.native:
        return _train_native_recipe(cfg, samples, policy, rank)
    if cfg.position_gap and cfg.packing:
        raise MedvlUserError("position_gap with packing is not supported: packed rows restart positions per "
                             "sample; turn one of them off")
    texts = [t.text.replace("<image>", " ") for s in samples for t in s.conversation]
    teacher, kd = make_teacher(cfg) if cfg.distill else (None, None)
    if cfg.init_from:
        model, tok = load_init(cfg)
    else:  # the BPE training is deterministic, so a resume rebuilds the same vocabulary
        model, tok = build_model_and_tokenizer(cfg, texts, teacher.tokenizer if teacher else None)
    for name in ("vision", "connector", "llm"):
        if policy[name] not in ("frozen", "full", "lora"):
            raise MedvlUserError(f"freeze.{name} must be frozen, full or lora, got {policy[name]!r}")
        for p in getattr(model, name).parameters():
            p.requires_grad = policy[name] == "full"
        if policy[name] == "lora":
            setattr(model, name, _with_lora(getattr(model, name), cfg.lora, name))
    collator = VLMCollator(tok, tokens_per_image=model.tokens_per_image, max_length=cfg.max_length)
    encoded = [e for e in (collator.encode(s) for s in samples) if e is not None]
    if teacher is not None:  # the teacher encodes the same samples with its own image-token count
        lost = teacher.prepare([s for s in samples if s.id in {e.id for e in encoded}])
        if lost:
            encoded = [e for e in encoded if e.id not in lost]
            collator.stats.dropped["teacher cannot encode (too long for it / not in the cache)"] = len(lost)
    if not encoded:
        raise MedvlUserError("no training sample survived encoding: " + json.dumps(collator.stats.dropped))
    load = image_loader_for(model)
    cache: dict[str, torch.Tensor] = {}
    paths = sorted({m.path for e in encoded for m in e.images})
    bad: set[str] = set()
    with torch.no_grad():
        from medvl.data.schema import Media
        for p in tqdm(paths, desc="checking images" if policy["vision"] != "frozen" else "caching vision tokens",
                      unit="img", disable=not progress):
            try:
                x = load(Media(p))[None]
            except MedvlUserError:
                bad.add(p)
                continue
            if policy["vision"] == "frozen":
                model.vision.eval()
                cache[p] = model.vision(x)[0]  # [N, Dv]
    if bad:  # samples whose image does not decode are left out, and counted
        before = len(encoded)
        encoded = [e for e in encoded if not any(m.path in bad for m in e.images)]
        collator.stats.dropped[f"image does not decode ({len(bad)} file(s))"] = before - len(encoded)
        if not encoded:
            raise MedvlUserError("no training image decodes")
    if world > 1:  # equal shards so every rank takes the same number of steps
        n = len(encoded) - len(encoded) % world
        encoded = encoded[:n][rank::world]
    step_module = _Step(model, cfg.packing, kd)
    fsdp = world > 1 and cfg.distributed == "fsdp"
    if fsdp:
        step_module = _fsdp_wrap(step_module, model, cfg, policy)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel
        step_module = DistributedDataParallel(step_module)
    params = [p for p in step_module.parameters() if p.requires_grad]  # after wrapping: FSDP owns the shards
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    if cfg.packing:
        n_bins = len(pack(encoded, cfg.pack_length, list(range(len(encoded)))))
        steps_per_epoch = math.ceil(n_bins / max(1, round(cfg.batch_size / max(1.0, len(encoded) / n_bins))))
    total = steps_per_epoch * cfg.epochs
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    log, t0, seen, step = [], time.perf_counter(), 0, 0
    ckpt = out / "checkpoints" / "last.pt"
    start_epoch = 0
    gen = torch.Generator().manual_seed(cfg.seed)
    from dataclasses import asdict
    run_key = {k: v for k, v in asdict(cfg).items() if k not in ("output_dir", "log_every", "stop_after_epochs")}
    if ckpt.exists() and fsdp:
        raise MedvlUserError("resuming an fsdp run is not supported yet (epoch checkpoints are written for ddp "
                             "and single-process runs); use another output_dir", path=ckpt)
    if ckpt.exists():
        st = torch.load(ckpt, map_location="cpu", weights_only=False)
        if st.get("run") != run_key:
            diff = sorted(k for k in run_key if (st.get("run") or {}).get(k) != run_key[k])
            raise MedvlUserError(f"{out} holds a checkpoint of a different run (differs in: {', '.join(diff)}); "
                                 "use another output_dir or remove it", path=ckpt)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        gen.set_state(st["gen"])
        step, start_epoch = st["step"], st["epoch"]
        if progress:
            print(f"vlm: resumed from {ckpt} at step {step} (epoch {start_epoch})")
    n_llm = sum(p.numel() for n, p in model.llm.named_parameters() if "embed" not in n)
    peak = (cfg.peak_gflops or (205.0 if cfg.precision == "bf16" else 88.0)) * 1e9
    tokens = 0
    model.train()
    if policy["vision"] == "frozen":
        model.vision.eval()
    bar = tqdm(total=total, initial=step, desc=f"vlm {cfg.stage}{' (question only)' if cfg.question_only else ''}",
               unit="step", disable=not progress)
    for epoch in range(start_epoch, cfg.epochs):
        order = torch.randperm(len(encoded), generator=gen).tolist()
        batches = [order[b * cfg.batch_size:(b + 1) * cfg.batch_size] for b in range(steps_per_epoch)]
        if cfg.packing:  # rows of packed samples; one step takes rows worth ~batch_size samples
            bins = pack(encoded, cfg.pack_length, order)
            per_row = max(1.0, len(encoded) / len(bins))
            rows_per_step = max(1, round(cfg.batch_size / per_row))
            perm = torch.randperm(len(bins), generator=gen).tolist()
            batches = [[i for k in perm[j:j + rows_per_step] for i in bins[k]] for j in range(0, len(bins), rows_per_step)]
            row_groups = [[bins[k] for k in perm[j:j + rows_per_step]] for j in range(0, len(bins), rows_per_step)]
        elif cfg.group_by_length:  # sort within windows of 32 batches, then shuffle the batches
            win = 32 * cfg.batch_size
            grouped = []
            for w in range(0, len(order), win):
                chunk = sorted(order[w:w + win], key=lambda i: len(encoded[i].input_ids))
                grouped += [chunk[k:k + cfg.batch_size] for k in range(0, len(chunk), cfg.batch_size)]
            perm = torch.randperm(len(grouped), generator=gen).tolist()
            batches = [grouped[k] for k in perm]
        for bi, idx in enumerate(batches):
            batch = [encoded[i] for i in idx]
            if cfg.packing:
                rows = [[encoded[i] for i in row] for row in row_groups[bi]]
                batch = [e for row in rows for e in row]  # image order = token order
                enc = packed_batch(rows, tok.pad_token_id if tok.pad_token_id is not None else 0)
            else:
                enc = collator(batch)
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / total))
            for g in opt.param_groups:
                g["lr"] = lr
            imgs = [m for e in batch for m in e.images]
            vt = None
            if imgs:
                vt = torch.stack([cache[m.path] for m in imgs]) if cache else torch.stack([load(m) for m in imgs])
            trows = teacher.rows([e.id for e in batch]) if teacher is not None else None  # [N, V] or TopK
            with autocast:
                loss = step_module(enc, vt, bool(cache), trows)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)  # with fsdp: over all shards (DTensor gradients)
            opt.step()
            step += 1
            seen += len(batch)
            tokens += sum(len(e.input_ids) for e in batch)
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:
                el = time.perf_counter() - t0
                # MFU: 6 x non-embedding LM parameters per token (forward + backward), vision excluded
                rec = {"step": step, "epoch": epoch, "loss": float(loss.detach()), "lr": lr,
                       "samples_per_s": seen / el, "tokens_per_s": tokens / el,
                       "mfu": 6 * n_llm * tokens / el / peak, **step_module_parts(step_module)}
                log.append(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", samples_s=f"{rec['samples_per_s']:.1f}")
        if rank == 0 and not fsdp:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "gen": gen.get_state(),
                        "step": step, "epoch": epoch + 1, "run": run_key}, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)  # atomic; resume restarts at the next epoch
        if cfg.stop_after_epochs and epoch + 1 - start_epoch >= cfg.stop_after_epochs:
            break  # every rank stops at the same epoch
    bar.close()
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
    if fsdp:  # gather the full weights on rank 0 into a plain model for export
        model = _fsdp_gather(step_module, model, rank)
    model.eval()
    for name in ("vision", "connector", "llm"):
        if policy[name] == "lora":  # export merged weights: a plain model, no peft needed to load it
            setattr(model, name, getattr(model, name).merge_and_unload())
    if rank == 0:
        model.save_vlm(out / "model")
        tok.save_pretrained(str(out / "model" / "tokenizer"))  # own folder: no model config beside it
        (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in log) + "\n")
        from medvl.train.config import save_resolved
        save_resolved(cfg, out / "model" / "recipe.yaml", "vlm")
    return {"model": model, "tokenizer": tok, "collator": collator, "steps": step,
            "seconds": time.perf_counter() - t0, "dropped": collator.stats.dropped, "log": log,
            "samples_per_s": seen / max(time.perf_counter() - t0, 1e-9)}
