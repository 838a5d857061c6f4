"""The HTTP server: an OpenAI-compatible chat API for a medvl VLM, zero-shot and embeddings
for a medical CLIP, health / readiness, and the web page — one FastAPI app around the loaded
models (:class:`medvl.serve.server.Server`).

Design choices:

* **OpenAI wire format** (``/v1/chat/completions``, ``/v1/models``, ``/v1/embeddings``) so
  the official ``openai`` client and the tools built on it work unchanged; errors use its
  ``{"error": {"message", "type", "code"}}`` body. Images travel as ``image_url`` data URIs
  (:mod:`medvl.serve.uploads`); the last user message is the question, its images the input.
  What is not implemented is refused, not ignored: ``tools`` / ``functions``, a non-text
  ``response_format``, ``logprobs``, ``logit_bias``, penalties, audio and ``n`` > 1 answer 400
  naming the field; ``stream_options.include_usage`` is honoured (a last chunk with the counts).
* **Continuous batching** for chat (:class:`medvl.generate.continuous.ContinuousDecoder`):
  a request joins the running decode at the next step — its prompt packed into the same
  forward as the running rows' next tokens — and leaves when it finishes, each with
  its own ``max_tokens``, temperature / top-p, stop strings and seed; streaming requests are
  rows like the others, with a per-token callback (server-sent events, OpenAI's chunk
  format); a client that goes away frees its row and KV cache at the next step. The same
  image (by content hash) asked several questions is encoded once (a bounded LRU of vision
  tokens), and its tokens' KV after the template prefix is reused (a bounded LRU of spans).
* **Batched CLIP endpoints**: zero-shot and embedding requests waiting when the tower is free
  (or within ``batch_wait_ms``) share one image-tower call and one text-tower call
  (:class:`medvl.serve.batcher.Batcher`); the class embeddings of a label set are cached.
* **Uploads decode off the event loop**: base64, the image decoder and CLIP preprocessing run
  in worker threads (``asyncio.to_thread``), so a large DICOM never stalls other clients'
  streams, and a CLIP batch's thread runs only the towers while the next requests' images are
  prepared beside it.
* **Precision** ``auto``: the models run in bf16 where the hardware computes it natively and
  fp32 elsewhere (:mod:`medvl.models.precision`) — what makes a batch cheap relative to one
  request on a CPU with AMX (docs/serve.md).
* **Limits**: body bytes (checked on the stream, not only the header), image bytes and
  pixels, ``max_tokens`` capped, a per-request timeout (504), a bounded queue (503 +
  Retry-After), optional bearer-token auth, JSON-only POST bodies (415). Client mistakes are
  4xx with a message; an unexpected server fault is a 500 with a generic message and the
  traceback only in the server log.
"""

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from medvl.errors import MedvlUserError
from medvl.models.hub import DEFAULT_CLIP, DEFAULT_VLM
from medvl.serve.apidocs import render_docs
from medvl.serve.batcher import QueueFull
from medvl.serve.server import ServeConfig, Server
from medvl.serve.uploads import RequestError

log = logging.getLogger("medvl.serve")
STATIC = Path(__file__).resolve().parent / "static"


def _models():
    """Pydantic request models (built lazily: pydantic comes with the serve extra)."""
    from pydantic import BaseModel, ConfigDict, Field

    class ImageURL(BaseModel):
        url: str
        detail: str | None = None

    class Part(BaseModel):
        type: Literal["text", "image_url"]
        text: str | None = None
        image_url: ImageURL | None = None

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: Literal["system", "user", "assistant", "developer"]
        content: str | list[Part] | None = None

    class ChatRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str
        messages: list[Message] = Field(min_length=1)
        max_tokens: int | None = Field(default=None, ge=1)
        max_completion_tokens: int | None = Field(default=None, ge=1)
        temperature: float | None = Field(default=None, ge=0.0, le=2.0)
        top_p: float | None = Field(default=None, gt=0.0, le=1.0)
        stream: bool = False
        n: int = 1
        seed: int | None = None
        stop: str | list[str] | None = None
        stream_options: dict | None = None
        # OpenAI fields this server does not implement: typed here so that a request using them is
        # refused with a 400 naming the field (Server.refuse_unsupported), never answered as if honoured
        tools: list | None = None
        tool_choice: Any = None
        functions: list | None = None
        function_call: Any = None
        response_format: dict | None = None
        logprobs: bool | None = None
        top_logprobs: int | None = None
        logit_bias: dict | None = None
        presence_penalty: float | None = None
        frequency_penalty: float | None = None
        audio: Any = None
        modalities: list | None = None
        prediction: Any = None

    class ZeroShotRequest(BaseModel):
        model: str | None = None
        image: str
        labels: list[str] = Field(min_length=2)
        window: str | None = None

    class PreviewRequest(BaseModel):
        image: str
        window: str | None = None

    class EmbeddingRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str
        input: str | list[str]
        encoding_format: Literal["float", "base64"] = "float"

    return ChatRequest, ZeroShotRequest, EmbeddingRequest, PreviewRequest


