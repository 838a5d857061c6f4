"""Decoding that can only produce valid UTF-8: no "\\ufffd" in an answer.

Byte-level BPE vocabularies (GPT-2, SmolLM2, Qwen2) and SentencePiece byte fallback (Llama)
hold tokens that are *parts* of a character: a lone continuation byte (SmolLM2's id 123 is byte
0xAE) or the first bytes of a multi-byte character. A model that puts mass on one of them where
no character is open emits bytes that decode to U+FFFD: the shipped VQA-RAD model answered
"\\ufffdnucleus pulposus" on a VQA-Med image, and one answer looped "\\ufffd,«,«,..." to the
token limit. Banning those tokens outright would make every character outside the merged
vocabulary unwritable (SLAKE's Chinese answers, "µ" in some vocabularies).

Instead each decoding row carries a UTF-8 state, the number of continuation bytes its text
still owes (0-3), and a token is allowed only if its bytes keep the text valid from that
state (a table ``next[state, token]``, -1 where invalid, built once per tokenizer: the
grammar-constrained decoding of llama.cpp's GBNF and Outlines, here for the one grammar every
answer must obey). Tokens without bytes (special tokens, end of turn) are allowed only where no
character is open, so an answer cannot end mid-character either; only the token limit can cut
one, and :func:`finish_text` drops such a tail.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

import torch

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character alphabet for the 256 bytes, inverted (char -> byte)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _decoder_kind(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return "text"
    spec = json.loads(backend.to_str()).get("decoder") or {}
    kinds = [spec.get("type")] + [d.get("type") for d in spec.get("decoders") or []]
    return "bytelevel" if "ByteLevel" in kinds else "bytefallback" if "ByteFallback" in kinds else "text"


def token_bytes(tok, vocab_size: int) -> list[bytes | None]:
    """Each id's bytes; ``None`` for ids that carry no text (special tokens, ids past the vocabulary)."""
    kind = _decoder_kind(tok)
    special = set(getattr(tok, "all_special_ids", []) or [])
    special |= {i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    table = _byte_decoder()
    out: list[bytes | None] = []
    pieces = tok.convert_ids_to_tokens(list(range(min(vocab_size, len(tok)))))
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(None)
        elif kind == "bytelevel" and all(c in table for c in piece):
            out.append(bytes(table[c] for c in piece))
        elif kind == "bytefallback" and (m := _BYTE_TOKEN.match(piece)):
            out.append(bytes([int(m.group(1), 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out + [None] * (vocab_size - len(out))


def _advance(state: int, data: bytes) -> int:
    for x in data:
        if state:
            if not 0x80 <= x < 0xC0:
                return -1
            state -= 1
        elif x < 0x80:
            continue
        elif 0xC2 <= x < 0xE0:
            state = 1
        elif 0xE0 <= x < 0xF0:
            state = 2
        elif 0xF0 <= x < 0xF5:
            state = 3
        else:  # a continuation byte with no character open, or a byte UTF-8 never uses
            return -1
    return state


class Utf8Guard:
    """Per-row UTF-8 state for decoding; ``next`` is [4, V] (int8: the state after a token, -1 = not allowed)."""

    def __init__(self, next_state: torch.Tensor):
        self.next = next_state  # [4, V]
        self.allowed = next_state >= 0  # [4, V]

    @classmethod
    def for_tokenizer(cls, tok, vocab_size: int | None = None) -> Utf8Guard:
        vocab_size = vocab_size or len(tok)
        cached = getattr(tok, "_medvl_utf8_guard", None)  # built once per tokenizer object (~0.3 s for 50k ids)
        if cached is not None and cached.next.shape[1] == vocab_size:
            return cached
        rows = [[(s if s == 0 else -1) if b is None else _advance(s, b) for b in token_bytes(tok, vocab_size)]
                for s in range(4)]
        guard = cls(torch.tensor(rows, dtype=torch.int8))
        try:
            tok._medvl_utf8_guard = guard
        except AttributeError:  # a tokenizer that takes no new attributes: rebuilt per call
            pass
        return guard

    def mask(self, logits: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """``logits`` [b, V] with the tokens not allowed from each row's ``state`` [b] set to -inf."""
        V, W = logits.shape[-1], self.allowed.shape[1]
        allowed = self.allowed[state.cpu().long(), :V]  # [b, min(V, W)]
        if V > W:  # ids past the tokenizer (padded embedding rows) carry no text: allowed where no character is open
            allowed = torch.cat([allowed, (state.cpu() == 0)[:, None].expand(-1, V - W)], dim=1)
        allowed = allowed.to(logits.device)  # [b, V]
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The states [b] after appending ``tokens`` [b] (ids past the table count as text-free)."""
        t = tokens.cpu().long().clamp(max=self.next.shape[1] - 1)
        return self.next[state.cpu().long(), t].clamp(min=0).long()

    def state_of(self, tokens: list[int]) -> int:
        s = 0
        for t in tokens:
            s = max(int(self.next[s, min(t, self.next.shape[1] - 1)]), 0)
        return s

    def logits_processor(self, prompt_len: int = 0):
        """The same rule as a ``transformers`` logits processor (for ``generate``: beams, stop
        strings); each row's state is recomputed from its new tokens (after ``prompt_len``)."""
        from transformers import LogitsProcessor

        guard = self

        class _Processor(LogitsProcessor):
            def __call__(self, input_ids, scores):
                state = torch.tensor([guard.state_of(row[prompt_len:]) for row in input_ids.tolist()])
                return guard.mask(scores, state)
        return _Processor()


def finish_text(text: str) -> str:
    """A decoded answer without the replacement character a token limit leaves when it cuts a character."""
    return text.rstrip("\ufffd").strip()
