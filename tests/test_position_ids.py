"""Modality-gap position ids (ClinKD's "Med-CLIP guided RoPE") for composed and Qwen2-VL models."""

import pytest
import torch

from medvl.models.position_ids import (
    enable_qwen2vl_gap,
    gap_position_ids,
    qwen2vl_gap_rope_index,
)

IMG = 99


def test_1d_gap_positions_with_left_padding_and_two_images():
    ids = torch.tensor([[0, 0, 5, 6, 7, IMG, IMG, 8, IMG, IMG, 9],
                        [5, IMG, IMG, 6, 7, 8, 9, 10, 11, 12, 13]])
    mask = torch.tensor([[0, 0] + [1] * 9, [1] * 11])
    pos = gap_position_ids(ids, IMG, tokens_per_image=2, gap=1, attention_mask=mask)
    assert pos[0].tolist() == [0, 0, 0, 1, 2, 4, 5, 7, 9, 10, 12]
    assert pos[1].tolist() == [0, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12]
    plain = gap_position_ids(ids, IMG, 2, 0, mask)
    assert plain[1].tolist() == list(range(11))
    # two images back to back are two blocks, each with its own gaps
    back_to_back = gap_position_ids(torch.tensor([[1, IMG, IMG, IMG, IMG, 2]]), IMG, 2, 2)
    assert back_to_back[0].tolist() == [0, 3, 4, 9, 10, 13]  # gap after the first + gap before the second


def _qwen_inner():
    from tests.test_native_vlm import tiny_qwen2vl
    return tiny_qwen2vl()


def test_qwen2vl_gap_example_from_the_issue():
    pytest.importorskip("torchvision")
    vlm = _qwen_inner()
    inner = vlm.model.model
    # text 3, an image whose merged grid is 1x2x2 (grid_thw 1x4x4 with spatial merge 2), text 3
    types = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0, 0, 0]])
    ids = torch.zeros_like(types)
    thw = torch.tensor([[1, 4, 4]])
    up, up_delta = inner.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=thw)
    assert up[:, 0].T.tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3], [3, 3, 4], [3, 4, 3], [3, 4, 4],
                                   [5, 5, 5], [6, 6, 6], [7, 7, 7]]
    pos, delta = qwen2vl_gap_rope_index(inner, ids, types, thw, gap=1)
    assert pos[:, 0].T.tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2], [4, 4, 4], [4, 4, 5], [4, 5, 4], [4, 5, 5],
                                    [7, 7, 7], [8, 8, 8], [9, 9, 9]]
    assert delta.tolist() == [[0]] and up_delta.tolist() == [[-2]]  # next position 10 = 10 tokens + delta
    assert torch.equal(qwen2vl_gap_rope_index(inner, ids, types, thw, gap=0)[0], up)  # gap 0 == upstream
    enable_qwen2vl_gap(vlm.model, 1)
    assert torch.equal(inner.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=thw)[0], pos)
    enable_qwen2vl_gap(vlm.model, 0)
    assert torch.equal(inner.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=thw)[0], up)
    assert type(inner).get_rope_index is not None  # the class itself was never touched


def test_qwen2vl_cached_generation_with_gap_equals_uncached():
    pytest.importorskip("torchvision")
    from medvl.data.bundled import load_bundled
    vlm = _qwen_inner()
    enable_qwen2vl_gap(vlm.model, 3)
    samples = load_bundled("vqa-rad", "test")[:2]
    batch = vlm.collate([vlm.encode(s) for s in samples], side="left")
    batch.pop("labels", None)
    with torch.no_grad():
        a = vlm.model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=True)
        b = vlm.model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(a, b)
    # and the gap changes the computation (it is not silently ignored)
    enable_qwen2vl_gap(vlm.model, 0)
    with torch.no_grad():
        l0 = vlm.model(**batch).logits
    enable_qwen2vl_gap(vlm.model, 3)
    with torch.no_grad():
        l3 = vlm.model(**batch).logits
    assert not torch.allclose(l0, l3)


