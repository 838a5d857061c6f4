"""Multi-teacher CLIP distillation (MMKD-CLIP, Wang et al. 2025, stage 2).

    loss = CLIP(student img, student txt)
         + lambda * (MSE(P_t(student img), teacher img) + MSE(P_t(student txt), teacher txt))
         + cross-modal contrastive(student img <-> teacher txt, teacher img <-> student txt)

as the MMKD-CLIP paper states it; lambda = 50 in its stage 2. Choices made explicit here:

* **Projection per teacher.** Teachers' widths differ (512 for most, 768 for some); each
  teacher has a linear map from the student's width to its own (``P_t``), learned with the
  student. With equal widths it starts as the identity.
* **Which teacher.** ``"random"`` (the seed's behaviour): one teacher per sample among
  those available for it, drawn from a seeded generator; ``"mean"``: all available
  teachers, losses averaged.
* **Cross-modal scale.** The seed multiplies the cross-modal logits by a constant of about
  2.66 (= log(1/0.07) used *without* ``exp``) that never trains. medvl offers
  ``cross_scale="fixed"`` (that constant, the default, to reproduce the recipe) or
  ``"learnable"`` (a log-scale parameter initialised to it and trained, exp applied).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medvl.losses.contrastive import ClipLoss

SEED_CROSS_SCALE = math.log(1 / 0.07)  # 2.659...


class MMKDLoss(nn.Module):
    def __init__(self, student_dim: int, teacher_dims: dict[str, int], lam: float = 50.0,
                 teacher_choice: str = "random", cross_scale: str = "fixed", seed: int = 0):
        super().__init__()
        if teacher_choice not in ("random", "mean"):
            raise ValueError("teacher_choice must be 'random' or 'mean'")
        if cross_scale not in ("fixed", "learnable"):
            raise ValueError("cross_scale must be 'fixed' or 'learnable'")
        self.teachers = sorted(teacher_dims)
        self.proj = nn.ModuleDict()
        for t in self.teachers:
            lin = nn.Linear(student_dim, teacher_dims[t], bias=False)
            if teacher_dims[t] == student_dim:
                nn.init.eye_(lin.weight)
            self.proj[t] = lin
        self.lam = lam
        self.teacher_choice = teacher_choice
        self.cross_scale = cross_scale
        if cross_scale == "learnable":
            self.log_cross = nn.Parameter(torch.tensor(math.log(SEED_CROSS_SCALE)))
        self.clip = ClipLoss()
        self.gen = torch.Generator().manual_seed(seed)

    def _scale(self) -> torch.Tensor | float:
        return self.log_cross.exp() if self.cross_scale == "learnable" else SEED_CROSS_SCALE

    def forward(self, s_img: torch.Tensor, s_txt: torch.Tensor, logit_scale: torch.Tensor,
                t_img: dict[str, torch.Tensor], t_txt: dict[str, torch.Tensor],
                available: torch.Tensor) -> dict[str, torch.Tensor]:
        """s_img, s_txt: [B, Ds] normalised student features; t_img / t_txt: teacher ->
        [B, Dt] features (rows of unavailable teachers are ignored); available: [B, T] bool
        in the order of ``self.teachers``."""
        B = s_img.shape[0]
        if available.shape != (B, len(self.teachers)):
            raise ValueError(f"available must be [{B}, {len(self.teachers)}], got {tuple(available.shape)}")
        if (~available.any(dim=1)).any():
            raise ValueError("every sample needs at least one available teacher")
        if self.teacher_choice == "random":
            w = torch.rand(available.shape, generator=self.gen) * available.float()
            choice = torch.zeros_like(available, dtype=torch.float)
            choice[torch.arange(B), w.argmax(dim=1)] = 1.0  # [B, T] one-hot among available
        else:
            choice = available.float() / available.float().sum(dim=1, keepdim=True)
        l_clip = self.clip(s_img, s_txt, logit_scale)
        l_mse = s_img.new_zeros(())
        l_cross = s_img.new_zeros(())
        scale = self._scale()
        for k, t in enumerate(self.teachers):
            w = choice[:, k]  # [B]
            if w.sum() == 0:
                continue
            rows = w > 0
            pi = F.normalize(self.proj[t](s_img[rows]), dim=-1)  # [b, Dt]
            pt = F.normalize(self.proj[t](s_txt[rows]), dim=-1)
            ti = F.normalize(t_img[t][rows].float(), dim=-1)
            tt = F.normalize(t_txt[t][rows].float(), dim=-1)
            ww = w[rows]
            mse = ((pi - ti).pow(2).mean(dim=1) + (pt - tt).pow(2).mean(dim=1))  # [b]
            l_mse = l_mse + (mse * ww).sum() / B
            labels = torch.arange(pi.shape[0])
            ce = (F.cross_entropy(scale * pi @ tt.T, labels, reduction="none")
                  + F.cross_entropy(scale * ti @ pt.T, labels, reduction="none")) / 2  # [b]
            l_cross = l_cross + (ce * ww).sum() / B
        total = l_clip + self.lam * l_mse + l_cross
        return {"loss": total, "clip": l_clip.detach(), "mse": l_mse.detach(), "cross": l_cross.detach()}
