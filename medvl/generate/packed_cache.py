"""The continuous decoder's KV cache: one packed sequence per layer, written into a buffer that
grows by blocks, and shown to attention at a length rounded up to a block.

Why not transformers' ``DynamicCache``: it appends by ``torch.cat`` (the whole cache is copied
every step, in every layer) and hands attention exactly ``K + N`` key columns. In a packed
continuous batch ``K + N`` is new almost every step, and the CPU kernels behind attention cache
one compiled kernel per shape they meet — PyTorch's CPU flash attention compiles a oneDNN
``brgemm`` for each tail block (``kv_len % 512``; ``torch/aten/src/ATen/native/cpu/
FlashAttentionKernel.cpp``, a per-thread ``KernelCache`` with no bound). Over 10,000 requests
that cache was the server's remaining RSS drift (docs/serve.md, 2026-12-06: traced with
jemalloc's heap profiler).

Design choices:

* **Block-rounded key length.** ``update`` writes the new columns at ``[used, used + n)`` and
  returns the first ``ceil((used + n) / block) * block`` columns; the decoder's mask hides the
  columns past ``used + n`` (they hold zeros or stale finite keys, never NaN: a masked column's
  probability is exactly 0). With ``block = 64`` attention meets at most 8 key tails instead of
  512, and pays at most 63 masked columns per step — vLLM's paged cache does the same rounding
  at its block size (Kwon et al. 2023, "PagedAttention"), without pages.
* **Written in place, grown by blocks.** Capacity grows to the next multiple of ``4 * block``
  at least 25 % beyond what is needed, so a step's append is a copy of its own columns, not of
  the cache; a buffer at most a quarter full after rows leave is shrunk (an idle server gives
  its memory back).
* **Compaction in place** (:meth:`PackedLayer.keep`): the columns of rows that left are
  dropped by one gather per layer, as before.

Shapes: buffers ``[1, H_kv, capacity, D]``; ``keys`` / ``values`` are views of the ``used``
columns (what :mod:`medvl.generate.prompt_cache` reads a span from).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

BLOCK = 64
"""key columns attention sees are rounded up to a multiple of this"""


def round_up(n: int, block: int) -> int:
    return -(-n // block) * block


class PackedLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, block: int = BLOCK):
        super().__init__()
        self.block = block
        self.used = 0
        self.buf_k: torch.Tensor | None = None  # [1, H, capacity, D]
        self.buf_v: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.buf_k is None else self.buf_k.shape[2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _resize(self, cap: int, like: torch.Tensor) -> None:
        """A buffer of ``cap`` columns holding the ``used`` ones (zeros after them)."""
        b, h, _, d = like.shape
        k = like.new_zeros(b, h, cap, d)
        v = like.new_zeros(b, h, cap, d)
        if self.used:
            k[:, :, :self.used] = self.buf_k[:, :, :self.used]
            v[:, :, :self.used] = self.buf_v[:, :, :self.used]
        self.buf_k, self.buf_v = k, v

    def _views(self) -> None:
        self.keys, self.values = self.buf_k[:, :, :self.used], self.buf_v[:, :, :self.used]

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Append ``[1, H, n, D]`` columns."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        need = round_up(self.used + n, self.block)  # what attention will be shown
        if need > self.capacity:
            self._resize(round_up(max(need, self.capacity * 5 // 4), 4 * self.block), key_states)
        self.buf_k[:, :, self.used:self.used + n] = key_states
        self.buf_v[:, :, self.used:self.used + n] = value_states
        self.used += n
        self._views()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the step's columns; attention gets the cache rounded up to a block: [1, H, L, D]."""
        self.write(key_states, value_states)
        L = round_up(self.used, self.block)
        return self.buf_k[:, :, :L], self.buf_v[:, :, :L]

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only columns ``idx`` (sorted), moved to the front; a buffer left mostly empty shrinks."""
        m = len(idx)
        k, v = self.buf_k[:, :, idx], self.buf_v[:, :, idx]  # [1, H, m, D] gathered copies
        fit = round_up(max(m, 1) * 5 // 4 + 1, 4 * self.block)
        if self.capacity >= 4 * fit:  # mostly empty: a smaller buffer
            b, h, _, d = k.shape
            self.buf_k, self.buf_v = k.new_zeros(b, h, fit, d), v.new_zeros(b, h, fit, d)
        self.buf_k[:, :, :m] = k
        self.buf_v[:, :, :m] = v
        self.used = m
        self._views()

    def truncate(self, n: int) -> None:
        """Forget the last ``n`` columns (a step's padding tokens)."""
        self.used -= n
        self._views()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return round_up(self.used + query_length, self.block), 0

    def get_seq_length(self) -> int:
        return self.used

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.buf_k = self.buf_v = self.keys = self.values = None
        self.used = 0
        self.is_initialized = False


class PackedKVCache(Cache):
    """One :class:`PackedLayer` per decoder layer."""

    def __init__(self, num_layers: int, block: int = BLOCK):
        super().__init__(layers=[PackedLayer(block) for _ in range(num_layers)])
        self.block = block

    def padded(self, n: int) -> int:
        """How many key columns attention sees once the cache holds ``n``."""
        return round_up(n, self.block)

    def write(self, per_layer: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Append columns given per layer as (keys, values) [1, H, n, D]."""
        for layer, (k, v) in zip(self.layers, per_layer):
            layer.write(k, v)

    def keep(self, idx: torch.Tensor) -> None:
        for layer in self.layers:
            layer.keep(idx)

    def truncate(self, n: int) -> None:
        for layer in self.layers:
            layer.truncate(n)
