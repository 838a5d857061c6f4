"""What the continuous decoder computes once and reuses across requests: vision tokens by image,
the KV of the chat template's fixed prefix, and the KV of each image's token span after it.

Design choices:

* **Content-addressed, bounded by bytes** (:class:`TensorLRU`): entries are keyed by the SHA-256
  of the image's data URI, least recently used evicted past a byte budget; thread-safe, because
  the server's request handlers look vision tokens up while the decoder thread inserts.
* **Prompt KV through the image** (:class:`PromptKV`). A default chat prompt is
  ``[template prefix | image tokens | question | assistant header]`` (SmolLM2: 24 + 16 + ~12
  tokens). The prefix is the same for every request, so its KV is computed once. Under causal
  attention the image span's keys and values depend only on what precedes them — the fixed
  prefix and the image — so they are a function of the image alone, and a second question
  about the same study needs to run only its question (12 tokens instead of 28). This is
  automatic prefix caching (vLLM; SGLang's RadixAttention, Zheng et al. 2024) for the one
  prefix shape a VQA server sees, with multimodal inputs hashed into the key as vLLM does,
  without a radix tree: one fixed prefix, one span per image.
* **Copied in, not recomputed.** The decoder's cache is one packed sequence; the prefix sits
  once at its start, shared by every row that starts with it, and a cached span is copied in as
  the row's own first columns (:mod:`medvl.generate.continuous`). The keys were rotated at
  positions P..P+S-1, which is where the row's own tokens would have put them.
* Only requests with exactly one image whose tokens directly follow the prefix use a span
  (a chat turn with the image first, as the server and the chat template build it); others
  compute theirs as before. A span is stored as one ``[layers, 2, H_kv, S, D]`` tensor.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch


class TensorLRU:
    """Tensors by key, least recently used evicted past ``max_bytes`` (0 keeps nothing)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = self.hits = self.misses = 0
        self._lock = threading.Lock()

    def get(self, key: str, count_miss: bool = True) -> torch.Tensor | None:
        """The tensor, or None; ``count_miss=False`` for a look-up whose miss is counted elsewhere
        (the request handler's, before the decoder encodes the image and counts it)."""
        with self._lock:
            v = self.items.get(key)
            if v is None:
                self.misses += count_miss
                return None
            self.items.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        with self._lock:
            if size > self.max_bytes or key in self.items:
                return
            self.items[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self.items.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()

    def __contains__(self, key: object) -> bool:
        """Held now (no hit counted, no recency change)."""
        with self._lock:
            return key in self.items

    def clear(self) -> None:
        with self._lock:
            self.items.clear()
            self.bytes = 0

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"entries": len(self.items), "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                    "misses": self.misses}


class PromptKV:
    """The template prefix's KV (computed on first use) and the image spans' KV after it."""

    def __init__(self, dm, prefix_ids: list[int], max_span_bytes: int):
        self.dm = dm  # the model's decoding adapter (medvl.generate.decode_models)
        self.prefix_ids = list(prefix_ids)
        self.image_id = dm.image_token_id
        self.span_len = dm.span_len
        self.spans = TensorLRU(max_span_bytes)
        self._prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer [1, H, P, D]

    def starts_with_prefix(self, ids: list[int]) -> bool:
        P = len(self.prefix_ids)
        return bool(P) and len(ids) > P and ids[:P] == self.prefix_ids

    def span_key(self, ids: list[int], image_keys: list[str]) -> str | None:
        """The image's key when this prompt's only image directly follows the prefix, else None."""
        P, S = len(self.prefix_ids), self.span_len
        if not (P and S and self.spans.max_bytes and len(image_keys) == 1 and len(ids) > P + S):
            return None
        return image_keys[0] if ids[P:P + S] == [self.image_id] * S and ids[P + S] != self.image_id else None

    @torch.no_grad()
    def prefix_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._prefix is None:
            from transformers import DynamicCache
            dm, cache = self.dm, DynamicCache()
            ids = torch.tensor([self.prefix_ids], device=dm.device)  # [1, P]
            dm.forward(dm.embed(ids, []), None, dm.prompt_positions(self.prefix_ids, []), cache, [len(self.prefix_ids) - 1])
            self._prefix = [(layer.keys, layer.values) for layer in cache.layers]
        return self._prefix

    def store(self, key: str, cache, row: int, start: int) -> None:
        """Keep the image span at cache columns ``start .. start + S`` of batch row ``row``."""
        S = self.span_len
        span = torch.stack([torch.stack([layer.keys[row, :, start:start + S], layer.values[row, :, start:start + S]])
                            for layer in cache.layers])  # [layers, 2, H, S, D]
        self.spans.put(key, span)
