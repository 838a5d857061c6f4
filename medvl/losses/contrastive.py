"""Contrastive image-text losses, with the cross-process feature gathering they need.

* :class:`ClipLoss` — symmetric InfoNCE (Radford et al. 2021): cross-entropy of
  ``scale * img @ txt.T`` against the diagonal, averaged over both directions.
* :class:`SigLipLoss` — pairwise sigmoid loss (Zhai et al. 2023) with a learnable bias:
  ``-mean log sigmoid(z_ij * (scale * img_i . txt_j + bias))``, ``z = +1`` on the diagonal.

Under ``torch.distributed`` (DDP via torchrun) the features of every rank are gathered so
each rank contrasts its batch against the global batch; the local features keep their
gradient (open_clip's ``ClipLoss`` ``local_loss=False, gather_with_grad=False`` scheme).
This is the only place in medvl's model code that calls collectives, because the maths
needs them.

Both take optional ``ids`` ([B] long, one per text): pairs whose texts are identical are
positives of each other. Texts built from category answers repeat within a batch ("a
radiology image of the breast." for every breast image). For SigLIP this matters: without
``ids`` every repeat is a -1 label, pushing an image away from its own correct text. For
InfoNCE it does not: identical texts give identical logit columns, so the multi-positive
target (SupCon, Khosla et al. 2020; UniCL, Yang et al. 2022) and the diagonal give the same
loss and the same gradients (tested); the loss just cannot fall below log k for a text
shared by k images. Without ``ids`` (or with unique texts) both are the classic losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """[B, D] per rank -> [world * B, D], own slice keeping its gradient."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def _targets(ids: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """Class-index targets (no ids) or [B, world*B] row-normalised multi-positive targets."""
    labels = torch.arange(batch, device=device) + _rank_offset(batch)
    if ids is None:
        return labels
    same = (ids[:, None] == gather_features(ids)[None, :]).float()  # [B, world*B], diagonal 1
    return same / same.sum(dim=1, keepdim=True)


def _rank_offset(batch: int) -> int:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() * batch
    return 0


class ClipLoss(nn.Module):
    def forward(self, img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                ids: torch.Tensor | None = None) -> torch.Tensor:
        # img, txt: [B, D] L2-normalised; logit_scale: log of the temperature's inverse; ids: [B] text ids
        all_img, all_txt = gather_features(img), gather_features(txt)
        scale = logit_scale.exp()
        logits_i = scale * img @ all_txt.T  # [B, world*B]
        logits_t = scale * txt @ all_img.T  # [B, world*B]
        labels = _targets(ids, img.shape[0], img.device)  # same texts -> same column targets both ways
        return (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2


class SigLipLoss(nn.Module):
    def forward(self, img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        all_txt = gather_features(txt)
        logits = logit_scale.exp() * img @ all_txt.T + logit_bias  # [B, world*B]
        z = -torch.ones_like(logits)
        off = _rank_offset(img.shape[0])
        z[torch.arange(img.shape[0]), torch.arange(img.shape[0]) + off] = 1.0
        if ids is not None:
            z[ids[:, None] == gather_features(ids)[None, :]] = 1.0
        return -F.logsigmoid(z * logits).sum() / img.shape[0]


LOSSES = {"clip": ClipLoss, "siglip": SigLipLoss}
