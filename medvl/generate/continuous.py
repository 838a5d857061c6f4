"""Continuous (in-flight) batching for composed VLMs: requests join a running decode between
steps and leave the moment they finish.

One worker thread owns the model. Each turn of its loop is **one forward pass** over a packed
batch: the next token of every row in flight and the whole prompt of every newcomer admitted
this turn (up to ``max_batch`` rows and ``step_tokens`` new prompt tokens), laid end to end in
one sequence ``[1, N]``. The KV cache is one packed sequence ``[1, H, K, D]`` per layer whose
columns each carry an owner (a row's slot, or -1 for the shared template prefix) and an index
within that row's sequence; the attention mask lets a token see its own row's earlier columns
and, if its prompt starts with it, the shared prefix — nothing of other rows. So a newcomer's
prefill and the running rows' decode step share one pass over the weights, which is most of
what a step costs on a CPU (a decode step of the 30-block SmolLM2 reads 268 MB of bf16
weights): the flattened ragged batches of vLLM's V1 engine and SGLang instead of padded
rectangles (Yu et al. 2022, "Orca", for iteration-level scheduling; Agrawal et al. 2024,
"Sarathi-Serve", for prefills riding along decode steps), with a dense cache instead of pages.
Rows of different lengths cost only their own tokens, give or take two roundings that keep the
shapes the CPU kernels meet few (their compiled-kernel caches grow with every new shape): a step's
token count is padded to a multiple of ``query_block`` (8) with tokens nobody sees and whose columns
are cut off again, and attention is shown the cache rounded up to 64 columns, the rest masked
(:mod:`medvl.generate.packed_cache`).

A row leaves at its end-of-turn token, its own ``max_new_tokens``, a stop string, or when its
client goes away (cancel); its cache columns are dropped in the same turn. Vision tokens come
from a content-addressed LRU (the tower runs once per distinct image).

Correctness: each row keeps its own position ids (counting its real tokens, or the model's
modality-gap positions) and sees only its own columns, so a request decodes as it would alone
— the tests compare greedy answers under load with answers served one at a time.

Prompt KV reuse (:mod:`medvl.generate.prompt_cache`): every chat prompt starts with the same
template tokens (SmolLM2's default system turn and ``<|im_start|>user``: 24 of a VQA-RAD prompt's
52), and the image's 16 tokens follow them. Given ``prefix_ids``, the prefix's KV is computed once
and kept as the first columns of the packed cache, shared by every row that starts with it; each
image span's KV is kept by the image's content hash and copied in as the row's own first columns,
so a prefill runs only what is new — the question, and the image's tokens the first time it is
seen: the fixed-prefix case of vLLM's automatic prefix caching and SGLang's RadixAttention (Zheng
et al. 2024). Models with their own position ids (the modality gap) and requests that do not
start with the prefix (a client's own system turn) run their whole prompt.

The model is reached through a small adapter (:mod:`medvl.generate.decode_models`): composed
models and native Qwen2-VL-family and LLaVA models decode in the same packed steps. Qwen2-VL's
M-RoPE positions are per token here (the model's ``get_rope_index`` on each prompt; a generated
token's three components equal), so nothing per request lives outside the packed cache. Other
model types are refused at start-up with an error naming the supported ones.

One request never fails the others: a prompt whose image slots do not match its images, and an
image the model cannot encode, fail their own request before it joins a step (:meth:`_fits`,
:meth:`_encode`); a generated image-placeholder token is embedded as text.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from medvl.errors import MedvlUserError
from medvl.generate.decode_models import decoding_for
from medvl.generate.packed_cache import PackedKVCache
from medvl.generate.prompt_cache import PromptKV, TensorLRU
from medvl.models.utf8 import Utf8Guard, finish_text


class QueueFull(Exception):
    pass


TRIM_EVERY = 256
"""decode steps between two hand-backs of freed heap memory to the OS (glibc only)"""


def _malloc_trim():
    """glibc's ``malloc_trim`` (returns freed heap memory to the OS), or None elsewhere."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib.malloc_trim
    except (OSError, AttributeError):
        return None


