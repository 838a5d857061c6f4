"""Modality-gap position ids: a configurable gap of unused positions before and after every image block.

ClinKD (Ge et al., 2025) calls this "Med-CLIP guided RoPE": in its code the positions of the
image tokens are shifted away from the surrounding text so that rotary attention sees a
distance between the two modalities. medvl implements it as a position-id *strategy*, with
no change to any library file:

* composed VLMs (1D rotary): :func:`gap_position_ids` gives ``[B, T]`` positions. Each
  image occupies ``tokens_per_image`` consecutive positions as usual; ``gap`` positions are
  skipped before each image block and ``gap`` after it. The model passes them to the LM
  in training, and :func:`medvl.models.vlm.greedy_decode` continues them during cached
  generation (next position = last + 1);
* Qwen2-VL / Qwen2.5-VL (3D "M-RoPE"): :func:`enable_qwen2vl_gap` replaces the
  ``get_rope_index`` of one model *instance* by :func:`qwen2vl_gap_rope_index`. Upstream
  gives an image block the positions ``start + (t, h, w)`` and the text after it
  ``start + max(h, w)``; with a gap the block starts at ``start + gap`` and the text after it
  at ``start + gap + max(h, w) + gap``. Cached generation stays consistent because the model
  derives its ``rope_deltas`` (next position = max + 1) from the same function.

Example (the issue's, tested): text 3 · image with a 1x2x2 merged grid · text 3, gap 1 →
text 0,1,2 · image (4,4,4) (4,4,5) (4,5,4) (4,5,5) · text 7,8,9; upstream gives
text 0,1,2 · image (3,3,3) … (3,4,4) · text 5,6,7.
"""

from __future__ import annotations

import itertools
import types

import torch


def gap_position_ids(input_ids: torch.Tensor, image_token_id: int, tokens_per_image: int, gap: int,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] positions with ``gap`` skipped before and after every block of ``tokens_per_image``
    image tokens; padding (mask 0) gets position 0 and does not advance the count."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device).long()
    img = (input_ids == image_token_id) & mask.bool()  # [B, T]
    step = mask.clone()  # how far each real token advances the position
    if gap and bool(img.any()):
        count = img.long().cumsum(-1)  # image tokens seen so far, per row
        start = img & ((count - 1) % tokens_per_image == 0)  # first token of an image block
        end = img & (count % tokens_per_image == 0)  # last token of an image block
        after = torch.zeros_like(end)
        after[:, 1:] = end[:, :-1]  # the token right after a block
        step = step + gap * start.long() + gap * (after & mask.bool()).long()
    return (step.cumsum(-1) - 1).clamp(min=0) * mask  # [B, T]


def qwen2vl_gap_rope_index(model, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
                           image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                           attention_mask: torch.Tensor | None = None, *, gap: int = 1,
                           **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL's 3D positions ([3, B, T]) and rope deltas ([B, 1]) with a modality gap.

    ``model`` is the ``Qwen2VLModel`` (or Qwen2.5-VL) instance; its own
    ``get_vision_position_ids`` lays out each block's (t, h, w) grid, so merge sizes and
    temporal spacing follow the installed transformers version.
    """
    merge = model.config.vision_config.spatial_merge_size
    B, T = input_ids.shape
    pos = torch.zeros(3, B, T, dtype=input_ids.dtype, device=input_ids.device)
    grids = {1: iter(image_grid_thw) if image_grid_thw is not None else None,
             2: iter(video_grid_thw) if video_grid_thw is not None else None}
    deltas = []
    for b in range(B):
        keep = attention_mask[b].bool() if attention_mask is not None else torch.ones(T, dtype=torch.bool,
                                                                                       device=input_ids.device)
        types_b = mm_token_type_ids[b][keep].tolist()
        parts, cur = [], 0
        for kind, grp in itertools.groupby(types_b):
            n = len(list(grp))
            if kind == 0:  # text: consecutive positions on all three axes
                parts.append(torch.arange(n, device=input_ids.device).view(1, -1).expand(3, -1) + cur)
                cur += n
                continue
            left = n  # a run may hold several images / videos back to back: one block each
            while left > 0:
                thw = next(grids[kind])
                block = model.get_vision_position_ids(cur + gap, thw, 1, merge, device=input_ids.device)  # [3, n_i]
                parts.append(block)
                left -= block.shape[1]
                cur += gap + int(max(thw[1], thw[2])) // merge + gap
        flat = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long, device=input_ids.device)
        pos[:, b, keep] = flat.to(pos.dtype)
        deltas.append((flat.max() + 1 - int(keep.sum())) if flat.numel() else torch.tensor(0))
    return pos, torch.stack([torch.as_tensor(d) for d in deltas]).view(B, 1).to(input_ids.device)


def enable_qwen2vl_gap(vlm_model, gap: int) -> None:
    """Give one Qwen2-VL model instance modality-gap positions (training and generation).

    ``vlm_model`` is ``Qwen2VLForConditionalGeneration`` (or its inner ``Qwen2VLModel``).
    Only this instance changes; ``gap=0`` restores the class's own method.
    """
    inner = vlm_model.model if hasattr(vlm_model, "model") and hasattr(vlm_model.model, "get_rope_index") else vlm_model
    if not hasattr(inner, "get_rope_index"):
        raise TypeError(f"{type(vlm_model).__name__} has no get_rope_index: not a Qwen2-VL-family model")
    if gap == 0:
        inner.__dict__.pop("get_rope_index", None)
    else:
        def rope_index(self, *args, **kwargs):
            return qwen2vl_gap_rope_index(self, *args, gap=gap, **kwargs)
        inner.get_rope_index = types.MethodType(rope_index, inner)
    inner.rope_deltas = None
