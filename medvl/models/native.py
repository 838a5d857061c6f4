"""Native Hugging Face VLMs (LLaVA, Qwen2-VL, Qwen2.5-VL ...) behind medvl's interface.

``NativeVLM`` pairs an ``AutoModelForImageTextToText`` with its ``AutoProcessor`` and offers
what the composed model offers: encode canonical samples (the processor expands image
tokens — Qwen2-VL's count depends on the image's grid), collate, train with a loss on the
answer only, and batched left-padded generation; training goes through the vlm recipe
(:mod:`medvl.train.vlm_native`). The loss covers **every** assistant turn, as LLaVA,
LLaMA-Factory and MedM-VL train multi-turn chats (and as the composed collator,
:class:`medvl.data.collate.VLMCollator`, does): each assistant turn's span is found by running
the processor on growing prefixes of the chat (the prompt up to the turn with the generation
prompt, then the turn itself), so image tokens that the processor expands are counted
exactly; a sample whose ``meta.loss_on`` is ``"last"`` (reflective correction, where an
earlier answer is the wrong one) learns only its final assistant turn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from medvl.data.boxes import MODEL_BOX_STYLE, model_turns
from medvl.data.imageio import MedicalImage, load_medical, to_pil
from medvl.data.schema import IMAGE_TOKEN, Sample, count_placeholders
from medvl.errors import MedvlUserError
from medvl.models.position_ids import enable_qwen2vl_gap
from medvl.models.utf8 import Utf8Guard, finish_text

IGNORE = -100
#: what one ``<image>`` becomes in the chat text, by model type (the processor expands it)
IMAGE_TEXT = {"qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
              "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>"}


class NativeVLM:
    def __init__(self, model, processor, max_length: int = 1024):
        self.model = model
        self.processor = processor
        self.tok = processor.tokenizer
        self.max_length = max_length
        mtype = model.config.model_type
        self.image_text = IMAGE_TEXT.get(mtype, getattr(processor, "image_token", IMAGE_TOKEN))
        self.box_style = MODEL_BOX_STYLE.get(mtype, "qwenvl")  # boxes in the family's own syntax
        if getattr(model.config, "medvl_position_gap", 0):  # saved by set_position_gap: re-apply on load
            self.set_position_gap(model.config.medvl_position_gap)

    def set_position_gap(self, gap: int) -> None:
        """Modality-gap 3D positions for Qwen2-VL-family models (medvl.models.position_ids); kept in
        the saved config as ``medvl_position_gap`` so a reload uses the same positions."""
        try:
            enable_qwen2vl_gap(self.model, gap)
        except TypeError:
            raise MedvlUserError(f"position_gap on a native {self.model.config.model_type} model: only Qwen2-VL-"
                                 "family models (3D rotary positions) are supported; compose the model instead") from None
        self.model.config.medvl_position_gap = gap

    @classmethod
    def from_pretrained(cls, path: str | Path, **kw: Any) -> "NativeVLM":
        from transformers import AutoModelForImageTextToText, AutoProcessor
        try:
            return cls(AutoModelForImageTextToText.from_pretrained(str(path)), AutoProcessor.from_pretrained(str(path)), **kw)
        except OSError as e:
            raise MedvlUserError(f"cannot load the VLM {str(path)!r} ({e})") from None

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        self.model.save_pretrained(str(out))
        self.processor.save_pretrained(str(out))
        return out

    # -- text ---------------------------------------------------------------------------------
    def _turns(self, sample: Sample) -> list:
        try:
            return model_turns(sample, self.box_style)
        except ValueError as e:
            raise MedvlUserError(str(e), record=f"id={sample.id!r}") from None

    def _text(self, sample: Sample, with_answer: bool) -> str:
        turns = self._turns(sample)
        if not with_answer and turns and turns[-1].role == "assistant":
            turns = turns[:-1]
        return self._render(turns, gen_prompt=not with_answer)

    def _render(self, turns: Sequence, gen_prompt: bool) -> str:
        msgs = [{"role": t.role, "content": t.text.replace(IMAGE_TOKEN, self.image_text)} for t in turns]
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)

    def _n_tokens(self, turns: Sequence, gen_prompt: bool, images: list) -> list[int]:
        """Token ids of the chat ``turns`` as the processor lays them out (images expanded)."""
        k = sum(count_placeholders(t.text) for t in turns)  # the images this prefix shows
        enc = self.processor(text=[self._render(turns, gen_prompt)], images=images[:k] or None, return_tensors="pt")
        return enc["input_ids"][0].tolist()

    def answer_spans(self, sample: Sample, images: list, full_ids: list[int]) -> list[tuple[int, int]]:
        """[start, end) token spans of the assistant turns the loss covers (every one; only the last
        with ``meta.loss_on == "last"``)."""
        turns = self._turns(sample)
        which = [i for i, t in enumerate(turns) if t.role == "assistant"]
        if (sample.meta or {}).get("loss_on") == "last":
            which = which[-1:]
        spans = []
        for i in which:
            head = self._n_tokens(turns[:i], True, images)
            # the last turn's prefix is the whole chat: its ids are the ones already laid out
            upto = full_ids if i == len(turns) - 1 else self._n_tokens(turns[: i + 1], False, images)
            if upto[: len(head)] != head or full_ids[: len(upto)] != upto:
                raise MedvlUserError("the chat template does not render the assistant turn as an extension of the "
                                     "prompt; cannot build a loss mask", record=f"id={sample.id!r}")
            spans.append((len(head), len(upto)))
        return spans

    def _images(self, sample: Sample) -> list:
        return [to_pil(m.array if isinstance(m.array, MedicalImage) else load_medical(m.path)) for m in sample.images]

    def encode(self, sample: Sample) -> dict[str, torch.Tensor] | None:
        n_ph = sum(count_placeholders(t.text) for t in sample.conversation)
        if n_ph != len(sample.images):
            raise MedvlUserError(f"{n_ph} <image> placeholder(s) but {len(sample.images)} image(s)",
                                 record=f"id={sample.id!r}")
        images = self._images(sample)
        full = self.processor(text=[self._text(sample, True)], images=images or None, return_tensors="pt")
        n = full["input_ids"].shape[1]
        if n > self.max_length:
            return None  # the caller counts it; image tokens are never cut
        labels = torch.full_like(full["input_ids"], IGNORE)  # [1, T]
        for a, b in self.answer_spans(sample, images, full["input_ids"][0].tolist()):
            labels[0, a:b] = full["input_ids"][0, a:b]
        out = {k: v for k, v in full.items()}
        out["labels"] = labels
        return out

    def collate(self, items: Sequence[dict[str, torch.Tensor]], side: str = "right") -> dict[str, torch.Tensor]:
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        L = max(x["input_ids"].shape[1] for x in items)
        out: dict[str, Any] = {}
        for key, value in (("input_ids", pad), ("attention_mask", 0), ("labels", IGNORE), ("mm_token_type_ids", 0)):
            if key not in items[0]:
                continue
            t = torch.full((len(items), L), value, dtype=items[0][key].dtype)
            for i, x in enumerate(items):
                n = x[key].shape[1]
                if side == "right":
                    t[i, :n] = x[key][0]
                else:
                    t[i, L - n:] = x[key][0]
            out[key] = t
        for key in ("pixel_values", "image_grid_thw"):
            vals = [x[key] for x in items if key in x]
            if vals:
                out[key] = torch.cat(vals, dim=0)
        return out

    # -- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, samples: Sequence[Sample], batch_size: int = 16, max_new_tokens: int = 32,
                 with_confidence: bool = False, **gen: Any) -> list:
        """Answers (or, with ``with_confidence``, (answer, geometric-mean token probability) pairs)."""
        answers = []
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            texts = [self._text(s, False) for s in chunk]
            images = [im for s in chunk for im in self._images(s)] or None
            self.tok.padding_side = "left"
            enc = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
            guard = Utf8Guard.for_tokenizer(self.tok)
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=self.tok.pad_token_id,
                                      **{"do_sample": False, **gen}, output_scores=with_confidence,
                                      return_dict_in_generate=True,
                                      logits_processor=[guard.logits_processor(enc["input_ids"].shape[1])])
            new = out.sequences[:, enc["input_ids"].shape[1]:]
            texts = [finish_text(self.tok.decode(row, skip_special_tokens=True)) for row in new]
            if not with_confidence:
                answers += texts
                continue
            # geometric-mean probability of the answer's tokens, its end-of-turn token included
            logp = torch.stack([s.float().log_softmax(-1) for s in out.scores], 1)  # [b, new, V]
            chosen = logp.gather(-1, new[:, :logp.shape[1], None])[..., 0]  # [b, new]
            stops = {t for t in ([self.model.generation_config.eos_token_id] if isinstance(
                self.model.generation_config.eos_token_id, int) else (self.model.generation_config.eos_token_id or []))}
            stops.add(self.tok.pad_token_id)
            for k, row in enumerate(new.tolist()):
                n = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
                answers.append((texts[k], float(chosen[k, :n].mean().exp()) if n else 0.0))
        return answers


def module_of(name: str) -> str:
    """Which of vision / connector / llm a native VLM parameter belongs to (LLaVA, Qwen2-VL names)."""
    if "multi_modal_projector" in name or ".merger." in name:
        return "connector"
    if "vision_tower" in name or ".visual." in name or name.startswith("visual."):
        return "vision"
    return "llm"



def answer_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A native VLM's logits only at the positions that predict an answer token ([N, V]) and those
    tokens ([N]): the inner model's hidden states, then the LM head on the selected rows — never
    the [B, T, vocab] logits of the prompt and image tokens (a 151k-word vocabulary makes those
    the largest tensor of a step). Works through a peft wrapper (the adapters sit inside)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    target = batch["labels"][:, 1:]
    sel = target != IGNORE  # [B, T-1]
    inner = getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if inner is None or head is None:  # no separable head: full logits, then select
        logits = base(**inputs, use_cache=False).logits
        return logits[:, :-1][sel], target[sel]
    h = inner(**inputs, use_cache=False).last_hidden_state  # [B, T, D]
    return head(h[:, :-1][sel]), target[sel]  # [N, V], [N]


def answer_token_count(encoded: dict[str, torch.Tensor]) -> int:
    """Answer tokens of one encoded sample after the shift (the rows it gives the KD loss)."""
    return int((encoded["labels"][0, 1:] != IGNORE).sum())