def test_composed_vlm_cached_generation_with_gap_equals_full_recompute():
    from medvl.data.bundled import load_bundled
    from medvl.models.tokenizers import build_bpe_tokenizer
    from tests.test_vlm import make
    texts = [t.text for s in load_bundled("vqa-rad", "test") for t in s.conversation]
    tok = build_bpe_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    m = make(tok)
    m.config.position_gap = 4
    n = m.tokens_per_image
    ids = torch.tensor([[0, 0, 1] + [m.config.image_token_id] * n + [20, 21],
                        [1, 7] + [m.config.image_token_id] * n + [20, 21, 22]])
    mask = torch.tensor([[0, 0] + [1] * (n + 3), [1] * (n + 5)])
    px = torch.randn(2, 3, 32, 32)
    cached = m.generate(ids, mask, px, max_new_tokens=5, pad_token_id=0)
    # reference: no cache, recompute every step with the gap positions of the whole sequence
    seq, msk = ids.clone(), mask.clone()
    emb = m.embed(ids, px)
    for _ in range(5):
        pos = gap_position_ids(seq, m.config.image_token_id, n, 4, msk)
        logits = m.llm(inputs_embeds=emb, attention_mask=msk, position_ids=pos, use_cache=False).logits
        nxt = logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
        msk = torch.cat([msk, torch.ones(2, 1, dtype=msk.dtype)], 1)
        emb = torch.cat([emb, m.llm.get_input_embeddings()(nxt[:, None])], 1)
    assert torch.equal(cached, seq[:, ids.shape[1]:])
    with torch.no_grad():
        gapped = m(ids, mask, px).logits
        m.config.position_gap = 0
        plain = m(ids, mask, px).logits
    assert not torch.allclose(gapped[:, -1], plain[:, -1])


def test_native_gap_is_saved_and_reapplied(tmp_path):
    pytest.importorskip("torchvision")
    from medvl.errors import MedvlUserError
    from medvl.models.native import NativeVLM
    vlm = _qwen_inner()
    vlm.set_position_gap(2)
    vlm.save(tmp_path / "q")
    back = NativeVLM.from_pretrained(tmp_path / "q")
    assert "get_rope_index" in back.model.model.__dict__ and back.model.config.medvl_position_gap == 2
    from tests.test_native_vlm import tiny_llava
    with pytest.raises(MedvlUserError, match="only Qwen2-VL"):
        tiny_llava().set_position_gap(1)


def test_continuous_decoder_keeps_each_rows_gap_positions():
    """Packed continuous batching keeps each row's modality-gap positions: two prompts of different
    lengths decoded together get, at every step, the logits of a full recompute of each alone with
    its gap positions (and not those without the gap)."""
    from medvl.data.bundled import load_bundled
    from medvl.generate.continuous import ContinuousDecoder, GenRequest
    from medvl.models.tokenizers import build_bpe_tokenizer
    from tests.test_vlm import make
    tok = build_bpe_tokenizer([t.text for s in load_bundled("vqa-rad", "test") for t in s.conversation], vocab_size=300)
    torch.manual_seed(0)
    m = make(tok).eval()
    m.config.position_gap = 4
    n, img = m.tokens_per_image, m.config.image_token_id
    prompts = [[1] + [img] * n + [20, 21], [1, 7, 9] + [img] * n + [20, 21, 22, 23]]
    px = torch.randn(2, 3, 32, 32)
    dec = ContinuousDecoder(m, tok, lambda t: t)
    dec.eos = -1  # decode all 4 tokens
    seen: list[torch.Tensor] = []
    choose = dec._choose
    dec._choose = lambda logits, rows: seen.append(logits.clone()) or choose(logits, rows)
    dec.close()  # drive the steps by hand: both requests join the first one
    reqs = [GenRequest(p, [px[i]], [f"img{i}"], max_new_tokens=4) for i, p in enumerate(prompts)]
    dec._step(reqs)
    while dec.rows:
        dec._step([])
    assert len(seen) == 4 and all(x.shape[0] == 2 for x in seen)

    def recompute(i, gap):  # the last position's logits after each generated token, no cache
        m.config.position_gap = gap
        seq, out = list(prompts[i]), []
        with torch.no_grad():
            for t in reqs[i].tokens:
                ids = torch.tensor([seq])
                out.append(m(ids, torch.ones_like(ids), px[i:i + 1]).logits[0, -1])
                seq.append(t)
        return torch.stack(out)  # [4, V]
    for i in range(2):
        got = torch.stack([x[i] for x in seen])
        assert torch.allclose(got, recompute(i, 4), atol=1e-4)
        assert not torch.allclose(got, recompute(i, 0), atol=1e-4)
