"""Vision towers for composed VLMs: images or volumes -> a sequence of tokens.

Every tower maps pixels to ``[B, N, D]`` and states its token ``grid`` (``[H, W]`` or
``[D, H, W]``) so pooling connectors and placeholder expansion know ``N``. Registered by
exact name:

* ``hf`` — a Hugging Face vision model (``SiglipVisionModel``, ``CLIPVisionModel``, ...)
  by hub id / local path, or built from a config dict (``model_type`` + sizes); the CLS
  token of CLIP-style towers is dropped (``select: patch``, LLaVA's default feature choice).
* ``medclip`` — the image tower of a medvl CLIP (e.g. the shipped
  ``medclip-r10t-minilm``): the timm trunk's last feature map (or an open_clip ViT's patch
  tokens), before pooling. ``image_size`` feeds a CNN tower a larger image than its CLIP was
  trained on (a 128-px resnet10t at 256 px gives an 8x8 grid, 64 tokens, instead of 4x4): a
  convolutional trunk takes any side, so finer spatial detail costs only sequence length.
* ``vit3d`` — a 3D ViT for volumes ``[B, 1, D, H, W]``: Conv3d patch embedding, learned
  positions, a Transformer encoder (M3D-style).
* ``slice2d`` — any 2D tower applied to each slice of a volume, tokens concatenated in
  slice order (optionally every ``slice_stride``-th slice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from medvl.errors import MedvlUserError
from medvl.registry import Registry

TOWERS: Registry[type] = Registry("vision tower")


@dataclass
class VisionConfig:
    name: str = "hf"
    #: hf: hub id / local path, or None with ``hf_config``; medclip: CLIP name or folder
    source: str | None = None
    hf_config: dict = field(default_factory=dict)
    select: str = "patch"
    #: input side in pixels; 0 = the tower's own (hf: its config's; medclip: its CLIP's). Only a
    #: CNN medclip tower takes another side; a ViT's position table fixes its size.
    image_size: int = 0
    #: intensity window applied before the tower (a preset such as "abdomen" / "lung" / "brain", "file" for a
    #: DICOM's own, or [center, width] in HU); null: the file's own window for 2D, min-max for volumes. CT
    #: volumes in HU min-maxed over -1024..3000 leave soft tissue in a few grey levels: give a window
    window: Any = None
    in_channels: int = 3
    # vit3d
    volume_size: list = field(default_factory=lambda: [32, 128, 128])
    patch_size: list = field(default_factory=lambda: [4, 16, 16])
    width: int = 256
    depth: int = 4
    heads: int = 4
    # slice2d
    inner: dict = field(default_factory=dict)
    slice_stride: int = 1


class Tower(nn.Module):
    width: int
    grid: list
    image_size: int = 0

    def num_tokens(self) -> int:
        return math.prod(self.grid)


@TOWERS.register("hf")
class HFTower(Tower):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if cfg.source:
            try:
                self.model = AutoModel.from_pretrained(cfg.source)
            except OSError as e:
                raise MedvlUserError(f"cannot load vision tower {cfg.source!r} ({e})") from None
        elif cfg.hf_config:
            conf = dict(cfg.hf_config)
            mtype = conf.pop("model_type", "siglip_vision_model")
            self.model = AutoModel.from_config(AutoConfig.for_model(mtype, **conf))
        else:
            raise MedvlUserError("hf vision tower needs 'source' or 'hf_config'")
        vc = getattr(self.model.config, "vision_config", self.model.config)
        if cfg.image_size and cfg.image_size != vc.image_size:
            raise MedvlUserError(f"vision.image_size {cfg.image_size}: this hf tower takes {vc.image_size} px "
                                 "(its position table fixes the size); leave image_size out")
        self.width = vc.hidden_size
        side = vc.image_size // vc.patch_size
        self.grid = [side, side]
        self.image_size = vc.image_size
        self.drop_cls = cfg.select == "patch" and "clip" in vc.model_type and "siglip" not in vc.model_type

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels).last_hidden_state  # [B, 1? + H*W, D]
        return out[:, 1:] if self.drop_cls else out


@TOWERS.register("medclip")
class MedCLIPTower(Tower):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        from medvl.models.clip import MedCLIP

        clip = MedCLIP.from_pretrained(cfg.source) if cfg.source and not cfg.source.startswith("config:") \
            else MedCLIP.from_config(cfg.source.split(":", 1)[1] if cfg.source else "medclip-r10t-minilm")
        self.visual = clip.model.visual
        size = self.image_size = cfg.image_size or clip.config.image_size
        trunk = getattr(self.visual, "trunk", None)
        if size != clip.config.image_size and (trunk is None or hasattr(trunk, "patch_embed")):
            raise MedvlUserError(f"vision.image_size {size}: {cfg.source or 'this CLIP'} is a ViT trained at "
                                 f"{clip.config.image_size} px and takes no other size; leave image_size out")
        with torch.no_grad():
            probe = self._features(torch.zeros(1, 3, size, size))
        self.width = probe.shape[-1]
        side = int(round(math.sqrt(probe.shape[1])))
        self.grid = [side, probe.shape[1] // side]

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        trunk = getattr(self.visual, "trunk", None)  # not kept as an attribute: no duplicate weights
        if trunk is not None:  # timm
            f = trunk.forward_features(x)
            if f.ndim == 4:  # CNN map [B, C, h, w]
                return f.flatten(2).transpose(1, 2)  # [B, h*w, C]
            return f[:, getattr(trunk, "num_prefix_tokens", 0):]  # ViT tokens
        self.visual.output_tokens = True  # open_clip VisionTransformer
        _, tokens = self.visual(x)
        return tokens  # [B, N, width]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._features(pixels)


@TOWERS.register("vit3d")
class ViT3D(Tower):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if any(v % p for v, p in zip(cfg.volume_size, cfg.patch_size)):
            raise MedvlUserError(f"volume_size {cfg.volume_size} must be divisible by patch_size {cfg.patch_size}")
        self.grid = [v // p for v, p in zip(cfg.volume_size, cfg.patch_size)]
        self.width = cfg.width
        self.embed = nn.Conv3d(cfg.in_channels if cfg.in_channels != 3 else 1, cfg.width,
                               kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos = nn.Parameter(torch.zeros(1, math.prod(self.grid), cfg.width))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 4 * cfg.width, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, vol: torch.Tensor) -> torch.Tensor:
        x = self.embed(vol).flatten(2).transpose(1, 2) + self.pos  # [B, N, width]
        return self.norm(self.blocks(x))


@TOWERS.register("slice2d")
class Slice2D(Tower):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        inner = VisionConfig(**cfg.inner) if cfg.inner else VisionConfig()
        self.inner = build_tower(inner)
        self.stride = cfg.slice_stride
        depth = cfg.volume_size[0] // cfg.slice_stride
        self.width = self.inner.width
        self.grid = [depth, *self.inner.grid]
        self.size = getattr(self.inner, "image_size", inner.image_size)

    def forward(self, vol: torch.Tensor) -> torch.Tensor:
        B, C, D = vol.shape[:3]
        x = vol[:, :, ::self.stride]  # [B, C, D', H, W]
        d = x.shape[2]
        x = x.permute(0, 2, 1, 3, 4).reshape(B * d, C, *x.shape[-2:])
        if C == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.size:
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        t = self.inner(x)  # [B*d, N, width]
        return t.reshape(B, d * t.shape[1], t.shape[2])


def is_pretrained(cfg: VisionConfig | dict[str, Any]) -> bool:
    """Whether a tower built from ``cfg`` starts from trained weights (a hub id / folder / shipped CLIP)
    rather than from a random initialisation (``hf_config``, ``medclip`` with ``config:``, ``vit3d``)."""
    if isinstance(cfg, dict):
        cfg = VisionConfig(**cfg)
    if cfg.name == "hf":
        return bool(cfg.source)
    if cfg.name == "medclip":
        return not (cfg.source or "").startswith("config:") and bool(cfg.source)
    if cfg.name == "slice2d":
        return is_pretrained(VisionConfig(**cfg.inner) if cfg.inner else VisionConfig())
    return False  # vit3d and any tower without a source of weights


def build_tower(cfg: VisionConfig | dict[str, Any]) -> Tower:
    if isinstance(cfg, dict):
        cfg = VisionConfig(**cfg)
    return TOWERS.get(cfg.name)(cfg)
