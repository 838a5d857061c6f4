"""The composed VLM's training step as a module (what the vlm recipe hands the engine, so DDP and
FSDP can wrap it): text embedded, the vision tokens through the connector into the ``<image>``
slots, and the loss on answer positions only (:func:`medvl.models.answer.answer_logits`)."""

from __future__ import annotations

import torch

from medvl.models.answer import answer_logits


class VLMStep(torch.nn.Module):
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

