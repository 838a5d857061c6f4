"""Logits at answer positions only: the LM head runs where a label is set, never over the
[B, T, vocab] of prompt and image tokens (the shift is applied here). Shared by training
(the loss), logit distillation (teacher rows) and anything scoring answers."""

from __future__ import annotations

import torch


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
