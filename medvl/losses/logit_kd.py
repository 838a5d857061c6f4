"""Logit distillation for generative VLMs: (alpha * KD + CE) / (1 + alpha).

Follows ClinKD (Ge et al., 2025), whose student is trained on a weighted sum of the
teacher-student divergence and the next-token cross-entropy, with alpha = 0.5 and
temperature T = 0.5 in its published settings. Design choices:

* **Which positions.** Logits at position t predict token t+1, so the mask is taken from
  the *shifted* labels (``labels[:, 1:] != -100``): exactly the positions whose next token
  is an assistant token. ClinKD's published trainer masks the unshifted labels (one
  position late: it scores the logits that predict the token *after* each answer token, and
  skips the first answer token) and sums over the sequence; medvl averages over the
  answer tokens, so the KD and CE terms are on the same per-token scale and alpha means
  the same at any answer length. Prompt, image and padding positions never contribute.
* **Divergences.** ``forward`` KL(p_teacher || p_student) (mode covering, the classic
  Hinton et al. 2015 loss), ``reverse`` KL(p_student || p_teacher) (mode seeking, MiniLLM),
  ``jsd`` the generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024):
  beta * KL(p_t || m) + (1 - beta) * KL(p_s || m) with m = beta * p_t + (1 - beta) * p_s.
  All are computed from log-probabilities at temperature T; ``t2_scale`` multiplies by T^2
  (Hinton's correction that keeps gradient magnitudes comparable across temperatures).
* **Vocabularies.** Teacher and student must index the same tokens. When only the sizes
  differ (a padded embedding table, e.g. Qwen2-VL-2B 151,936 vs 7B 152,064 rows over one
  tokenizer), ``vocab="common"`` compares the first min(V_s, V_t) ids; the default
  ``"error"`` refuses, since silently truncating two different tokenizers is meaningless.
  A cached top-k teacher is treated the same way: with ``vocab="common"`` its ids at or above
  the student's vocabulary (padding rows) are dropped from the support, as the live teacher's
  columns beyond min(V_s, V_t) are.
* **Top-k teacher logits** (:class:`TopK`): a cached teacher keeps its k largest logits per
  position. The divergence is then computed on that support, with both distributions
  renormalised over the k ids. This drops the teacher's tail; the dropped mass is reported
  (``kd_topk_missing_mass``) and is the size of the approximation: for forward KL the exact
  and top-k losses differ by terms weighted by that mass (measured in docs/distill.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medvl.errors import MedvlUserError

KINDS = ("forward", "reverse", "jsd")


@dataclass
class TopK:
    """A teacher's k largest logits per position: ``values`` [N, k] (raw logits) and ``indices`` [N, k]."""

    values: torch.Tensor
    indices: torch.Tensor


