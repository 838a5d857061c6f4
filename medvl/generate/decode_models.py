"""What the continuous decoder needs from a VLM, for the kinds medvl serves: composed models
(:class:`medvl.models.vlm.MedVLM`) and native Hugging Face models (:class:`medvl.models.native.NativeVLM`):
Qwen2-VL family and LLaVA-style.

The decoder (:mod:`medvl.generate.continuous`) packs many requests into one sequence and keeps one
packed KV cache, so it never calls a model's own ``forward`` or ``generate``: it needs the parts —
encode images, embed a packed step with vision features in place, each prompt token's position,
and the language model over the step with its own mask and positions. Each adapter gives exactly
those:

* ``encode(items) -> [ [N_i, D] ]``: vision features per image, what the vision cache keeps;
  an item is what :class:`medvl.generate.continuous.GenRequest` carries for an image.
* ``embed(ids [1, N], vision) -> [1, N, D]``: token embeddings, image placeholders replaced;
  ``token_embedding(ids)``: plain ones (a generated placeholder token is text).
* ``prompt_positions(ids, items)``: each prompt token's position — an int, or for 3D rotary
  positions a ``(t, h, w)`` tuple; ``step_position(p)``: a generated token's, after position ``p``.
* ``forward(embeds, mask [1, 1, N, L], positions, cache, ends) -> [len(ends), V]``: logits at
  ``ends`` only (never ``[N, vocab]``).
* ``image_tokens(items)``: the image-token slots these images fill (a prompt that does not match is
  refused alone, before it joins a step), or None where only encoding tells.
* ``span_len``: image tokens per image when every image has the same count (the image-span KV
  reuse of :mod:`medvl.generate.prompt_cache` needs it), else 0.

Qwen2-VL (Wang et al. 2024) decodes in the same packed batch as composed models: its M-RoPE
positions are computed per prompt with the model's own ``get_rope_index`` (so a ClinKD modality
gap set on the model applies), and a generated token's three position components are equal — the
previous token's largest plus one, which is what the model's ``rope_deltas`` encode for a single
request. Nothing per request lives outside the packed cache. Its image-token count depends on
the image's size, so its vision features are kept per image with their own length. Native
LLaVA-style models use their own ``get_image_features`` (tower, feature layer, projector) and 1D
positions. For native models the template prefix's KV is shared; the image-span reuse is kept to
composed models (a first cut: LLaVA's spans would qualify, Qwen2-VL's differ in length).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from medvl.errors import MedvlUserError
from medvl.models.precision import as_pixels
from medvl.registry import Registry


class ComposedDecoding:
    """A composed :class:`medvl.models.vlm.MedVLM`: fixed tokens per image, 1D positions (or
    the model's modality-gap positions)."""

    def __init__(self, model, image_fn: Callable, tower_precision: str = "fp32"):
        self.model, self.image_fn, self.tower_precision = model, image_fn, tower_precision
        self.image_token_id = model.config.image_token_id
        self.span_len = int(getattr(model, "tokens_per_image", 0) or 0)
        self.shares_prefix = not getattr(model.config, "position_gap", 0)
        self.num_layers = model.llm.config.get_text_config().num_hidden_layers
        self.device = model.device

    def encode(self, items: list) -> list[torch.Tensor]:
        m = self.model
        px = as_pixels(torch.stack([self.image_fn(x) for x in items]), m)  # [n, C, H, W]
        with torch.autocast(px.device.type, dtype=torch.bfloat16, enabled=self.tower_precision == "bf16"):
            vt = m.vision(px).to(m.dtype)  # [n, N, Dv]
        return [v.clone() for v in vt]  # own storage: a cached image does not keep its whole batch alive

    def image_tokens(self, items: list) -> int | None:
        """How many image-token slots these images fill in a prompt (None: not known before encoding)."""
        return len(items) * self.span_len

    def embed(self, ids: torch.Tensor, vision: list[torch.Tensor]) -> torch.Tensor:
        return self.model.embed(ids, None, torch.stack(vision) if vision else None)

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Plain token embeddings, image placeholders included: [..., D]."""
        return self.model.get_input_embeddings()(ids)

    def prompt_positions(self, ids: list[int], items: list) -> list[int]:
        full = self.model.position_ids(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        return full[0].tolist() if full is not None else list(range(len(ids)))

    @staticmethod
    def step_position(p: int) -> int:
        return p

    @staticmethod
    def last_position(p) -> int:
        return p

    def forward(self, embeds, mask, positions: list, cache, ends: list[int]) -> torch.Tensor:
        dev = self.device
        pos = torch.tensor([positions], device=dev)  # [1, N]
        out = self.model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, past_key_values=cache,
                             use_cache=True, logits_to_keep=torch.tensor(ends, device=dev))
        return out.logits[0]  # [len(ends), V]


class NativeDecoding:
    """A native Hugging Face LLaVA-style model (``LlavaForConditionalGeneration`` and kin): the
    processor's pixels per image (``items`` are ``{"pixel_values": [1, C, H, W]}``), the model's
    own ``get_image_features`` (tower, feature layer, projector), 1D positions."""

    def __init__(self, model):
        self.model, self.inner = model, model.model
        cfg = model.config
        self.image_token_id = cfg.image_token_id
        self.span_len = 0  # the image-span reuse is kept to composed models (first cut)
        self.shares_prefix = True  # the text before the first image has plain positions
        self.num_layers = cfg.get_text_config().num_hidden_layers
        self.device = model.device

    def encode(self, items: list) -> list[torch.Tensor]:
        px = torch.cat([x["pixel_values"] for x in items]).to(self.device, self.model.dtype)  # [n, C, H, W]
        out = self.inner.get_image_features(pixel_values=px, return_dict=True).pooler_output  # n x [N, D]
        return [v.to(self.model.dtype).clone() for v in out]  # own storage (not views of the batch)

    def image_tokens(self, items: list) -> int | None:
        return None  # LLaVA-style: known once encoded (the processor already checks its own count)

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Plain token embeddings, image placeholders included: [..., D]."""
        return self.inner.get_input_embeddings()(ids)

    def embed(self, ids: torch.Tensor, vision: list[torch.Tensor]) -> torch.Tensor:
        text = self.token_embedding(ids)  # [1, N, D]
        mask = ids == self.image_token_id
        feats = torch.cat(vision) if vision else text.new_zeros(0, text.shape[-1])  # [sum N_i, D]
        if int(mask.sum()) != feats.shape[0]:
            raise MedvlUserError(f"{int(mask.sum())} image-token positions but {feats.shape[0]} image features: the "
                                 "prompt's image placeholders do not match its images")
        return text.masked_scatter(mask.unsqueeze(-1), feats.to(text.dtype)) if vision else text

    def prompt_positions(self, ids: list[int], items: list) -> list:
        return list(range(len(ids)))

    @staticmethod
    def step_position(p: int):
        return p

    @staticmethod
    def last_position(p) -> int:
        return p

    def _positions(self, positions: list) -> torch.Tensor:
        return torch.tensor([positions], device=self.device)  # [1, N]

    def forward(self, embeds, mask, positions: list, cache, ends: list[int]) -> torch.Tensor:
        h = self.inner.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=self._positions(positions),
                                      past_key_values=cache, use_cache=True).last_hidden_state  # [1, N, D]
        return self.model.lm_head(h[0, ends])  # [len(ends), V]


