"""Decoding never writes a partial UTF-8 character (medvl.models.utf8)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from medvl.models.utf8 import Utf8Guard, finish_text, token_bytes
from medvl.models.vlm import greedy_decode

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "medvl" / "pretrained" / "medvl-vqarad-smollm2-30" / "tokenizer"
SHARED = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TOKENIZER)


def test_byte_tokens_follow_utf8(tok):
    g = Utf8Guard.for_tokenizer(tok)
    assert token_bytes(tok, len(tok))[123] == b"\xae"  # SmolLM2's id 123: a lone continuation byte
    assert int(g.next[0, 123]) == -1  # not where no character is open ...
    lead = tok.convert_tokens_to_ids("Â")  # byte 0xC2 opens a two-byte character
    assert int(g.next[0, lead]) == 1 and int(g.next[1, 123]) == 0  # ... but it closes one
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert int(g.next[0, eos]) == 0 and int(g.next[1, eos]) == -1  # no end of turn mid-character
    text = "héllo 中文 µ ’ – naïve"
    ids = tok.encode(text)
    state = 0
    for t in ids:  # every real text's tokens are allowed, in order
        state = int(g.next[state, t])
        assert state >= 0
    assert state == 0 and tok.decode(ids) == text


class _FixedLM(torch.nn.Module):
    """Logits that rank a lone continuation byte first, then 'x', then end of turn from step 3 on."""

    def __init__(self, vocab: int, byte_id: int, x_id: int, eos: int):
        super().__init__()
        self.v, self.byte_id, self.x_id, self.eos, self.calls = vocab, byte_id, x_id, eos, 0

    def forward(self, inputs_embeds=None, input_ids=None, past_key_values=None, **_):
        b = (inputs_embeds if inputs_embeds is not None else input_ids).shape[0]
        logits = torch.zeros(b, 1, self.v)
        logits[:, 0, self.byte_id], logits[:, 0, self.x_id] = 5.0, 4.0
        if self.calls >= 3:
            logits[:, 0, self.eos] = 10.0
        self.calls += 1
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


def test_greedy_decode_skips_partial_characters(tok):
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    x = tok.convert_tokens_to_ids("x")
    V = len(tok) + 7  # embedding tables are often padded past the tokenizer
    args = (torch.zeros(2, 4, 8), None, 8, eos, 0)
    raw = greedy_decode(_FixedLM(V, 123, x, eos), *args)
    assert "\ufffd" in tok.decode(raw[0], skip_special_tokens=True)  # what the shipped model did
    safe = greedy_decode(_FixedLM(V, 123, x, eos), *args, utf8_guard=Utf8Guard.for_tokenizer(tok))
    assert tok.decode(safe[0], skip_special_tokens=True) == "xxx"


def test_hf_generate_processor_agrees(tok):
    g = Utf8Guard.for_tokenizer(tok)
    proc = g.logits_processor(prompt_len=2)
    scores = torch.zeros(2, len(tok))
    ids = torch.tensor([[5, 6, tok.convert_tokens_to_ids("Â")], [5, 6, tok.convert_tokens_to_ids("x")]])
    out = proc(ids, scores)
    assert out[0, 123] == 0 and out[1, 123] == float("-inf")  # open character: the byte closes it
    assert out[0, tok.convert_tokens_to_ids("x")] == float("-inf")


def test_finish_text_drops_a_cut_character():
    assert finish_text(" answer \ufffd") == "answer"


@pytest.mark.skipif(not (SHARED / "vqa_med_2019_train" / "images" / "synpic55155.jpg").is_file(),
                    reason="../shared/data/vqa_med_2019_train not present")
def test_default_vlm_answer_has_no_replacement_character():
    """The issue's reproduction: this image gave "\\ufffdnucleus pulposus" (token 123 first)."""
    import medvl
    pipe = medvl.load("medvl-vqarad-smollm2-30")
    got = pipe.answer(SHARED / "vqa_med_2019_train" / "images" / "synpic55155.jpg", "what abnormality is seen in the image?")
    assert got and "\ufffd" not in got
