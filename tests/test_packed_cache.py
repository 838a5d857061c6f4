"""The continuous decoder's block-padded KV cache (medvl/generate/packed_cache.py)."""

import torch

from medvl.generate.packed_cache import PackedKVCache, PackedLayer


def cols(n, start=0, h=2, d=4):
    """[1, h, n, d] columns whose values name their index."""
    return torch.arange(start, start + n, dtype=torch.float32)[None, None, :, None].expand(1, h, n, d).clone()


def test_attention_sees_the_cache_rounded_up_to_a_block_and_the_buffer_grows_by_blocks():
    layer = PackedLayer(block=8)
    k, v = layer.update(cols(3), -cols(3))
    assert k.shape == (1, 2, 8, 4) and layer.used == 3 and layer.get_mask_sizes(5) == (8, 0)
    assert torch.equal(k[:, :, :3], cols(3)) and torch.equal(k[:, :, 3:], torch.zeros(1, 2, 5, 4))  # masked columns: 0
    cap = layer.capacity
    assert cap % 32 == 0
    for i in range(40):  # one column per step: appended in place, the buffer reallocated only when full
        k, v = layer.update(cols(1, 3 + i), -cols(1, 3 + i))
        assert k.shape[2] % 8 == 0 and k.shape[2] >= layer.used
    assert layer.used == 43 and layer.capacity > cap
    assert torch.equal(layer.keys, cols(43)) and torch.equal(layer.values, -cols(43))  # views of what is held


def test_keep_moves_the_kept_columns_to_the_front_and_a_mostly_empty_buffer_shrinks():
    layer = PackedLayer(block=8)
    layer.write(cols(200), -cols(200))
    big = layer.capacity
    idx = torch.tensor([0, 5, 6, 199])
    layer.keep(idx)
    assert layer.used == 4 and torch.equal(layer.keys, cols(200)[:, :, idx]) and torch.equal(layer.values, -layer.keys)
    assert layer.capacity < big  # freed
    layer.write(cols(2, 500), cols(2, 500))  # appending after a keep goes after the kept columns
    assert torch.equal(layer.keys[:, :, 4:, 0], torch.tensor([[[500.0, 501.0]] * 2]))
    half = torch.arange(layer.used // 2 + 1)
    cap = layer.capacity
    layer.keep(half)
    assert layer.capacity == cap  # not mostly empty: kept in place


def test_the_cache_gives_a_model_the_logits_of_a_plain_cache():
    """A tiny Llama decoding step by step through the packed cache (masking the padding columns)
    gives the logits of transformers' DynamicCache."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    m = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 11))
    packed, plain = PackedKVCache(2, block=8), DynamicCache()
    with torch.no_grad():
        for a, b in [(0, 5), (5, 6), (6, 7), (7, 11)]:  # a prompt, then one token, one, four
            n, seen = b - a, a
            L = packed.padded(b)
            causal = torch.arange(L)[None] <= torch.arange(a, b)[:, None]  # [n, L]: padding columns are > b - 1
            got = m(ids[:, a:b], attention_mask=causal[None, None], position_ids=torch.arange(a, b)[None],
                    past_key_values=packed, use_cache=True).logits
            want = m(ids[:, a:b], past_key_values=plain, use_cache=True).logits
            assert torch.allclose(got, want, atol=1e-5), (a, b)
            assert packed.get_seq_length() == b == seen + n


def test_the_decoder_shows_the_model_only_block_multiples(monkeypatch):
    """Over a run of requests of different lengths joining and leaving, every key length attention
    meets is a multiple of the block and every step's token count a multiple of ``query_block``
    (the kernel caches behind attention and the linear layers see a handful of shapes); the padding
    tokens leave no column behind."""
    from medvl.data.bundled import load_bundled
    from medvl.generate.continuous import ContinuousDecoder, GenRequest
    from medvl.models.tokenizers import build_bpe_tokenizer
    from tests.test_vlm import make
    tok = build_bpe_tokenizer([t.text for s in load_bundled("vqa-rad", "test") for t in s.conversation], vocab_size=300)
    m = make(tok)
    n, img = m.tokens_per_image, m.config.image_token_id
    lengths = []
    update = PackedLayer.update

    def spy(self, k, v, *a, **kw):
        out = update(self, k, v, *a, **kw)
        lengths.append((out[0].shape[2], self.used, k.shape[2]))
        return out
    monkeypatch.setattr(PackedLayer, "update", spy)
    dec = ContinuousDecoder(m, tok, lambda t: t)
    dec.eos = -1
    dec.close()  # drive the steps by hand: a newcomer joins at every step while the others decode
    for i in range(12):
        dec._step([GenRequest([1] + [img] * n + list(range(20, 20 + i)), [torch.randn(3, 32, 32)], [f"i{i}"],
                              max_new_tokens=3 + i % 5)])
        assert dec.cache.get_seq_length() == len(dec.col_owner)  # padding columns cut off again
    while dec.rows:
        dec._step([])
    assert all(L % 64 == 0 and 0 <= L - used < 64 and step % 8 == 0 for L, used, step in lengths)
    assert {step for _, _, step in lengths} != {8}  # not all steps were small
    shapes, useds = {L for L, _, _ in lengths}, {used for _, used, _ in lengths}
    assert len(shapes) <= max(useds) // 64 + 1 and 2 * len(shapes) < len(useds)