class Qwen2VLDecoding(NativeDecoding):
    """A native Qwen2-VL / Qwen2.5-VL model: images as the processor's patches and grid (``items``
    are ``{"pixel_values": [P, C*T*p*p], "image_grid_thw": [1, 3]}``), 3D rotary positions."""

    def encode(self, items: list) -> list[torch.Tensor]:
        visual = self.inner.visual
        px = torch.cat([x["pixel_values"] for x in items]).to(self.device, visual.dtype)  # [P, C*T*p*p]
        grid = torch.cat([x["image_grid_thw"] for x in items]).to(self.device)  # [n, 3]
        out = self.inner.get_image_features(px, grid, return_dict=True).pooler_output  # n x [N_i, D]
        return [v.to(self.model.dtype).clone() for v in out]  # own storage (not views of the batch)

    def image_tokens(self, items: list) -> int | None:
        merge = self.inner.config.vision_config.spatial_merge_size
        return sum(int(x["image_grid_thw"].prod()) // merge**2 for x in items)

    def prompt_positions(self, ids: list[int], items: list) -> list[tuple[int, int, int]]:
        t = torch.tensor([ids])  # [1, T]
        if not items:
            return [(i, i, i) for i in range(len(ids))]
        grid = torch.cat([x["image_grid_thw"] for x in items])  # [n, 3]
        pos, _ = self.inner.get_rope_index(t, mm_token_type_ids=(t == self.image_token_id).int(), image_grid_thw=grid)
        return [tuple(p) for p in pos[:, 0].T.tolist()]  # T x (t, h, w)

    @staticmethod
    def step_position(p: int) -> tuple[int, int, int]:
        return (p, p, p)

    @staticmethod
    def last_position(p) -> int:
        return max(p)

    def _positions(self, positions: list) -> torch.Tensor:
        return torch.tensor(positions, device=self.device).T[:, None]  # [3, 1, N]


DECODINGS: Registry[Callable] = Registry("model type the continuous decoder serves")
"""``config.model_type`` -> the adapter's constructor (model, image_fn, tower_precision); exact names
only: LLaVA-NeXT or Idefics lay out their image features differently and are not guessed at."""
DECODINGS.register("medvl_vlm", lambda m, fn, tp: ComposedDecoding(m, fn, tp))
for _name in ("qwen2_vl", "qwen2_5_vl"):
    DECODINGS.register(_name, lambda m, fn, tp: Qwen2VLDecoding(m))
DECODINGS.register("llava", lambda m, fn, tp: NativeDecoding(m))


def decoding_for(model, image_fn: Callable | None = None, tower_precision: str = "fp32") -> Any:
    """The adapter for a composed MedVLM or a native Hugging Face VLM, by ``config.model_type``."""
    mtype = getattr(model.config, "model_type", "") or type(model).__name__
    try:
        make = DECODINGS.get(mtype)
    except MedvlUserError as e:
        raise MedvlUserError(f"{e}. `medvl predict` and `medvl chat` run other models through their own "
                             "generate") from None
    return make(model, image_fn, tower_precision)
