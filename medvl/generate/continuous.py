"""Continuous (in-flight) batching for composed VLMs: requests join a running decode between
steps and leave the moment they finish.

One worker thread owns the model. Each turn of its loop it (1) admits the requests waiting
in a bounded queue, up to ``max_batch`` rows in flight — at once when nothing is running,
otherwise every ``join_every`` decode steps (4), (2) prefills them together — the
vision tower runs once per distinct image, through a content-addressed LRU cache of vision
tokens bounded in bytes, then the LM over the left-padded prompts — and merges their KV
cache into the running one, and (3) runs one decode step for every row. A row leaves at
its end-of-turn token, its own ``max_new_tokens``, a stop string, or when its client goes
away (cancel); its KV rows are dropped at once and the cache's leading all-padding columns
trimmed, so the batch costs only what is still being written.

Correctness: every row keeps its own attention mask and position ids (the count of real
tokens before it, or the model's modality-gap positions), so padding columns added when
rows of different lengths are merged are masked out and a request decodes as it would
alone — the test compares greedy answers under load with answers served one at a time.
This is the scheme of vLLM / TGI (Kwon et al. 2023, "Efficient Memory Management for Large
Language Model Serving with PagedAttention"; Yu et al. 2022, "Orca") without paged memory:
the cache is a dense ``DynamicCache`` re-packed on joins and leaves, which is what a
CPU-sized model wants.

Prompt-prefix cache: every chat prompt starts with the same template tokens (SmolLM2's
default system turn and ``<|im_start|>user``: 24 of a VQA-RAD prompt's 55 tokens). Given
``prefix_ids``, their KV is computed once and copied into each prefill of requests that start
with them, so only the rest is run — the fixed-prefix case of vLLM's automatic prefix caching
and SGLang's RadixAttention (Zheng et al. 2024). The rows are laid out as ``[prefix | padding |
rest]``; positions count real tokens, so the cached keys (rotated at positions 0..P-1) are the
ones each row would have computed. Models with their own position ids (the modality gap) and
requests that do not start with the prefix (a client's own system turn) take the full prefill.

Native Hugging Face VLMs are not served this way: Qwen2-VL keeps per-request rotary deltas
outside the cache, and LLaVA-style native models would need their own prefill; ``medvl
serve`` takes composed models.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from medvl.models.precision import as_pixels


class QueueFull(Exception):
    pass


@dataclass
class GenRequest:
    """One prompt to decode. ``images``: Media whose pixels the decoder computes on a cache
    miss; ``image_keys``: their content hashes (the vision-token cache's keys)."""
    ids: list[int]
    images: list = field(default_factory=list)
    image_keys: list[str] = field(default_factory=list)
    vision: list = field(default_factory=list)
    """per image, its vision tokens when the caller already holds them (a cache hit when the request
    was parsed, so the upload was never decoded), else None: the decoder encodes ``images[i]``"""
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0: greedy"""
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    on_text: Callable[[str], None] | None = None
    """streaming: called with the answer so far after every token"""
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # decoding state
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    gen: torch.Generator | None = None
    t_submit: float = 0.0

    def cancel(self) -> None:
        """The client went away: the row leaves the batch at the next step."""
        self.cancelled.set()
        self.future.cancel()


def content_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class VisionCache:
    """Vision tokens by image content hash, least recently used evicted past ``max_bytes``.
    Thread-safe: the server's request handlers look up (a hit skips decoding the upload) while
    the decoder thread inserts."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = self.hits = self.misses = 0
        self._lock = threading.Lock()

    def get(self, key: str, count_miss: bool = True) -> torch.Tensor | None:
        """The tokens, or None; ``count_miss=False`` for a look-up whose miss the decoder will count
        when it encodes the image (the server's request handler)."""
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

    def clear(self) -> None:
        with self._lock:
            self.items.clear()
            self.bytes = 0

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"entries": len(self.items), "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                    "misses": self.misses}


class ContinuousDecoder:
    def __init__(self, model, tokenizer, image_fn: Callable, *, max_batch: int = 32, max_queue: int = 64,
                 cache_bytes: int = 256 * 2**20, tower_precision: str = "fp32", join_every: int = 4,
                 prefix_ids: list[int] | None = None):
        self.model, self.tok, self.image_fn = model, tokenizer, image_fn
        image_id = getattr(model.config, "image_token_id", None)
        usable = (prefix_ids and image_id not in prefix_ids and not getattr(model.config, "position_gap", 0))
        self.prefix_ids: list[int] = list(prefix_ids) if usable else []
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer [1, H, P, D]
        self.max_batch = max(1, max_batch)
        self.join_every = max(1, join_every)
        self._since_join = 0
        self.q: queue.Queue = queue.Queue(maxsize=max_queue)
        self.vision_cache = VisionCache(cache_bytes)
        self.tower_precision = tower_precision
        vocab = tokenizer.get_vocab()
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in vocab else tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.rows: list[GenRequest] = []
        self.cache = None  # DynamicCache for the rows, [b, H, L, D] per layer
        self.mask: torch.Tensor | None = None  # [b, L]
        self.pos: torch.Tensor | None = None  # [b] last position of each row
        self.last: torch.Tensor | None = None  # [b] last token of each row
        self.counters = {"admitted": 0, "finished": 0, "cancelled": 0, "steps": 0, "row_steps": 0, "prefills": 0,
                         "failed": 0, "prefix_hits": 0}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="medvl-decoder", daemon=True)
        self.thread.start()

    # -- the public side ------------------------------------------------------------------------
    def submit(self, req: GenRequest) -> Future:
        req.t_submit = time.monotonic()
        try:
            self.q.put_nowait(req)
        except queue.Full:
            raise QueueFull from None
        return req.future

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {"running": len(self.rows), "queue": self.q.qsize(), **c,
                "mean_rows_per_step": c["row_steps"] / c["steps"] if c["steps"] else 0.0,
                "vision_cache": self.vision_cache.stats()}

    # -- the worker -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            new: list[GenRequest] = []
            if not self.rows:
                try:
                    new.append(self.q.get(timeout=0.1))
                except queue.Empty:
                    continue
            # newcomers join between decode steps, at most every ``join_every`` steps while rows are
            # running: a prefill costs several decode steps, so joining at every step would stretch
            # long answers by one prefill per token (the tail latency); joining in groups also
            # prefills more rows per call. (Joining sooner when the waiting outnumber the running,
            # TGI's waiting_served_ratio 1.2, was measured: 9.3 rows per step instead of 6.9, the same
            # answers/s, a worse p99 — docs/serve.md)
            can_join = not self.rows or self._since_join >= self.join_every
            while can_join and len(self.rows) + len(new) < self.max_batch:
                try:
                    new.append(self.q.get_nowait())
                except queue.Empty:
                    break
            new = [r for r in new if not r.cancelled.is_set() and r.future.set_running_or_notify_cancel()]
            try:
                if new:
                    self._prefill(new)
                    self._since_join = 0
                if self.rows:
                    self._step()
                    self._since_join += 1
            except Exception as e:  # noqa: BLE001 - handed to every request in flight, the loop goes on
                for r in new + self.rows:
                    if not r.future.done():
                        r.future.set_exception(e)
                self.counters["failed"] += len(self.rows)
                self.rows, self.cache, self.mask, self.pos, self.last = [], None, None, None, None

    @torch.no_grad()
    def _vision(self, reqs: list[GenRequest]) -> torch.Tensor | None:
        """Vision tokens of every image of these requests, in order: [n_img, N, Dv]."""
        m = self.model
        need: dict[str, Any] = {}
        found: dict[str, torch.Tensor] = {}
        for r in reqs:
            for i, (media, key) in enumerate(zip(r.images, r.image_keys)):
                if key in found or key in need:
                    continue
                v = r.vision[i] if i < len(r.vision) and r.vision[i] is not None else self.vision_cache.get(key)
                if v is None:
                    need[key] = media
                else:
                    found[key] = v
        if need:
            px = as_pixels(torch.stack([self.image_fn(md) for md in need.values()]), m)  # [n_new, C, H, W]
            with torch.autocast(px.device.type, dtype=torch.bfloat16, enabled=self.tower_precision == "bf16"):
                vt = m.vision(px).to(m.dtype)  # [n_new, N, Dv]
            for key, v in zip(need, vt):
                v = v.contiguous()
                found[key] = v
                self.vision_cache.put(key, v)
        keys = [k for r in reqs for k in r.image_keys]
        return torch.stack([found[k] for k in keys]) if keys else None

    def _prefill(self, reqs: list[GenRequest]) -> None:
        P = len(self.prefix_ids)
        hit: list[GenRequest] = []
        miss: list[GenRequest] = []
        for r in reqs:
            (hit if P and len(r.ids) > P and r.ids[:P] == self.prefix_ids else miss).append(r)
        for group, p in ((hit, P), (miss, 0)):
            if group:
                self._prefill_rows(group, p)

    def _prefix_cache(self, n: int):
        """A fresh DynamicCache holding the prompt prefix's KV for ``n`` rows."""
        from transformers import DynamicCache
        m = self.model
        if self._prefix_kv is None:
            ids = torch.tensor([self.prefix_ids], device=m.device)  # [1, P]
            out = m.llm(inputs_embeds=m.embed(ids, None), use_cache=True, past_key_values=DynamicCache(),
                        logits_to_keep=1)
            self._prefix_kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        cache = DynamicCache()
        for i, (k, v) in enumerate(self._prefix_kv):
            cache.update(k.expand(n, -1, -1, -1).contiguous(), v.expand(n, -1, -1, -1).contiguous(), i)
        return cache

    @torch.no_grad()
    def _prefill_rows(self, reqs: list[GenRequest], P: int) -> None:
        """Prefill these requests together; with ``P`` > 0 their first P tokens are the cached
        prefix and only the rest runs: rows laid out [prefix | left padding | rest]."""
        from transformers import DynamicCache
        m = self.model
        T = max(len(r.ids) - P for r in reqs)
        ids = torch.full((len(reqs), T), self.pad, dtype=torch.long)
        mask = torch.zeros((len(reqs), P + T), dtype=torch.long)
        mask[:, :P] = 1
        for i, r in enumerate(reqs):  # left padding of the rest
            ids[i, T - (len(r.ids) - P):] = torch.tensor(r.ids[P:])
            mask[i, P + T - (len(r.ids) - P):] = 1
        ids, mask = ids.to(m.device), mask.to(m.device)
        emb = m.embed(ids, None, self._vision(reqs))  # [n, T, D]
        pos = None if P else m.position_ids(ids, mask)
        if pos is None:
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, P:]  # [n, T]: real tokens before each
        cache = self._prefix_cache(len(reqs)) if P else DynamicCache()
        self.counters["prefix_hits"] += len(reqs) if P else 0
        out = m.llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        for r in reqs:
            if r.temperature > 0:
                r.gen = torch.Generator(device=m.device)
                r.gen.manual_seed(r.seed if r.seed is not None else int(torch.randint(2**62, (1,))))
        self.counters["prefills"] += 1
        self.counters["admitted"] += len(reqs)
        first = self._choose(out.logits[:, -1].float(), reqs)  # [n]
        keep = self._accept(reqs, first)  # a request may be done after its first token
        if not keep:
            return
        cache = out.past_key_values
        if len(keep) < len(reqs):
            sel = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(sel)
            mask, pos, first = mask[sel], pos[sel], first[sel]
        self._merge([reqs[i] for i in keep], cache, mask, pos.max(-1).values, first)

    def _merge(self, reqs, cache, mask, pos, last) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask, self.pos, self.last = list(reqs), cache, mask, pos, last
            return
        La, Lb = self.mask.shape[1], mask.shape[1]
        L = max(La, Lb)
        for la, lb in zip(self.cache.layers, cache.layers):
            la.keys = torch.cat([_left_pad(la.keys, L - La), _left_pad(lb.keys, L - Lb)], 0)
            la.values = torch.cat([_left_pad(la.values, L - La), _left_pad(lb.values, L - Lb)], 0)
        pad = lambda t, n: torch.cat([t.new_zeros(t.shape[0], n), t], 1)  # noqa: E731
        self.mask = torch.cat([pad(self.mask, L - La), pad(mask, L - Lb)], 0)
        self.rows += list(reqs)
        self.pos = torch.cat([self.pos, pos])
        self.last = torch.cat([self.last, last])

    def _choose(self, logits: torch.Tensor, reqs: list[GenRequest]) -> torch.Tensor:
        """Each row's next token: argmax, or a draw from its own temperature / top-p nucleus."""
        nxt = logits.argmax(-1)  # [b]
        for i, r in enumerate(reqs):
            if r.temperature > 0:
                probs = (logits[i] / r.temperature).softmax(-1)
                if r.top_p < 1.0:
                    sp, si = probs.sort(descending=True)
                    sp = sp.masked_fill(sp.cumsum(-1) - sp > r.top_p, 0.0)
                    probs = torch.zeros_like(probs).scatter(-1, si, sp)
                nxt[i] = torch.multinomial(probs, 1, generator=r.gen)[0]
        return nxt

    @torch.no_grad()
    def _step(self) -> None:
        """One decode step for every row in flight."""
        b = len(self.rows)
        dev = self.mask.device
        self.pos = self.pos + 1
        self.mask = torch.cat([self.mask, torch.ones(b, 1, dtype=self.mask.dtype, device=dev)], 1)
        out = self.model.llm(input_ids=self.last[:, None], attention_mask=self.mask, position_ids=self.pos[:, None],
                             past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        self.last = self._choose(out.logits[:, -1].float(), self.rows)
        self.counters["steps"] += 1
        self.counters["row_steps"] += b
        keep = self._accept(self.rows, self.last)
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask, self.pos, self.last = [], None, None, None, None
            return
        idx = torch.tensor(keep, device=dev)
        self.cache.batch_select_indices(idx)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.pos, self.last = self.mask[idx], self.pos[idx], self.last[idx]
        start = int(self.mask.any(0).long().argmax())  # leading columns that are padding in every row
        if start:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
            self.mask = self.mask[:, start:]

    def _accept(self, rows: list[GenRequest], tokens: torch.Tensor) -> list[int]:
        """Append each row's new token; returns the indices of rows still decoding (finished and
        cancelled rows leave)."""
        keep = []
        for i, (r, t) in enumerate(zip(rows, tokens.tolist())):
            if r.cancelled.is_set():
                self.counters["cancelled"] += 1
                continue
            if t == self.eos:
                self._finish(r)
                continue
            r.tokens.append(t)
            done = len(r.tokens) >= r.max_new_tokens
            if r.stop or r.on_text is not None:
                r.text = self.tok.decode(r.tokens, skip_special_tokens=True)
                cut = min((r.text.find(x) for x in r.stop if x in r.text), default=-1)
                if cut >= 0:
                    r.text, done = r.text[:cut], True
                if r.on_text is not None:
                    r.on_text(r.text)
            if done:
                self._finish(r)
            else:
                keep.append(i)
        return keep

    def _finish(self, r: GenRequest) -> None:
        if not (r.stop or r.on_text is not None):
            r.text = self.tok.decode(r.tokens, skip_special_tokens=True)
        self.counters["finished"] += 1
        if not r.future.done():
            r.future.set_result(r.text.strip())


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """[b, H, L, D] -> [b, H, n + L, D] with zeros in front (masked out by the attention mask)."""
    if n == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], 2)
