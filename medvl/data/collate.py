"""Canonical samples -> token ids, loss masks and pixels for VLM training.

Design choices:

* **The LM's own chat template** renders the conversation (``tokenizer.apply_chat_template``).
  Assistant spans are located by rendering growing prefixes of the conversation, so the
  loss covers exactly the assistant's words and the template's end-of-turn token after
  them, and nothing of the system / user turns or of the assistant header (LLaVA's and
  LLaMA-Factory's masking, done without knowing the template's strings).
* **Image-token accounting**: each ``<image>`` placeholder becomes ``tokens_per_image``
  copies of the image token before tokenising, so the ids hold one slot per projected
  vision token and :class:`medvl.models.vlm.MedVLM` can scatter into them.
* **Truncation never cuts through image tokens**: a sample longer than ``max_length`` is
  cut at the end only when every image token survives; otherwise it is dropped (and
  counted) or, with ``overflow="error"``, raises naming the sample.
* **Boxes reach the model with their coordinates**: ``<box/>`` markers are rendered in the
  model's box syntax (:data:`medvl.data.boxes.MODEL_BOX_STYLE`; Qwen-VL's text form for
  composed models), in prompts and targets alike.
* Padding side is a parameter: right for training, left for batched generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from medvl.data.boxes import model_turns
from medvl.data.schema import IMAGE_TOKEN, Sample, count_placeholders
from medvl.errors import MedvlUserError

IGNORE = -100


@dataclass
class Encoded:
    id: str
    input_ids: list[int]
    labels: list[int]
    images: list[Any]


@dataclass
class CollateStats:
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


class VLMCollator:
    def __init__(self, tokenizer, *, image_token: str = IMAGE_TOKEN, tokens_per_image: int = 1,
                 max_length: int = 512, overflow: str = "drop", image_loader: Callable | None = None,
                 system_prompt: str | None = None, box_style: str = "qwenvl"):
        self.tok = tokenizer
        self.image_token = image_token
        ids = tokenizer.convert_tokens_to_ids(image_token)
        if ids is None or ids == tokenizer.unk_token_id:
            raise MedvlUserError(f"the tokenizer has no {image_token!r} token: add it as a special token")
        self.image_token_id = ids
        self.n = tokens_per_image
        self.max_length = max_length
        if overflow not in ("drop", "error"):
            raise ValueError("overflow must be 'drop' or 'error'")
        self.overflow = overflow
        self.image_loader = image_loader
        self.system_prompt = system_prompt
        self.box_style = box_style
        self.stats = CollateStats()

    # -- one sample ---------------------------------------------------------------------------
    def _messages(self, sample: Sample) -> list[dict]:
        msgs = []
        if self.system_prompt and not (sample.conversation and sample.conversation[0].role == "system"):
            msgs.append({"role": "system", "content": self.system_prompt})
        try:
            turns = model_turns(sample, self.box_style)
        except ValueError as e:
            raise MedvlUserError(str(e), record=f"id={sample.id!r}") from None
        for t in turns:
            msgs.append({"role": t.role, "content": t.text.replace(IMAGE_TOKEN, self.image_token * self.n)})
        return msgs

    def _render(self, msgs: list[dict], gen_prompt: bool) -> list[int]:
        out = self.tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen_prompt, return_dict=True)
        return list(out["input_ids"])

    def encode(self, sample: Sample) -> Encoded | None:
        n_ph = sum(count_placeholders(t.text) for t in sample.conversation)
        if n_ph != len(sample.images):
            raise MedvlUserError(f"{n_ph} <image> placeholder(s) but {len(sample.images)} image(s)",
                                 record=f"id={sample.id!r}")
        msgs = self._messages(sample)
        ids: list[int] = []
        labels: list[int] = []
        # meta.loss_on = "last": learn only the final assistant turn (reflective-correction samples,
        # whose earlier assistant turn is a wrong answer)
        last_only = (sample.meta or {}).get("loss_on") == "last"
        last_assistant = max((k for k, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)
        for i, m in enumerate(msgs):
            full = self._render(msgs[: i + 1], gen_prompt=False)
            if m["role"] == "assistant" and (not last_only or i == last_assistant):
                head = self._render(msgs[:i], gen_prompt=True)
                if full[: len(head)] != head:
                    raise MedvlUserError("the chat template does not render the assistant turn as an extension "
                                         "of the prompt; cannot build a loss mask", record=f"id={sample.id!r}")
                new = full[len(ids):]
                body = full[len(head):]
                ids += new
                labels += [IGNORE] * (len(new) - len(body)) + body
            else:
                new = full[len(ids):]
                ids += new
                labels += [IGNORE] * len(new)
        if len(ids) > self.max_length:
            last_img = max((k for k, t in enumerate(ids) if t == self.image_token_id), default=-1)
            if last_img >= self.max_length:
                if self.overflow == "error":
                    raise MedvlUserError(f"{len(ids)} tokens > max_length {self.max_length} and cutting would "
                                         "cut image tokens", record=f"id={sample.id!r}")
                self.stats.drop(f"longer than max_length {self.max_length} with image tokens past the cut")
                return None
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            self.stats.truncated += 1
        if all(x == IGNORE for x in labels):
            self.stats.drop("no assistant token left to learn from")
            return None
        images = [self.image_loader(m) if self.image_loader else m for m in sample.images]
        return Encoded(sample.id, ids, labels, images)

    def prompt_ids(self, sample: Sample) -> list[int]:
        """The generation prompt: every turn up to (not including) the last assistant turn."""
        msgs = self._messages(sample)
        if msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        return self._render(msgs, gen_prompt=True)

    # -- batches ------------------------------------------------------------------------------
    def pad(self, seqs: Sequence[list[int]], value: int, side: str = "right") -> torch.Tensor:
        L = max(len(s) for s in seqs)
        out = torch.full((len(seqs), L), value, dtype=torch.long)
        for i, s in enumerate(seqs):
            if side == "right":
                out[i, : len(s)] = torch.tensor(s)
            else:
                out[i, L - len(s):] = torch.tensor(s)
        return out

    def __call__(self, batch: Sequence[Encoded], side: str = "right") -> dict[str, torch.Tensor]:
        pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        input_ids = self.pad([b.input_ids for b in batch], pad_id, side)
        labels = self.pad([b.labels for b in batch], IGNORE, side)
        mask = self.pad([[1] * len(b.input_ids) for b in batch], 0, side)
        out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        imgs = [im for b in batch for im in b.images]
        if imgs and isinstance(imgs[0], torch.Tensor):
            out["pixel_values"] = torch.stack(imgs)
        return out


# -- packing: several samples per row, no attention across them --------------------------------

def pack(encoded: list, pack_length: int, order: list[int]) -> list[list[int]]:
    """First-fit-decreasing bins of sample indices whose lengths sum to <= pack_length."""
    items = sorted(order, key=lambda i: -len(encoded[i].input_ids))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in items:
        n = len(encoded[i].input_ids)
        for k, r in enumerate(room):
            if n <= r:
                bins[k].append(i)
                room[k] -= n
                break
        else:
            bins.append([i])
            room.append(pack_length - n)
    return bins


def packed_batch(rows: list[list], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of Encoded samples -> input_ids / labels / position_ids (restarting per sample), right-padded
    to the longest row; padding gets label -100 and its own position run."""
    L = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), L), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), L), dtype=torch.long)
    for r, row in enumerate(rows):
        k = 0
        for e in row:
            n = len(e.input_ids)
            ids[r, k:k + n] = torch.tensor(e.input_ids)
            labels[r, k:k + n] = torch.tensor(e.labels)
            pos[r, k:k + n] = torch.arange(n)
            k += n
        pos[r, k:] = torch.arange(L - k)  # padding: a separate "sequence"
    return {"input_ids": ids, "labels": labels, "position_ids": pos}
