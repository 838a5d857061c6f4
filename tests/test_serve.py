"""The server: OpenAI-compatible chat, zero-shot, embeddings, batching, limits and hostile input."""

import base64
import io
import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("open_clip")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient

from medvl.data.bundled import load_bundled
from medvl.serve.app import ServeConfig, create_app

VLM, CLIP = "medvl-vqarad-small", "medclip-r10t-minilm"


def data_uri(path, mime="image/jpeg"):
    return f"data:{mime};base64," + base64.b64encode(open(path, "rb").read()).decode()


@pytest.fixture(scope="module")
def img():
    return data_uri(load_bundled("vqa-rad", "test")[0].images[0].path)


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(VLM, CLIP, ServeConfig(max_body_bytes=2**20, max_image_pixels=4_000_000))) as c:
        yield c


def chat_body(img, q="Is this a CT scan?", **kw):
    content = [{"type": "text", "text": q}] + ([{"type": "image_url", "image_url": {"url": img}}] if img else [])
    return {"model": VLM, "messages": [{"role": "user", "content": content}], **kw}


def test_health_models_and_openapi(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["status"] == "ready"
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == [VLM, CLIP]
    paths = set(client.get("/openapi.json").json()["paths"])
    assert {"/v1/chat/completions", "/v1/models", "/v1/zero-shot", "/v1/embeddings", "/health", "/ready"} <= paths
    page = client.get("/")
    assert page.status_code == 200 and "medvl" in page.text and "http" not in page.text.split("<body>")[1].split(
        "Research use")[0].replace("https://", "X")  # no external resources on the page
    assert client.get("/static/page.js").status_code == 200


def test_chat_answers_and_matches_the_pipeline(client, img):
    import medvl
    r = client.post("/v1/chat/completions", json=chat_body(img, max_tokens=16))
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["object"] == "chat.completion" and j["choices"][0]["message"]["role"] == "assistant"
    pipe = medvl.load(VLM)
    path = load_bundled("vqa-rad", "test")[0].images[0].path
    assert j["choices"][0]["message"]["content"] == pipe.answer(path, "Is this a CT scan?", max_new_tokens=16)
    assert j["usage"]["prompt_tokens"] > 0


def test_streaming_gives_the_same_text_in_openai_chunks(client, img):
    full = client.post("/v1/chat/completions", json=chat_body(img, max_tokens=16)).json()
    with client.stream("POST", "/v1/chat/completions", json=chat_body(img, max_tokens=16, stream=True)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_dicom_upload_preview_and_chat(client):
    from pydicom.data import get_testdata_file
    uri = data_uri(get_testdata_file("CT_small.dcm"), "application/dicom")
    r = client.post("/v1/chat/completions", json=chat_body(uri, "Which organ is shown?", max_tokens=8))
    assert r.status_code == 200, r.text
    p = client.post("/v1/preview", json={"image": uri, "window": "lung"})
    assert p.status_code == 200 and p.json()["png"].startswith("data:image/png;base64,")
    assert p.json()["modality"] == "CT"


@pytest.mark.parametrize("url", ["/etc/passwd", "file:///etc/passwd", "http://127.0.0.1:1/x.png",
                                 "../../secret.png", "data:image/png,notbase64"])
def test_the_server_never_reads_paths_or_urls(client, url):
    r = client.post("/v1/chat/completions", json=chat_body(url))
    assert r.status_code == 400 and "error" in r.json()
    assert "data: URI" in r.json()["error"]["message"] or "base64" in r.json()["error"]["message"]


def test_hostile_requests_get_4xx_with_a_message(client, img):
    def err(r, status):
        assert r.status_code == status, (r.status_code, r.text)
        assert r.json()["error"]["message"] and "Traceback" not in r.text
    err(client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    err(client.post("/v1/chat/completions", content=b"hello", headers={"content-type": "text/plain"}), 415)
    err(client.post("/v1/chat/completions", json={"model": VLM}), 400)
    err(client.post("/v1/chat/completions", json=chat_body(img, model="gpt-4")), 404)
    err(client.post("/v1/chat/completions", json=chat_body(img, n=3)), 400)
    err(client.post("/v1/chat/completions", json=chat_body(img, temperature=7)), 400)
    garbage = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200).decode()
    err(client.post("/v1/chat/completions", json=chat_body(garbage)), 400)
    err(client.post("/v1/chat/completions", json=chat_body("data:image/gif;base64,R0lGOD==")), 415)
    err(client.post("/v1/chat/completions", json=chat_body(img, q="x" * (2**20 + 10))), 413)
    err(client.post("/v1/zero-shot", json={"image": img, "labels": ["a", "a"]}), 400)
    err(client.post("/v1/embeddings", json={"model": CLIP, "input": []}), 400)
    err(client.get("/v1/nothing-here"), 404)
    # a decompression bomb: a 1-bit PNG of 9000 x 9000 pixels is a few kB
    from PIL import Image
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")
    bomb = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    err(client.post("/v1/chat/completions", json=chat_body(bomb)), 413)


def test_conversation_history_is_kept_and_images_only_in_the_last_turn(client, img):
    msgs = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Is this a CT scan?"}, {"role": "assistant", "content": "yes"},
            {"role": "user", "content": [{"type": "text", "text": "Which organ?"},
                                         {"type": "image_url", "image_url": {"url": img}}]}]
    r = client.post("/v1/chat/completions", json={"model": VLM, "messages": msgs, "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > client.post("/v1/chat/completions", json=chat_body(
        img, "Which organ?", max_tokens=4)).json()["usage"]["prompt_tokens"]
    early = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}},
                                          {"type": "text", "text": "a"}]}, {"role": "user", "content": "b"}]
    bad = client.post("/v1/chat/completions", json={"model": VLM, "messages": early})
    assert bad.status_code == 400 and "last user message" in bad.json()["error"]["message"]


