"""A native Qwen2-VL served by the continuous decoder (medvl/generate/decode_models.py): its M-RoPE
positions per request, images of different sizes (different image-token counts) packed in one
step, answers equal to the model's own ``generate``."""

import base64

import pytest
import torch

from medvl.data.bundled import load_bundled

pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from transformers import Qwen2VLImageProcessor

    from tests.test_native_vlm import tiny_qwen2vl
    vlm = tiny_qwen2vl()
    # images keep their aspect ratio between 56x56 and 112x112 pixels: 4 to 16 image tokens each
    vlm.processor.image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    vlm.model.generation_config.eos_token_id = vlm.tok.eos_token_id  # stop where the server stops
    return vlm.save(tmp_path_factory.mktemp("qwen") / "tiny-qwen2vl")


def samples(n):
    from medvl.data.schema import Sample, Turn
    out = []
    for s in load_bundled("vqa-rad", "test")[:n]:
        q = s.conversation[0].text.replace("<image>\n", "")
        out.append(Sample(s.id, s.images, [Turn("user", "<image>\n" + q)]))
    return out


@pytest.mark.parametrize("gap", [0, 3], ids=["m-rope", "modality-gap"])
def test_native_qwen2vl_answers_under_continuous_batching_equal_its_own_generate(qwen_dir, gap, tmp_path):
    """Also with ClinKD's modality-gap positions set on the model (saved in its config)."""
    from medvl.generate.continuous import GenRequest, content_key
    from medvl.models.native import NativeVLM
    from medvl.serve.server import ServeConfig, Server
    if gap:
        nat = NativeVLM.from_pretrained(qwen_dir)
        nat.set_position_gap(gap)
        qwen_dir = nat.save(tmp_path / "gap")
    server = Server(str(qwen_dir), None, ServeConfig(precision="fp32"))
    try:
        nat, dec = server.native, server.decoder
        assert nat is not None and type(dec.dm).__name__ == "Qwen2VLDecoding"
        assert nat.model.config.medvl_position_gap == gap if gap else True
        todo = samples(12)
        ref = nat.generate(todo, batch_size=1, max_new_tokens=6)
        assert len(set(ref)) > 3 and all(ref)  # answers that tell the images and questions apart
        reqs = []
        for s in todo:
            ids, items = server.prompt(s)
            reqs.append(GenRequest(ids, items, [content_key(open(s.images[0].path, "rb").read())], max_new_tokens=6))
        counts = {int(it["image_grid_thw"].prod()) // 4 for r in reqs for it in r.images}
        assert len(counts) > 1  # images of different sizes: different image-token counts in one step
        assert dec.prefix_ids and all(r.ids[:len(dec.prefix_ids)] == dec.prefix_ids for r in reqs)
        got = [f.result(timeout=120) for f in [dec.submit(r) for r in reqs]]  # all at once: packed steps
        assert got == ref
        assert dec.counters["row_steps"] > dec.counters["steps"] and dec.counters["prefix_hits"] == len(reqs)
        alone = [dec.submit(GenRequest(r.ids, r.images, r.image_keys, max_new_tokens=6)).result(timeout=120)
                 for r in reqs[:3]]
        assert alone == ref[:3]
        assert dec.stats()["vision_cache"]["hits"] >= 3  # the second pass found the images' features
    finally:
        server.close()


def test_medvl_serve_answers_chat_with_a_native_qwen2vl(qwen_dir):
    from fastapi.testclient import TestClient

    from medvl.models.native import NativeVLM
    from medvl.serve.app import create_app
    from medvl.serve.server import ServeConfig
    s = samples(2)
    ref = NativeVLM.from_pretrained(qwen_dir).generate(s, batch_size=1, max_new_tokens=5)
    with TestClient(create_app(str(qwen_dir), None, ServeConfig(precision="fp32"))) as c:
        for sample, want in zip(s, ref):
            uri = "data:image/png;base64," + base64.b64encode(open(sample.images[0].path, "rb").read()).decode()
            q = sample.conversation[0].text.replace("<image>\n", "")
            body = {"model": "tiny-qwen2vl", "max_tokens": 5, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": q}]}]}
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == want
        assert c.get("/ready").json()["chat"]["admitted"] == 2
        import io

        from PIL import Image
        buf = io.BytesIO()
        Image.new("L", (600, 2)).save(buf, format="PNG")  # an aspect ratio Qwen2-VL's processor refuses
        body["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64," + base64.b64encode(
            buf.getvalue()).decode()
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and "processor cannot take this image" in r.json()["error"]["message"]
        assert c.get("/health").status_code == 200


def tiny_qwen25vl():
    """Qwen2.5-VL (windowed vision attention, the same M-RoPE) from a tiny config."""
    from medvl.models.tiny_native import tiny_qwen25vl as build
    return build()


def test_native_qwen25vl_answers_under_continuous_batching_equal_its_own_generate(tmp_path):
    from medvl.generate.continuous import GenRequest, content_key
    from medvl.serve.server import ServeConfig, Server
    server = Server(str(tiny_qwen25vl().save(tmp_path / "q25")), None, ServeConfig(precision="fp32"))
    try:
        assert type(server.decoder.dm).__name__ == "Qwen2VLDecoding"
        todo = samples(10)
        ref = server.native.generate(todo, batch_size=1, max_new_tokens=6)
        assert len(set(ref)) > 3 and all(ref)
        reqs = []
        for s in todo:
            ids, items = server.prompt(s)
            reqs.append(GenRequest(ids, items, [content_key(open(s.images[0].path, "rb").read())], max_new_tokens=6))
        assert [f.result(timeout=120) for f in [server.decoder.submit(r) for r in reqs]] == ref
    finally:
        server.close()


def test_native_llava_answers_under_continuous_batching_equal_its_own_generate(tmp_path):
    from medvl.generate.continuous import GenRequest, content_key
    from medvl.serve.server import ServeConfig, Server
    from tests.test_native_vlm import tiny_llava
    vlm = tiny_llava()
    torch.manual_seed(1)
    with torch.no_grad():  # the tiny model as built answers only special tokens ('' for every question)
        for p in vlm.model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    vlm.model.generation_config.eos_token_id = vlm.tok.eos_token_id
    server = Server(str(vlm.save(tmp_path / "llava")), None, ServeConfig(precision="fp32"))
    try:
        dec = server.decoder
        assert type(dec.dm).__name__ == "NativeDecoding" and dec.prefix_ids
        todo = samples(8)
        ref = server.native.generate(todo, batch_size=1, max_new_tokens=6)
        reqs = []
        for s in todo:
            ids, items = server.prompt(s)
            reqs.append(GenRequest(ids, items, [content_key(open(s.images[0].path, "rb").read())], max_new_tokens=6))
        assert len(set(ref)) > 4 and all(ref)  # answers that tell the images and questions apart
        assert [f.result(timeout=120) for f in [dec.submit(r) for r in reqs]] == ref
        assert dec.counters["row_steps"] > dec.counters["steps"]
    finally:
        server.close()


def test_a_model_the_decoder_cannot_serve_is_a_clear_error():
    from types import SimpleNamespace

    from medvl.errors import MedvlUserError
    from medvl.generate.decode_models import decoding_for
    with pytest.raises(MedvlUserError, match="qwen2_vl.*medvl predict"):
        decoding_for(SimpleNamespace(config=SimpleNamespace(model_type="llava_next")))


def test_qwen2vl_positions_follow_the_models_rope_index(qwen_dir):
    """The decoder's per-token positions for a prompt equal the model's own get_rope_index, and a
    generated token continues at the largest position plus one (the model's rope delta)."""
    from medvl.generate.decode_models import Qwen2VLDecoding
    from medvl.models.native import NativeVLM
    nat = NativeVLM.from_pretrained(qwen_dir)
    dm = Qwen2VLDecoding(nat.model)
    s = samples(1)[0]
    enc = nat.processor(text=[nat._text(s, False)], images=nat._images(s), return_tensors="pt")
    items = [{"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}]
    pos = dm.prompt_positions(enc["input_ids"][0].tolist(), items)
    want, delta = nat.model.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"], enc["image_grid_thw"])
    assert torch.equal(torch.tensor(pos).T, want[:, 0])
    T = enc["input_ids"].shape[1]
    assert dm.step_position(dm.last_position(pos[-1]) + 1) == (T + int(delta),) * 3


@pytest.mark.parametrize("kind", ["composed", "qwen2-vl"])
def test_a_generated_image_placeholder_is_text_not_a_failed_step(kind, qwen_dir):
    """An untrained model can emit the image placeholder token. It is text there (as in transformers'
    generate): the row goes on, and its batch mates' answers are those they get alone — before, the
    step raised and every row in it failed."""
    from medvl.generate.continuous import ContinuousDecoder, GenRequest, content_key
    if kind == "composed":
        from medvl.models.tokenizers import build_bpe_tokenizer
        from tests.test_vlm import make
        tok = build_bpe_tokenizer([t.text for s in load_bundled("vqa-rad", "test") for t in s.conversation],
                                  vocab_size=300)
        m = make(tok)
        img = m.config.image_token_id
        reqs = lambda: [GenRequest([1] + [img] * m.tokens_per_image + list(range(20, 20 + k)),  # noqa: E731
                                   [torch.full((3, 32, 32), float(k))], [f"k{k}"], max_new_tokens=5) for k in (2, 5)]
        dec = ContinuousDecoder(m, tok, lambda t: t)
        server = None
    else:
        from medvl.serve.server import ServeConfig, Server
        server = Server(str(qwen_dir), None, ServeConfig(precision="fp32"))
        dec, img = server.decoder, server.decoder.dm.image_token_id
        todo = samples(2)

        def reqs():
            out = []
            for s in todo:
                ids, items = server.prompt(s)
                out.append(GenRequest(ids, items, [content_key(open(s.images[0].path, "rb").read())], max_new_tokens=5))
            return out
    try:
        dec.eos = -1
        alone = [dec.submit(r).result(timeout=60) for r in reqs()]
        choose, forced = dec._choose, []

        def force(logits, rows):  # the first row's first generated token is the image placeholder
            nxt = choose(logits, rows)
            if rows and not rows[0].tokens and not forced:
                nxt[0] = img
                forced.append(rows[0])
            return nxt
        dec._choose = force
        a, b = reqs()
        fa, fb = dec.submit(a), dec.submit(b)
        got = [fa.result(timeout=60), fb.result(timeout=60)]
        assert forced and forced[0].tokens[0] == img and len(forced[0].tokens) == 5  # it went on
        assert dec.counters["failed"] == 0
        assert got[1] == alone[1] if forced[0] is a else got[0] == alone[0]  # the other row: as alone
    finally:
        (server or dec).close()


def test_image_placeholders_in_text_are_a_400_and_a_mismatched_prompt_fails_alone(qwen_dir):
    """A question holding the model's image placeholder was a 500 that failed every request decoding in
    the same step. Now the server refuses it (400) — '<image>' and the native model's own token — and
    the decoder refuses a prompt whose image slots do not match its images alone, before it joins a
    step, while the requests beside it are answered."""
    from fastapi.testclient import TestClient

    from medvl.errors import MedvlUserError
    from medvl.generate.continuous import GenRequest, content_key
    from medvl.serve.app import create_app
    from medvl.serve.server import ServeConfig
    s = samples(1)[0]
    uri = "data:image/png;base64," + base64.b64encode(open(s.images[0].path, "rb").read()).decode()
    with TestClient(create_app(str(qwen_dir), None, ServeConfig(precision="fp32"))) as c:
        for text in ("What does <image> show?", "Is <|image_pad|> normal?"):
            body = {"model": "tiny-qwen2vl", "max_tokens": 3, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": text}]}]}
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 400 and "image placeholder" in r.json()["error"]["message"], r.text
        server = c.app.state.server
        dec = server.decoder
        ids, items = server.prompt(s)
        key = [content_key(uri.encode())]
        bad = GenRequest(ids + [dec.dm.image_token_id], items, key, max_new_tokens=3)
        good = GenRequest(ids, items, key, max_new_tokens=3)
        fb, fg = dec.submit(bad), dec.submit(good)
        assert isinstance(fg.result(timeout=60), str)
        with pytest.raises(MedvlUserError, match="image-token positions"):
            fb.result(timeout=60)
        assert dec.counters["refused"] == 1 and dec.counters["failed"] == 0


def test_an_image_the_model_cannot_encode_fails_its_own_request_only():
    """The tower (or its preprocessing: a 2D upload to a 3D model) failing on one newcomer's image used to
    fail the whole step; now images are encoded before the step, one at a time after a batch fails, and
    only the requests of the bad image fail."""
    from medvl.errors import MedvlUserError
    from medvl.generate.continuous import ContinuousDecoder, GenRequest
    from medvl.models.tokenizers import build_bpe_tokenizer
    from tests.test_vlm import make
    tok = build_bpe_tokenizer([t.text for s in load_bundled("vqa-rad", "test") for t in s.conversation], vocab_size=300)
    m = make(tok)
    img, n = m.config.image_token_id, m.tokens_per_image

    def image_fn(t):
        if t is None:
            raise MedvlUserError("this model's vision tower takes 3D volumes, got a 2D image")
        return t
    dec = ContinuousDecoder(m, tok, image_fn)
    dec.eos = -1
    good = [GenRequest([1] + [img] * n + [20 + k], [torch.full((3, 32, 32), float(k))], [f"g{k}"], max_new_tokens=3)
            for k in range(3)]
    try:
        alone = [dec.submit(GenRequest(r.ids, r.images, r.image_keys, max_new_tokens=3)).result(timeout=60)
                 for r in good]
        dec.vision_cache.clear()
        bad = GenRequest([1] + [img] * n + [30], [None], ["bad"], max_new_tokens=3)
        dec.close()  # drive by hand: the bad request and two good ones are newcomers of the same step
        new = dec._encode([good[0], bad, good[1]])
        assert new == [good[0], good[1]] and dec.counters["refused"] == 1
        with pytest.raises(MedvlUserError, match="3D volumes"):
            bad.future.result(timeout=1)
        dec._step(new)
        while dec.rows:
            dec._step([])
        assert [r.future.result(timeout=1) for r in new] == alone[:2]
    finally:
        dec.close()