def _rss_mb() -> float | None:
    """This process's resident set in MB (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") / 2**20)
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class GenRequest:
    """One prompt to decode. ``images``: per image, what the model's adapter encodes on a cache
    miss (a composed model: the Media; a native one: its processor's pixels —
    :mod:`medvl.generate.decode_models`); ``image_keys``: their content hashes (the vision cache's keys)."""
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
    slot: int = -1
    """the owner id of its cache columns"""
    uses_prefix: bool = False
    seq: int = 0
    """index within its own sequence of the token it feeds next"""
    pos: int = 0
    """position id of the last token it fed"""
    last: int = 0
    """the token it feeds next"""
    utf8: int = 0
    """continuation bytes its text still owes (medvl.models.utf8)"""

    def cancel(self) -> None:
        """The client went away: the row leaves the batch at the next step."""
        self.cancelled.set()
        self.future.cancel()


def content_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ContinuousDecoder:
    def __init__(self, model, tokenizer, image_fn: Callable, *, max_batch: int = 32, max_queue: int = 64,
                 cache_bytes: int = 256 * 2**20, tower_precision: str = "fp32", step_tokens: int = 2048,
                 prefix_ids: list[int] | None = None, span_cache_bytes: int = 256 * 2**20, query_block: int = 8):
        self.tok = tokenizer
        self.dm = decoding_for(model, image_fn, tower_precision)  # the model's parts the packed steps use
        image_id = self.dm.image_token_id
        usable = prefix_ids and image_id not in prefix_ids and self.dm.shares_prefix
        self.prompt_kv = PromptKV(self.dm, list(prefix_ids) if usable else [], span_cache_bytes)
        self.prefix_ids = self.prompt_kv.prefix_ids
        self.max_batch = max(1, max_batch)
        self.step_tokens = max(1, step_tokens)
        """newcomers' prompt tokens admitted per forward, counted whole (cached prefix / span included; a
        newcomer longer than this joins with no other newcomer)"""
        self.query_block = max(1, query_block)
        """a step's token count is padded to a multiple of this (see ``_step``)"""
        self.q: queue.Queue = queue.Queue(maxsize=max_queue)
        self.vision_cache = TensorLRU(cache_bytes)
        vocab = tokenizer.get_vocab()
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in vocab else tokenizer.eos_token_id
        self.pad_id = next(t for t in (tokenizer.pad_token_id, self.eos, 0, 1) if t is not None and t != image_id)
        self.utf8 = Utf8Guard.for_tokenizer(tokenizer)
        """only tokens that keep each answer valid UTF-8 (no "\ufffd"; medvl.models.utf8)"""
        """what a padding token feeds (any token but the image placeholder: the model would put vision there)"""
        self.rows: list[GenRequest] = []
        self._trimmed_at = 0
        self.rss_after_trim_mb: float | None = None  # RSS right after the last heap trim (stats)
        self._reset()
        self.counters = {"admitted": 0, "finished": 0, "cancelled": 0, "steps": 0, "row_steps": 0, "prefills": 0,
                         "prompt_tokens_run": 0, "failed": 0, "prefix_hits": 0, "refused": 0}
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
        return {"running": len(self.rows), "queue": self.q.qsize(), "cache_columns": len(self.col_owner), **c,
                "mean_rows_per_step": c["row_steps"] / c["steps"] if c["steps"] else 0.0,
                "rss_after_trim_mb": self.rss_after_trim_mb,
                "vision_cache": self.vision_cache.stats(), "image_span_cache": self.prompt_kv.spans.stats()}

    # -- the worker -----------------------------------------------------------------------------
    def _reset(self) -> None:
        """No rows: an empty cache (the shared prefix is put back by the next step)."""
        self.cache: PackedKVCache | None = None  # [1, H, K, D] per layer (block-padded buffers)
        self.col_owner = torch.zeros(0, dtype=torch.long)  # [K] the row slot of each column, -1 = shared prefix
        self.col_seq = torch.zeros(0, dtype=torch.long)  # [K] its index within that row's sequence
        self._next_slot = 0

    def _loop(self) -> None:
        trim = _malloc_trim()
        while not self._stop.is_set():
            if trim is not None and self.counters["steps"] >= self._trimmed_at + TRIM_EVERY:
                # every step allocates tensors of new shapes (packed lengths vary); glibc keeps the freed
                # memory in its arenas, so a server's RSS crept up over thousands of requests while what the
                # decoder holds stayed flat (measured: +370 MB over 10,000 requests; malloc_trim gave back
                # 266 MB in process). A trim takes 6-13 ms with the 30-block model loaded: every 256 steps
                # (~40 s under load) that is under 0.1 % of the decoder's time.
                trim(0)
                self._trimmed_at = self.counters["steps"]
                self.rss_after_trim_mb = _rss_mb()  # the process's floor: samples between trims swing
            new: list[GenRequest] = []
            if not self.rows:
                try:
                    new.append(self.q.get(timeout=0.1))
                except queue.Empty:
                    continue
            # newcomers join at every step: their prompts ride along the running rows' decode step in the
            # same forward, up to ``step_tokens`` new tokens so a crowd of long prompts does not stall the
            # rows in flight for long (Sarathi-Serve's token budget, without splitting a prompt)
            budget = self.step_tokens - sum(len(r.ids) for r in new)
            while len(self.rows) + len(new) < self.max_batch and budget > 0:
                try:
                    r = self.q.get_nowait()
                except queue.Empty:
                    break
                new.append(r)
                budget -= len(r.ids)
            new = [r for r in new if not r.cancelled.is_set() and r.future.set_running_or_notify_cancel()
                   and self._fits(r)]
            if not (new or self.rows):
                continue
            try:
                self._step(new)
            except Exception as e:  # noqa: BLE001 - handed to every request in flight, the loop goes on
                for r in new + self.rows:
                    if not r.future.done():
                        r.future.set_exception(e)
                self.counters["failed"] += len(self.rows)
                self.rows = []
                self._reset()

    def _fits(self, r: GenRequest) -> bool:
        """A prompt whose image slots do not match its images fails alone, before it joins a step (in a
        step its error would fail every row there)."""
        want = self.dm.image_tokens(r.images)
        got = r.ids.count(self.dm.image_token_id)
        if want is None or got == want:
            return True
        self.counters["refused"] += 1
        r.future.set_exception(MedvlUserError(f"the prompt has {got} image-token positions but its "
                                              f"{len(r.images)} image(s) give {want}"))
        return False

    @torch.no_grad()
    def _encode(self, reqs: list[GenRequest]) -> list[GenRequest]:
        """Vision features for the newcomers' images, before they join a step: from the request (cached
        when it was parsed), the vision cache, or the tower (one batch for all new images). A request
        whose image span is cached needs none. An image the tower or its preprocessing cannot take (a
        2D upload to a 3D model, say) fails its own requests only — found by encoding the batch's
        images one at a time after a batch fails; inside a step it would fail every row. Returns the
        requests that go on, each with ``vision`` filled."""
        kv = self.prompt_kv
        need: dict[str, Any] = {}
        for r in reqs:
            r.vision = list(r.vision) + [None] * (len(r.image_keys) - len(r.vision))
            if kv.starts_with_prefix(r.ids) and kv.span_key(r.ids, r.image_keys) in kv.spans:
                continue  # the image's KV is cached: its tokens are not run
            for i, (item, key) in enumerate(zip(r.images, r.image_keys)):
                if r.vision[i] is None and key not in need:
                    r.vision[i] = self.vision_cache.get(key)
                    if r.vision[i] is None:
                        need[key] = item
        feats: dict[str, Any] = {}
        if need:
            try:
                feats = dict(zip(need, self.dm.encode(list(need.values()))))
            except Exception:  # noqa: BLE001 - which image? one at a time
                for key, item in need.items():
                    try:
                        feats[key] = self.dm.encode([item])[0]
                    except Exception as e:  # noqa: BLE001 - handed to its requests
                        feats[key] = e
            for key, v in feats.items():
                if isinstance(v, torch.Tensor):
                    self.vision_cache.put(key, v)
        ok = []
        for r in reqs:
            err = next((feats[k] for k in r.image_keys if isinstance(feats.get(k), Exception)), None)
            if err is not None:
                self.counters["refused"] += 1
                r.future.set_exception(err if isinstance(err, MedvlUserError) else
                                       MedvlUserError(f"the model cannot encode this image: {err}"))
                continue
            r.vision = [feats.get(k) if v is None else v for v, k in zip(r.vision, r.image_keys)]
            ok.append(r)
        return ok

    @staticmethod
    def _vision(reqs: list[GenRequest]) -> list[torch.Tensor]:
        """The vision features of every image of these requests, in order (filled by :meth:`_encode`):
        per image [N_i, Dv]."""
        return [v for r in reqs for v in r.vision]

    def _append(self, parts: list[tuple[list[tuple[torch.Tensor, torch.Tensor]], int, range]]) -> None:
        """Put columns into the cache: each part is (per layer (keys, values) [1, H, n, D], the owner,
        the columns' indices within the owner's sequence)."""
        self._cache()
        for kv, _, _ in parts:
            self.cache.write(kv)
        self.col_owner = torch.cat([self.col_owner] + [torch.full((len(sq),), o, dtype=torch.long) for _, o, sq in parts])
        self.col_seq = torch.cat([self.col_seq] + [torch.tensor(list(sq), dtype=torch.long) for _, _, sq in parts])

    def _cache(self) -> PackedKVCache:
        if self.cache is None:
            self.cache = PackedKVCache(self.dm.num_layers)
        return self.cache

    def _admit(self, r: GenRequest, ids: list, pos: list, owner: list, seq: list, pre: list,
               cached: list) -> tuple[str | None, bool]:
        """Lay a newcomer's prompt into the packed step: its cached image span goes to ``cached`` (the
        columns to add to the cache), the rest into the step's token lists. Returns (the span key to
        store after the step, whether it needs vision tokens)."""
        kv = self.prompt_kv
        P = len(self.prefix_ids)
        r.slot, self._next_slot = self._next_slot, self._next_slot + 1
        r.uses_prefix = kv.starts_with_prefix(r.ids)
        key = kv.span_key(r.ids, r.image_keys) if r.uses_prefix else None
        span = kv.spans.get(key) if key else None
        skip = P if r.uses_prefix else 0  # prompt tokens already in the cache
        if span is not None:  # [layers, 2, H, S, D] -> the row's own first columns
            cached.append(([(x[0][None], x[1][None]) for x in span], r.slot, range(P, P + kv.span_len)))
            skip += kv.span_len
        full = self.dm.prompt_positions(r.ids, r.images)  # [T] the prompt's positions (ints or (t, h, w))
        run = r.ids[skip:]
        ids += run
        pos += full[skip:]
        owner += [r.slot] * len(run)
        seq += range(skip, len(r.ids))
        pre += [r.uses_prefix] * len(run)
        r.pos, r.seq = self.dm.last_position(full[-1]), len(r.ids)
        self.counters["prefix_hits"] += r.uses_prefix
        self.counters["prompt_tokens_run"] += len(run)
        return (key if span is None else None), span is None

    @torch.no_grad()
    def _step(self, new: list[GenRequest]) -> None:
        """One forward: the running rows' next tokens and the newcomers' prompts, packed."""
        new = self._encode(new)  # first: a newcomer whose image cannot be encoded fails alone
        if not (new or self.rows):
            return
        dm, kv = self.dm, self.prompt_kv
        cached = []  # columns to put into the cache before the forward: the prefix, cached image spans
        if self.prefix_ids and self.cache is None:
            cached.append((kv.prefix_kv(), -1, range(len(self.prefix_ids))))
        ids: list[int] = []
        pos: list[int] = []
        owner: list[int] = []
        seq: list[int] = []
        pre: list[bool] = []
        ends: list[int] = []  # index of each row's last token in the step: its logits
        n_old = len(self.rows)  # the running rows' next tokens come first in the step
        for r in self.rows:
            ids.append(r.last)
            pos.append(dm.step_position(r.pos + 1))
            owner.append(r.slot)
            seq.append(r.seq)
            pre.append(r.uses_prefix)
            ends.append(len(ids) - 1)
        stores, need = [], []
        for r in new:
            start = len(ids)
            key, needs_vision = self._admit(r, ids, pos, owner, seq, pre, cached)
            if key is not None:
                stores.append((key, start))  # its image span is its first S tokens in this step
            if needs_vision:
                need.append(r)
            ends.append(len(ids) - 1)
        if cached:
            self._append(cached)
        K, n_real = len(self.col_owner), len(ids)
        # pad the step to a multiple of ``query_block`` tokens: the linear layers' and attention's compiled
        # kernels are cached per token count, and a packed step meets a new count nearly every time. Each
        # padding token is its own owner (-2, -3, ...), sees only its own column, and its column is cut off
        # the end of the cache after the forward; no row sees it.
        pad = -n_real % self.query_block
        ids += [self.pad_id] * pad
        pos += [dm.step_position(0)] * pad
        owner += range(-2, -2 - pad, -1)
        seq += [0] * pad
        pre += [False] * pad
        q_own, q_seq, q_pre = torch.tensor(owner), torch.tensor(seq), torch.tensor(pre)  # [N]
        co, cs = torch.cat([self.col_owner, q_own]), torch.cat([self.col_seq, q_seq])  # [K + N]
        see = ((co[None] == q_own[:, None]) & (cs[None] <= q_seq[:, None])) | ((co[None] == -1) & q_pre[:, None])  # [N, K + N]
        cache = self._cache()
        L = cache.padded(K + len(ids))  # attention sees the cache rounded up to a block; the rest is masked
        see = torch.nn.functional.pad(see, (0, L - see.shape[1]))  # [N, L]
        dev = dm.device
        # a row's generated token can be the image placeholder (an untrained or random model emits any id):
        # it is text there, as in transformers' generate, not a slot for image features — embedded as
        # the token it is, so the step does not fail for every row in it
        gen_img = [i for i in range(n_old) if ids[i] == dm.image_token_id]
        ids_t = torch.tensor([ids], device=dev)  # [1, N]
        if gen_img:
            ids_t[0, gen_img] = self.pad_id
        emb = dm.embed(ids_t, self._vision(need))  # [1, N, D]
        if gen_img:
            emb[0, gen_img] = dm.token_embedding(torch.tensor([dm.image_token_id], device=dev)).to(emb.dtype)
        logits = dm.forward(emb, see[None, None].to(dev), pos, cache, ends)  # [rows, V]
        if pad:
            cache.truncate(pad)
        self.col_owner, self.col_seq = co[:K + n_real], cs[:K + n_real]
        for key, start in stores:
            kv.store(key, self.cache, 0, K + start)
        for r in new:
            if r.temperature > 0:
                r.gen = torch.Generator(device=dev)
                r.gen.manual_seed(r.seed if r.seed is not None else int(torch.randint(2**62, (1,))))
        rows = self.rows + new
        nxt = self._choose(logits.float(), rows)  # [rows]
        c = self.counters
        c["steps"] += 1
        c["row_steps"] += len(rows)
        c["admitted"] += len(new)
        c["prefills"] += bool(new)
        keep = self._accept(rows, nxt)
        for i, t in zip(keep, nxt[keep].tolist()):
            r = rows[i]
            r.last = t
            if i < n_old:
                r.seq += 1
                r.pos += 1
        self.rows = [rows[i] for i in keep]
        if not self.rows:
            self._reset()
        elif len(keep) < len(rows):  # the rows that left take their columns with them, now
            live = torch.tensor([r.slot for r in self.rows])
            idx = ((self.col_owner == -1) | torch.isin(self.col_owner, live)).nonzero()[:, 0].to(dev)
            self.cache.keep(idx)
            self.col_owner, self.col_seq = self.col_owner[idx.cpu()], self.col_seq[idx.cpu()]

    def _choose(self, logits: torch.Tensor, reqs: list[GenRequest]) -> torch.Tensor:
        """Each row's next token: argmax, or a draw from its own temperature / top-p nucleus, among
        the tokens that keep its text valid UTF-8."""
        state = torch.tensor([r.utf8 for r in reqs])  # [b]
        logits = self.utf8.mask(logits, state)
        nxt = logits.argmax(-1)  # [b]
        for i, r in enumerate(reqs):
            if r.temperature > 0:
                probs = (logits[i] / r.temperature).softmax(-1)
                if r.top_p < 1.0:
                    sp, si = probs.sort(descending=True)
                    sp = sp.masked_fill(sp.cumsum(-1) - sp > r.top_p, 0.0)
                    probs = torch.zeros_like(probs).scatter(-1, si, sp)
                nxt[i] = torch.multinomial(probs, 1, generator=r.gen)[0]
        for r, u in zip(reqs, self.utf8.advance(state, nxt).tolist()):
            r.utf8 = u
        return nxt

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
                r.text = self.tok.decode(r.tokens, skip_special_tokens=True).rstrip("\ufffd")  # a character still open
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
            r.text = finish_text(self.tok.decode(r.tokens, skip_special_tokens=True))
        self.counters["finished"] += 1
        if not r.future.done():
            r.future.set_result(r.text.strip())