def test_max_tokens_is_capped(img):
    cfg = ServeConfig(max_tokens_cap=2)
    with TestClient(create_app(VLM, None, cfg)) as c:
        r = c.post("/v1/chat/completions", json=chat_body(img, "Describe the image in detail.", max_tokens=100000))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_api_key(img):
    with TestClient(create_app(VLM, None, ServeConfig(api_key="s3cret"))) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200  # health stays open for probes


def test_concurrent_requests_are_batched_and_answered_correctly(client):
    test = load_bundled("vqa-rad", "test")[:12]
    bodies = [chat_body(data_uri(s.images[0].path), s.conversation[0].text.replace("<image>\n", ""), max_tokens=8)
              for s in test]
    seq = [client.post("/v1/chat/completions", json=b).json()["choices"][0]["message"]["content"] for b in bodies]
    server = client.app.state.server
    before = server.batcher.batches
    out = [None] * len(bodies)

    def go(k):
        out[k] = client.post("/v1/chat/completions", json=bodies[k]).json()["choices"][0]["message"]["content"]
    threads = [threading.Thread(target=go, args=(k,)) for k in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == seq  # each answer went back to its own request
    assert server.batcher.batches - before < len(bodies)  # fewer generation calls than requests


def test_full_queue_answers_503_not_a_growing_backlog(img):
    with TestClient(create_app(VLM, None, ServeConfig(max_queue=1, max_batch=1))) as c:
        server = c.app.state.server
        real = server.batcher.run_batch

        def slow(items):
            time.sleep(0.5)
            return real(items)
        server.batcher.run_batch = slow
        codes = []

        def go():
            codes.append(c.post("/v1/chat/completions", json=chat_body(img, max_tokens=2)).status_code)
        threads = [threading.Thread(target=go) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}


def test_zero_shot_and_embeddings(client, img):
    r = client.post("/v1/zero-shot", json={"image": img, "labels": ["chest", "head", "abdomen"]})
    assert r.status_code == 200, r.text
    j = r.json()
    assert abs(sum(j["probs"]) - 1) < 1e-5 and j["ranking"][0]["prob"] == max(j["probs"])
    e = client.post("/v1/embeddings", json={"model": CLIP, "input": ["chest x-ray", img]}).json()
    assert len(e["data"]) == 2 and len(e["data"][0]["embedding"]) == len(e["data"][1]["embedding"])


def test_the_openai_client_talks_to_a_running_server(img):
    openai = pytest.importorskip("openai")
    import socket

    import uvicorn
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(VLM, CLIP), host="127.0.0.1", port=port, log_level="error"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.1)
        cl = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        assert [m.id for m in cl.models.list()] == [VLM, CLIP]
        msg = [{"role": "user", "content": [{"type": "text", "text": "Is this a CT scan?"},
                                            {"type": "image_url", "image_url": {"url": img}}]}]
        r = cl.chat.completions.create(model=VLM, messages=msg, max_tokens=8)
        answer = r.choices[0].message.content
        assert isinstance(answer, str)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in
                           cl.chat.completions.create(model=VLM, messages=msg, max_tokens=8, stream=True))
        assert streamed == answer
        emb = cl.embeddings.create(model=CLIP, input=["pleural effusion"])
        assert len(emb.data[0].embedding) > 0
        with pytest.raises(openai.NotFoundError):
            cl.chat.completions.create(model="nope", messages=msg)
    finally:
        server.should_exit = True
        th.join(timeout=10)
