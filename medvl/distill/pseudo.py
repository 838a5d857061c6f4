"""Pseudo-label distillation: the teacher answers, its confident answers become targets.

The teacher answers every question greedily; the answer's confidence is the geometric
mean of its tokens' probabilities (end-of-turn included). Optionally it also samples
``agreement`` answers per question (temperature 1) and the agreement is the share of those
equal to the greedy answer after VQA normalisation (a self-consistency check, Wang et al.
2023). A sample is kept when both pass their thresholds. Kept samples carry the teacher's
answer as the assistant turn and, in ``meta``, the original answer (if any) and the scores,
so nothing of the source is lost; questions without an answer (unlabelled data) get one.
Counts of kept / filtered samples — and, where references exist, how often the kept
pseudo-labels equal them — are returned for the user to see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from medvl.data.schema import Sample, Turn
from medvl.eval.vqa import normalise_answer
from medvl.generate.pipeline import NativePipeline, VLMPipeline, load


def pseudo_label(teacher, samples: Sequence[Sample], *, min_confidence: float = 0.0, agreement: int = 0,
                 min_agreement: float = 0.5, batch_size: int = 32, max_new_tokens: int = 32, seed: int = 0,
                 progress: bool = True) -> tuple[list[Sample], dict]:
    import torch


    # a composed or a native teacher (a folder, a shipped name, or an already loaded pipeline)
    pipe = teacher if isinstance(teacher, (VLMPipeline, NativePipeline)) else load(teacher)
    questions = [replace(s, conversation=list(s.conversation[:-1]) if s.conversation and
                         s.conversation[-1].role == "assistant" else list(s.conversation)) for s in samples]
    greedy = {sid: (ans, conf) for sid, ans, conf in pipe.answers(
        questions, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, with_confidence=True)}
    agree: dict[str, float] = {}
    if agreement > 0:
        torch.manual_seed(seed)
        expanded = [replace(q, id=f"{q.id}\x00{k}") for q in questions for k in range(agreement)]
        votes: dict[str, int] = {}
        for eid, ans in pipe.answers(expanded, batch_size=batch_size, max_new_tokens=max_new_tokens, do_sample=True,
                                     temperature=1.0):
            sid = eid.rpartition("\x00")[0]
            votes[sid] = votes.get(sid, 0) + int(normalise_answer(ans) == normalise_answer(greedy[sid][0]))
        agree = {sid: votes.get(sid, 0) / agreement for sid in greedy}
    kept, report = [], {"questions": len(samples), "kept": 0, "low_confidence": 0, "low_agreement": 0,
                        "empty_answer": 0, "kept_with_reference": 0, "kept_equal_to_reference": 0}
    for s, q in zip(samples, questions):
        ans, conf = greedy[s.id]
        if not ans.strip():
            report["empty_answer"] += 1
            continue
        if conf < min_confidence:
            report["low_confidence"] += 1
            continue
        if agreement > 0 and agree[s.id] < min_agreement:
            report["low_agreement"] += 1
            continue
        ref = s.conversation[-1].text if s.conversation and s.conversation[-1].role == "assistant" else None
        meta = {**s.meta, "pseudo_label": {"confidence": round(conf, 4), "teacher": str(getattr(teacher, "path", teacher))}}
        if agreement > 0:
            meta["pseudo_label"]["agreement"] = agree[s.id]
        if ref is not None:
            meta["reference_answer"] = ref
            report["kept_with_reference"] += 1
            report["kept_equal_to_reference"] += int(normalise_answer(ans) == normalise_answer(ref))
        kept.append(replace(s, conversation=list(q.conversation) + [Turn("assistant", ans)], meta=meta))
    report["kept"] = len(kept)
    return kept, report