def divergence(s_logp: torch.Tensor, t_logp: torch.Tensor, kind: str = "forward", beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence [N] between two log-distributions [N, V] (teacher ``t``, student ``s``)."""
    if kind == "forward":
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    if kind == "reverse":
        return (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise MedvlUserError(f"jsd beta must be in (0, 1), got {beta}")
        # log m = logsumexp(log beta + log p_t, log(1-beta) + log p_s), stable in log space
        m = torch.logsumexp(torch.stack([t_logp + torch.log(torch.tensor(beta)),
                                         s_logp + torch.log(torch.tensor(1 - beta))]), dim=0)
        return beta * (t_logp.exp() * (t_logp - m)).sum(-1) + (1 - beta) * (s_logp.exp() * (s_logp - m)).sum(-1)
    raise MedvlUserError(f"unknown KD divergence {kind!r}; choose one of {', '.join(KINDS)}")


class LogitKDLoss(torch.nn.Module):
    """(alpha * KD + CE) / (1 + alpha) over answer positions; returns a dict of loss, kd, ce."""

    def __init__(self, alpha: float = 0.5, kind: str = "forward", temperature: float = 1.0, t2_scale: bool = False,
                 beta: float = 0.5, vocab: str = "error"):
        super().__init__()
        if kind not in KINDS:
            raise MedvlUserError(f"unknown KD divergence {kind!r}; choose one of {', '.join(KINDS)}")
        if temperature <= 0:
            raise MedvlUserError(f"KD temperature must be > 0, got {temperature}")
        if vocab not in ("error", "common"):
            raise MedvlUserError(f"vocab must be 'error' or 'common', got {vocab!r}")
        self.alpha, self.kind, self.T, self.t2, self.beta, self.vocab = alpha, kind, temperature, t2_scale, beta, vocab

    def kd(self, student: torch.Tensor, teacher: torch.Tensor | TopK) -> torch.Tensor:
        """Mean divergence over rows: ``student`` [N, V_s] logits, ``teacher`` [N, V_t] logits or TopK.
        The teacher is detached: no gradient ever reaches it."""
        student = student.float()
        teacher = TopK(teacher.values.detach(), teacher.indices) if isinstance(teacher, TopK) else teacher.detach()
        if isinstance(teacher, TopK):
            vs = student.shape[-1]
            idx = teacher.indices.long()  # [N, k]
            t_full = teacher.values.float() / self.T
            s_top = student.gather(-1, idx.clamp(max=vs - 1)) / self.T  # [N, k]
            beyond = idx >= vs
            if bool(beyond.any()):
                if self.vocab == "error":
                    raise MedvlUserError("cached teacher token ids exceed the student's vocabulary "
                                         f"({int(idx.max())} >= {vs}): with one tokenizer and padded embedding "
                                         "tables set vocab: common (those padding ids are left out, as for a live "
                                         "teacher); different tokenizers cannot be distilled by logits")
                if bool(beyond.all(-1).any()):
                    raise MedvlUserError("a cached teacher row has all its top-k ids beyond the student's vocabulary")
                # padding rows leave the support: a large negative logit on both sides gives them ~0 mass
                t_full = t_full.masked_fill(beyond, -1e4)
                s_top = s_top.masked_fill(beyond, -1e4)
            s_logp = F.log_softmax(s_top, dim=-1)  # [N, k]
            t_logp = F.log_softmax(t_full, dim=-1)
        else:
            vs, vt = student.shape[-1], teacher.shape[-1]
            if vs != vt:
                if self.vocab == "error":
                    raise MedvlUserError(f"teacher vocabulary {vt} != student vocabulary {vs}: with one tokenizer "
                                         "and padded embedding tables set vocab: common (compares the first "
                                         f"{min(vs, vt)} ids); different tokenizers cannot be distilled by logits")
                student, teacher = student[:, :min(vs, vt)], teacher[:, :min(vs, vt)]
            s_logp = F.log_softmax(student / self.T, dim=-1)
            t_logp = F.log_softmax(teacher.float() / self.T, dim=-1)
        d = divergence(s_logp, t_logp, self.kind, self.beta)  # [N]
        kd = d.mean() if d.numel() else student.sum() * 0.0
        if self.t2:
            kd = kd * self.T ** 2
        return kd

    def forward(self, student: torch.Tensor, teacher: torch.Tensor | TopK, targets: torch.Tensor) -> dict:
        """``student`` [N, V] logits at answer positions, ``teacher`` the same rows, ``targets`` [N] next tokens."""
        if (teacher.values if isinstance(teacher, TopK) else teacher).shape[0] != student.shape[0]:
            raise MedvlUserError("teacher and student disagree on the number of answer tokens "
                                 f"({(teacher.values if isinstance(teacher, TopK) else teacher).shape[0]} vs "
                                 f"{student.shape[0]}): they must tokenize the answers identically")
        ce = F.cross_entropy(student.float(), targets)
        kd = self.kd(student, teacher)
        return {"loss": (self.alpha * kd + ce) / (1 + self.alpha), "kd": kd.detach(), "ce": ce.detach()}


def answer_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, T, V] and labels [B, T] -> (logits at positions predicting an answer token [N, V],
    those tokens [N]): the shift is applied here, once, for student and teacher alike."""
    target = labels[:, 1:]
    sel = target != -100  # [B, T-1]
    return logits[:, :-1][sel], target[sel]


def sequence_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                     **kw) -> dict:
    """Convenience form on whole sequences ([B, T, V] each, labels [B, T] with -100 outside answers)."""
    s, y = answer_rows(student_logits, labels)
    t, _ = answer_rows(teacher_logits, labels)
    return LogitKDLoss(**kw)(s, t, y)


def topk_of(logits: torch.Tensor, k: int) -> TopK:
    """The k largest logits per row ([N, V] -> TopK [N, k]), stored compactly (fp16 values, int32 ids)."""
    v, i = logits.float().topk(min(k, logits.shape[-1]), dim=-1)
    return TopK(v.half(), i.int())


def topk_missing_mass(logits: torch.Tensor, k: int, temperature: float = 1.0) -> torch.Tensor:
    """Mean teacher probability (at temperature T) outside its top k ([N, V] -> scalar)."""
    p = F.softmax(logits.float() / temperature, dim=-1)
    return 1.0 - p.topk(min(k, p.shape[-1]), dim=-1).values.sum(-1).mean()
