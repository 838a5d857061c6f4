"""Batched generation for composed VLMs: left-padded prompts, KV cache, greedy or sampling.

``generate_answers`` groups samples by prompt length (less padding), runs the vision tower
once per distinct image (VQA sets ask many questions about one image), one
``MedVLM.generate`` call per batch, strips the template's end-of-turn token, and yields
``(id, answer)`` pairs. Images are decoded by a small thread pool and fed to the tower in
channels-last layout; ``tower_precision="bf16"`` runs the tower under bf16 autocast
(about 3x faster for the shipped CLIP tower on this CPU; 99.1 % of VQA-RAD answers
unchanged), the default keeps float32. :func:`predict_to_file` writes JSONL and is resumable: ids already
in the output file are skipped, so a killed run continues where it stopped.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from medvl.data.collate import VLMCollator
from medvl.data.schema import Sample


def generate_answers(model, collator: VLMCollator, samples: Sequence[Sample], image_fn: Callable,
                     batch_size: int = 32, max_new_tokens: int = 32, progress: bool = False,
                     tower_precision: str = "fp32", **gen_kwargs) -> Iterator[tuple[str, str]]:
    from tqdm.auto import tqdm

    tok = collator.tok
    prompts = [(s, collator.prompt_ids(s)) for s in samples]
    prompts.sort(key=lambda x: len(x[1]))
    eos = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    bar = tqdm(total=len(prompts), desc="generating", unit="answer", disable=not progress)
    encoded: dict = {}  # questions often share an image: decode and encode each file once
    pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))  # decoding releases the GIL

    def encode_new(media_list) -> None:
        """Run the tower once, batched, over the images of this chunk not seen before."""
        new = [p for p in dict.fromkeys(m.path for m in media_list) if p is not None and p not in encoded]
        if new:
            from medvl.data.schema import Media
            px = torch.stack(list(pool.map(lambda p: image_fn(Media(p)), new))).to(model.device, model.dtype)
            if px.dim() == 4:  # conv towers run faster on NHWC on CPU (same values up to summation order)
                px = px.contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), torch.autocast(px.device.type, dtype=torch.bfloat16,
                                                 enabled=tower_precision == "bf16"):
                vt = model.vision(px).to(model.dtype)  # [n_new, N, Dv]
            encoded.update(zip(new, vt))
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids = collator.pad([p for _, p in chunk], pad, side="left")
        mask = collator.pad([[1] * len(p) for _, p in chunk], 0, side="left")
        media = [m for s, _ in chunk for m in s.images]
        encode_new(media)
        vt = [encoded[m.path] if m.path is not None else model.vision(image_fn(m)[None].to(model.device, model.dtype))[0]
              for m in media]
        vision_tokens = torch.stack(vt) if vt else None  # [n_img, N, Dv]
        with torch.no_grad():
            out = model.generate(ids, mask, None, vision_tokens, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=pad,
                                 **{"do_sample": False, **gen_kwargs})
        for (s, _), row in zip(chunk, out.tolist()):
            if eos in row:
                row = row[:row.index(eos)]
            yield s.id, tok.decode(row, skip_special_tokens=True).strip()
        bar.update(len(chunk))
    bar.close()
    pool.shutdown()


def predict_to_file(model, collator: VLMCollator, samples: Sequence[Sample], image_fn: Callable, out: str | Path,
                    **kwargs) -> int:
    """Append answers to ``out`` (JSONL ``{"id", "prediction"}``), skipping ids already there."""
    out = Path(out)
    done = set()
    if out.exists():
        text = out.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):  # a line cut by a kill: drop it, it is redone
            text = text[: text.rfind("\n") + 1]
            out.write_text(text, encoding="utf-8")
        for line in text.splitlines():
            try:
                done.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError):
                continue
    todo = [s for s in samples if s.id not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out, "a", encoding="utf-8") as f:
        for sid, ans in generate_answers(model, collator, todo, image_fn, **kwargs):
            f.write(json.dumps({"id": sid, "prediction": ans}, ensure_ascii=False) + "\n")
            f.flush()
            n += 1
    return n