def create_app(vlm: str | None = DEFAULT_VLM, clip: str | None = DEFAULT_CLIP,
               cfg: ServeConfig | None = None):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg = cfg or ServeConfig()
    server = Server(vlm, clip, cfg)
    ChatRequest, ZeroShotRequest, EmbeddingRequest, PreviewRequest = _models()
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        yield
        server.close()

    app = FastAPI(title="medvl", version=__import__("medvl").__version__, lifespan=lifespan,
                  description="Medical vision-language models: OpenAI-compatible chat, zero-shot and embeddings.",
                  docs_url=None, redoc_url=None)  # Swagger UI / ReDoc load from a CDN: /docs is rendered here

    @app.get("/docs", include_in_schema=False)
    async def docs():
        from fastapi.responses import HTMLResponse

        return HTMLResponse(render_docs(app.openapi()))
    app.state.server = server

    def error(status: int, message: str, code: str = "invalid_request_error", headers: dict | None = None):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status,
                            headers=headers)

    @app.exception_handler(RequestError)
    async def _request_error(_, e: RequestError):
        return error(e.status, e.message, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e: RequestValidationError):
        errs = e.errors()
        if any(x.get("type") == "json_invalid" for x in errs):
            return error(400, "malformed JSON body")
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", []) if x != "body")
        return error(400, f"invalid request: {where or 'body'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        return error(e.status_code, str(e.detail), "not_found" if e.status_code == 404 else "http_error")

    @app.exception_handler(Exception)
    async def _unexpected(_, e: Exception):
        log.exception("unexpected error")
        return error(500, "internal error (see the server log)")

    app.add_middleware(Guard, cfg=cfg, error=error)

    # -- health --------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if not server.ready:
            return error(503, "loading")
        out: dict[str, Any] = {"status": "ready"}
        if server.decoder is not None:
            out["chat"] = {"precision": server.pipe.precision, **server.decoder.stats()}
        if server.clip_batcher is not None:
            b = server.clip_batcher
            out["clip"] = {"queue": b.q.qsize(), "batches": b.batches, "batched_requests": b.items,
                           "mean_batch": b.items / b.batches if b.batches else 0.0,
                           "label_sets_cached": len(server.clip_runner.class_cache),
                           "precision": server.clip_precision}
        return out

    @app.get("/v1/models")
    async def models():
        data = []
        if server.pipe is not None:
            data.append({"id": server.vlm_name, "object": "model", "created": 0, "owned_by": "medvl"})
        if server.clip is not None:
            data.append({"id": server.clip_name, "object": "model", "created": 0, "owned_by": "medvl"})
        return {"object": "list", "data": data}

    @app.get("/v1/server")
    async def server_info():
        """medvl extension: which served model is the chat model and which the CLIP (the page uses it)."""
        return {"vlm": server.vlm_name if server.pipe is not None else None,
                "clip": server.clip_name if server.clip is not None else None,
                "limits": {"max_image_bytes": cfg.max_image_bytes, "max_image_pixels": cfg.max_image_pixels,
                           "max_tokens": cfg.max_tokens_cap}}

    @app.post("/v1/preview")
    async def preview(req: PreviewRequest):
        """medvl extension: the image as a PNG for display (DICOM windowed by a preset or the file's window)."""
        import base64
        import io

        from medvl.data.imageio import to_pil
        def render():
            media, img = server.store.decode(req.image)
            try:
                pil = to_pil(img, req.window)
                pil.thumbnail((512, 512))
                buf = io.BytesIO()
                pil.save(buf, format="PNG")
            except MedvlUserError as e:
                raise RequestError(400, str(e)) from None
            finally:
                server.store.release(media)
            return buf.getvalue(), getattr(img, "modality", None)
        png, modality = await asyncio.to_thread(render)
        return {"png": "data:image/png;base64," + base64.b64encode(png).decode(), "modality": modality}

    # -- chat ------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        sample, media, settings = server.parse_chat(req)
        if settings["uploads"]:  # an image not seen before: decoded in a worker thread, not on the event loop
            await asyncio.to_thread(server.decode_uploads, media, settings["uploads"], sample, settings)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        busy = error(503, "server busy: the request queue is full, retry shortly", "overloaded", {"Retry-After": "1"})
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            try:
                return StreamingResponse(_stream(server, sample, media, settings, cid, created, req.model,
                                                 cfg.timeout_s, usage), media_type="text/event-stream")
            except QueueFull:
                return busy
        gen = server.gen_request(sample, media, settings)
        for m in media:  # the request holds the decoded pixels; the upload itself is done with
            server.store.release(m)
        try:
            fut = server.decoder.submit(gen)
        except QueueFull:
            return busy
        try:
            answer = await asyncio.wait_for(asyncio.wrap_future(fut), cfg.timeout_s)
        except asyncio.TimeoutError:
            gen.cancel()  # its row leaves the running batch at the next step
            return error(504, f"generation took longer than {cfg.timeout_s:.0f} s", "timeout")
        except asyncio.CancelledError:  # the client went away
            gen.cancel()
            raise
        except MedvlUserError as e:  # the decoder refused this prompt (alone)
            return error(400, str(e))
        n_prompt, n_out = len(gen.ids), len(gen.tokens)  # the decoder's own counts (end-of-turn not included)
        return {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                             "finish_reason": "length" if n_out >= gen.max_new_tokens else "stop"}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}}

    # -- CLIP ------------------------------------------------------------------------------------
    def need_clip(name: str | None):
        if server.clip is None:
            raise RequestError(404, "this server has no CLIP model (start it with --clip)", "model_not_found")
        if name is not None and name != server.clip_name:
            raise RequestError(404, f"model {name[:80]!r} is not served here; the CLIP is {server.clip_name!r}",
                               "model_not_found")

    def clip_pixels(uris: list[str], window=None):
        """Uploads -> the tower's input, in a worker thread: decoding and preprocessing never hold
        up the event loop, and run beside the tower's batches instead of inside them."""
        images = []
        for uri in uris:
            media, img = server.store.decode(uri)
            server.store.release(media)
            images.append(img)
        return server.clip_runner.pixels(images, window)

    async def clip_call(item: dict):
        try:
            fut = server.clip_batcher.submit(item)
        except QueueFull:
            raise RequestError(503, "server busy: the request queue is full, retry shortly", "overloaded") from None
        try:
            res = await asyncio.wait_for(asyncio.wrap_future(fut), cfg.timeout_s)
        except asyncio.TimeoutError:
            fut.cancel()
            raise RequestError(504, f"the CLIP took longer than {cfg.timeout_s:.0f} s", "timeout") from None
        return res

    @app.post("/v1/zero-shot")
    async def zero_shot_ep(req: ZeroShotRequest):
        from medvl.harness.zero_shot import check_labels
        need_clip(req.model)
        if len(req.labels) > cfg.max_labels:
            raise RequestError(400, f"at most {cfg.max_labels} labels")
        if any(len(x) > 200 for x in req.labels):
            raise RequestError(400, "labels: at most 200 characters each")
        try:
            "".join(req.labels).encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(400, "labels: not valid Unicode text (a lone surrogate)") from None
        try:
            labels = check_labels(req.labels)
        except MedvlUserError as e:
            raise RequestError(400, str(e)) from None
        pixels = await asyncio.to_thread(clip_pixels, [req.image], req.window)  # [1, 3, S, S]
        probs = await clip_call({"kind": "zero-shot", "pixels": pixels, "labels": labels})
        order = sorted(range(len(probs)), key=lambda k: -probs[k])
        return {"object": "zero_shot", "model": server.clip_name, "labels": labels, "probs": probs,
                "ranking": [{"label": labels[k], "prob": probs[k]} for k in order]}

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest):
        need_clip(req.model)
        items = [req.input] if isinstance(req.input, str) else list(req.input)
        if not items or len(items) > cfg.max_embedding_inputs:
            raise RequestError(400, f"input: 1 to {cfg.max_embedding_inputs} strings (text, or an image data URI)")
        is_img = [isinstance(x, str) and x.startswith("data:") for x in items]
        if any(not x.strip() for x, im in zip(items, is_img) if not im):
            raise RequestError(400, "input: empty text")
        uris = [x for x, im in zip(items, is_img) if im]
        pixels = await asyncio.to_thread(clip_pixels, uris) if uris else server.clip_runner.pixels([])  # [n, 3, S, S]
        texts = [x for x, im in zip(items, is_img) if not im]
        got = await clip_call({"kind": "embed", "texts": texts, "pixels": pixels})
        it_t, it_i = iter(got["texts"]), iter(got["images"])
        vecs = [next(it_i) if im else next(it_t) for im in is_img]
        n_tok = sum(len(x.split()) for x in texts)
        if req.encoding_format == "base64":  # what the openai client asks for: little-endian float32
            import base64

            import numpy as np
            vecs = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for v in vecs]
        return {"object": "list", "model": server.clip_name,
                "data": [{"object": "embedding", "index": k, "embedding": v} for k, v in enumerate(vecs)],
                "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}}

    # -- the page --------------------------------------------------------------------------------
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

        @app.get("/", include_in_schema=False)
        async def index():
            return FileResponse(str(STATIC / "index.html"))

    return app


class Guard:
    """ASGI middleware for /v1: API key, JSON-only POST bodies, and the body-size limit counted on
    the stream itself (a missing or lying Content-Length cannot get past it)."""

    def __init__(self, app, cfg: ServeConfig, error):
        self.app, self.cfg, self.error = app, cfg, error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        cfg = self.cfg
        if cfg.api_key and headers.get("authorization", "") != f"Bearer {cfg.api_key}":
            return await self.error(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                    "invalid_api_key")(scope, receive, send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return await self.error(415, f"send the body as application/json (got {ctype or 'no content type'})"
                                    )(scope, receive, send)
        too_big = self.error(413, f"request body over the limit of {cfg.max_body_bytes} bytes")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cfg.max_body_bytes:
            return await too_big(scope, receive, send)
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > cfg.max_body_bytes:
                return await too_big(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls: wait for the client's disconnect
        return await self.app(scope, replay, send)


def _stream(server: Server, sample, media, settings, cid: str, created: int, model: str, timeout: float,
            include_usage: bool = False):
    """Server-sent events in OpenAI's chat.completion.chunk format; the text arrives as deltas.
    With ``stream_options.include_usage`` a last chunk before ``[DONE]`` carries the token counts
    and no choices, as OpenAI sends it.
    The request is a row of the running decode; if the client goes away (the generator is
    closed or cancelled), the row is cancelled and leaves the batch at the next step."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    sent = ""

    def emit(text: str) -> None:
        loop.call_soon_threadsafe(q.put_nowait, ("text", text))

    def done(fut) -> None:
        if fut.cancelled():
            return
        err = fut.exception()
        loop.call_soon_threadsafe(q.put_nowait, ("error", str(err)) if err else ("done", fut.result()))

    gen = server.gen_request(sample, media, settings, on_text=emit)
    for m in media:
        server.store.release(m)
    server.decoder.submit(gen)  # QueueFull reaches the endpoint before the response starts
    gen.future.add_done_callback(done)

    def chunk(delta: dict, finish: str | None = None) -> str:
        return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

    async def events():
        nonlocal sent
        try:
            yield chunk({"role": "assistant", "content": ""})
            deadline = time.monotonic() + timeout
            while True:
                kind, text = await asyncio.wait_for(q.get(), max(0.01, deadline - time.monotonic()))
                if kind == "text":
                    if text.startswith(sent) and len(text) > len(sent):
                        yield chunk({"content": text[len(sent):]})
                        sent = text
                    continue
                if kind == "error":
                    log.error("stream failed: %s", text)
                    yield "data: " + json.dumps({"error": {"message": "generation failed", "type": "server_error"}}) \
                        + "\n\n"
                break
            yield chunk({}, "length" if len(gen.tokens) >= gen.max_new_tokens else "stop")
            if include_usage:
                n_prompt, n_out = len(gen.ids), len(gen.tokens)
                yield "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                             "model": model, "choices": [],
                                             "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                                                       "total_tokens": n_prompt + n_out}}) + "\n\n"
            yield "data: [DONE]\n\n"
        except asyncio.TimeoutError:
            yield "data: " + json.dumps({"error": {"message": "generation timed out", "type": "timeout"}}) + "\n\n"
        finally:  # normal end, timeout, or the client went away: the row leaves the batch
            gen.cancel()
    return events()
