"""Connectors: vision-tower tokens -> language-model embeddings.

Registered by exact name (no pattern matching; MedM-VL's and LLaVA's names):

* ``identity`` — widths must already agree;
* ``linear`` — one projection (LLaVA v1);
* ``mlp1x_gelu`` ... ``mlp4x_gelu`` — N linear layers with GELU between (LLaVA-1.5's
  ``mlp2x_gelu``);
* ``spatial_pooling`` — average-pool the token grid (2D ``[H, W]`` or 3D ``[D, H, W]``)
  by ``pool`` per axis, then ``mlp2x_gelu`` (MedM-VL's 3D connector);
* ``attn_pooling`` — ``num_queries`` learned queries cross-attend to the tokens, then a
  linear map (MedM-VL / Q-Former-style resampler, one layer);
* ``pixel_shuffle`` — fold each ``scale x scale`` block of the 2D grid into the channel
  axis, then a linear map (Idefics3 / SmolVLM).

Every connector maps ``[B, N, Dv]`` to ``[B, M, Dl]`` and knows ``M`` from ``N``
(``num_tokens``) so that the data layer can expand ``<image>`` placeholders exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from medvl.errors import MedvlUserError
from medvl.registry import Registry

CONNECTORS: Registry[type] = Registry("connector")


@dataclass
class ConnectorConfig:
    name: str = "mlp2x_gelu"
    #: token grid of the vision tower: [H, W] (2D) or [D, H, W] (3D); needed by pooling / shuffle
    grid: list = field(default_factory=list)
    pool: list = field(default_factory=lambda: [2, 2])
    num_queries: int = 32
    heads: int = 8
    scale: int = 2


class Connector(nn.Module):
    def num_tokens(self, n: int) -> int:
        return n


def _mlp(din: int, dout: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(din, dout)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(dout, dout)]
    return nn.Sequential(*layers)


@CONNECTORS.register("identity")
class Identity(Connector):
    def __init__(self, din: int, dout: int, cfg: ConnectorConfig):
        super().__init__()
        if din != dout:
            raise MedvlUserError(f"identity connector needs equal widths, got vision {din} and LM {dout}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@CONNECTORS.register("linear")
class Linear(Connector):
    def __init__(self, din: int, dout: int, cfg: ConnectorConfig):
        super().__init__()
        self.proj = nn.Linear(din, dout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # [B, N, Dl]


def _make_mlp(depth: int) -> type:
    class MLP(Connector):
        def __init__(self, din: int, dout: int, cfg: ConnectorConfig):
            super().__init__()
            self.mlp = _mlp(din, dout, depth)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mlp(x)  # [B, N, Dl]

    MLP.__name__ = f"MLP{depth}xGELU"
    return MLP


for _d in (1, 2, 3, 4):
    CONNECTORS.register(f"mlp{_d}x_gelu", _make_mlp(_d))


@CONNECTORS.register("spatial_pooling")
class SpatialPooling(Connector):
    def __init__(self, din: int, dout: int, cfg: ConnectorConfig):
        super().__init__()
        if isinstance(cfg.pool, int):
            pool = [cfg.pool] * len(cfg.grid)
        else:
            pool = list(cfg.pool) if len(cfg.pool) == len(cfg.grid) else [2] * len(cfg.grid)  # default 2 per axis
        cfg.pool = pool
        if len(cfg.grid) not in (2, 3) or any(g % p for g, p in zip(cfg.grid, pool)):
            raise MedvlUserError(f"spatial_pooling needs a 2D or 3D grid divisible by pool, got "
                                 f"grid={cfg.grid} pool={cfg.pool}")
        self.grid, self.pool = list(cfg.grid), list(cfg.pool)
        self.mlp = _mlp(din, dout, 2)

    def num_tokens(self, n: int) -> int:
        return math.prod(g // p for g, p in zip(self.grid, self.pool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        if N != math.prod(self.grid):
            raise ValueError(f"spatial_pooling expects {math.prod(self.grid)} tokens (grid {self.grid}), got {N}")
        g = x.transpose(1, 2).reshape(B, D, *self.grid)  # [B, D, (Dz,) H, W]
        pool = nn.functional.avg_pool3d if len(self.grid) == 3 else nn.functional.avg_pool2d
        g = pool(g, kernel_size=self.pool)
        return self.mlp(g.flatten(2).transpose(1, 2))  # [B, M, Dl]


@CONNECTORS.register("attn_pooling")
class AttnPooling(Connector):
    def __init__(self, din: int, dout: int, cfg: ConnectorConfig):
        super().__init__()
        heads = cfg.heads if din % cfg.heads == 0 else 1
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, din) * din ** -0.5)
        self.attn = nn.MultiheadAttention(din, heads, batch_first=True)
        self.norm = nn.LayerNorm(din)
        self.proj = nn.Linear(din, dout)
        self.m = cfg.num_queries

    def num_tokens(self, n: int) -> int:
        return self.m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)  # [B, M, Dv]
        out, _ = self.attn(q, x, x)
        return self.proj(self.norm(out + q))  # [B, M, Dl]


@CONNECTORS.register("pixel_shuffle")
class PixelShuffle(Connector):
    def __init__(self, din: int, dout: int, cfg: ConnectorConfig):
        super().__init__()
        if len(cfg.grid) != 2 or any(g % cfg.scale for g in cfg.grid):
            raise MedvlUserError(f"pixel_shuffle needs a 2D grid divisible by scale {cfg.scale}, got {cfg.grid}")
        self.grid, self.s = list(cfg.grid), cfg.scale
        self.proj = nn.Linear(din * cfg.scale ** 2, dout)

    def num_tokens(self, n: int) -> int:
        return n // self.s ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        H, W = self.grid
        s = self.s
        g = x.reshape(B, H // s, s, W // s, s, D).permute(0, 1, 3, 2, 4, 5)  # [B, H/s, W/s, s, s, D]
        return self.proj(g.reshape(B, (H // s) * (W // s), s * s * D))  # [B, N/s^2, Dl]


def build_connector(cfg: ConnectorConfig, din: int, dout: int) -> Connector:
    return CONNECTORS.get(cfg.name)(din, dout, cfg)
