"""What ``medvl serve`` has loaded and what a request needs from it: the VLM (composed or native)
behind the continuous decoder, the CLIP behind its batcher, and the chat request's preparation —
the OpenAI messages checked and turned into a medvl Sample, the uploads decoded, the prompt laid
out. The HTTP layer (:mod:`medvl.serve.app`) wraps it.

Design choices:

* **One prompt layout per model kind**: a composed model's collator builds the prompt ids and its
  image function runs in the decoder on a cache miss; a native Hugging Face model's processor lays
  out the prompt with the image (Qwen2-VL's image-token count follows the image's size), in the
  upload's worker thread.
* **The template prefix** (the tokens every default chat prompt starts with) is found, not
  configured: the common start of two prompts that differ only in their question, cut before the
  first image token; the decoder shares its KV across requests.
* **A cached image is not decoded again**: a request whose image's features are cached carries them,
  and its upload is never decoded (composed models; a native processor needs the image's size).
"""

import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from medvl.data.schema import Media, Sample, Turn
from medvl.generate.continuous import GenRequest, content_key
from medvl.serve.batcher import Batcher
from medvl.serve.uploads import RequestError, UploadStore


#: Qwen2-VL's grounding markup: special tokens, but what a referring question legitimately sends
GROUNDING_MARKUP = frozenset({"<|box_start|>", "<|box_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                              "<|quad_start|>", "<|quad_end|>"})


@dataclass
class ServeConfig:
    max_body_bytes: int = 24 * 2**20
    max_image_bytes: int = 16 * 2**20
    max_image_pixels: int = 40_000_000
    max_tokens_cap: int = 256
    max_messages: int = 64
    """messages in one chat request (more: 400)"""
    max_prompt_chars: int = 16_000
    """characters of text in one chat request, all messages together (more: 400, before anything is tokenised)"""
    default_max_tokens: int = 64
    timeout_s: float = 60.0
    max_queue: int = 64
    max_batch: int = 32
    """rows decoding at once (chat) and requests per CLIP call; 1 = one request at a time"""
    batch_wait_ms: float = 0.0
    """how long a CLIP batch waits to fill; 0: no window, a batch is what is waiting when the tower is free"""
    image_cache_mb: float = 256.0
    """vision tokens kept for images asked about again (LRU by bytes)"""
    span_cache_mb: float = 256.0
    """KV of the image's tokens after the template prefix, kept for images asked about again (LRU by
    bytes; 0 turns it off); a second question about an image then prefills only its own tokens"""
    max_stop: int = 4
    max_labels: int = 64
    max_embedding_inputs: int = 64
    api_key: str | None = None
    precision: str = "auto"
    """the models' weights, activations and KV cache (VLM and CLIP): fp32, bf16, or auto = bf16 where the device computes it
    natively (AMX / AVX512-BF16 CPUs, CUDA), else fp32 (medvl.models.precision)"""
    tower_precision: str = "fp32"
    """'bf16' runs the VLM's vision tower under bf16 autocast (about 3x faster for conv towers on CPUs
    with bf16 units; 99.1 % of VQA-RAD answers unchanged for the shipped model)"""


class Server:
    """The loaded models and everything a request needs; the FastAPI app wraps it."""

    def __init__(self, vlm: str | None, clip: str | None, cfg: ServeConfig, *, vlm_name: str | None = None,
                 clip_name: str | None = None):
        self.cfg = cfg
        self.store = UploadStore(cfg.max_image_bytes, cfg.max_image_pixels)
        self.pipe = self.clip = self.decoder = self.clip_batcher = self.native = None
        if vlm:
            from medvl.generate.continuous import ContinuousDecoder
            from medvl.generate.pipeline import NativePipeline, load
            self.pipe = load(vlm, precision=cfg.precision)
            self.native = self.pipe.native if isinstance(self.pipe, NativePipeline) else None
            """a native Hugging Face VLM (Qwen2-VL family, LLaVA-style): its processor builds each prompt"""
            self.vlm_name = vlm_name or Path(str(vlm)).name
            model = self.native.model if self.native else self.pipe.model
            self.decoder = ContinuousDecoder(model, self.pipe.tokenizer, getattr(self.pipe, "image_fn", None),
                                             max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                                             cache_bytes=int(cfg.image_cache_mb * 2**20),
                                             tower_precision=cfg.tower_precision,
                                             prefix_ids=self.template_prefix(),
                                             span_cache_bytes=int(cfg.span_cache_mb * 2**20))
        if clip:
            from medvl.models.clip import load_clip
            from medvl.serve.clip_batch import ClipRunner
            self.clip = load_clip(clip).eval()
            from medvl.models.precision import for_inference
            self.clip_precision = for_inference(self.clip, cfg.precision)
            self.clip_name = clip_name or Path(str(clip)).name
            self.clip_runner = ClipRunner(self.clip)
            self.clip_batcher = Batcher(self.clip_runner, cfg.max_batch, cfg.batch_wait_ms, cfg.max_queue)
        if self.pipe is not None:
            from medvl.data.schema import IMAGE_TOKEN
            tok = self.pipe.tokenizer
            proc = self.native.processor if self.native else None
            self.placeholders = {IMAGE_TOKEN, tok.convert_ids_to_tokens(self.decoder.dm.image_token_id)} | {
                t for t in (getattr(proc, "image_token", None), getattr(proc, "video_token", None)) if t}
            """strings a chat text may not hold: they are image slots for this model"""
            self.control_tokens = sorted({t for t in list(tok.all_special_tokens) + [
                a.content for a in getattr(tok, "added_tokens_decoder", {}).values() if getattr(a, "special", False)]
                if t and t not in self.placeholders and len(t) > 1 and t not in GROUNDING_MARKUP}, key=len, reverse=True)
            """the tokenizer's control tokens (<|im_end|>, <|im_start|> ...): typed into a message they would be
            read as real turn boundaries, letting a user forge an assistant or system turn"""
        if self.pipe is None and self.clip is None:
            raise ValueError("serve needs a VLM (--model) or a CLIP (--clip)")
        self.ready = True

    def close(self) -> None:
        if self.decoder is not None:
            self.decoder.close()
        if self.clip_batcher is not None:
            self.clip_batcher.close()

    # -- chat ------------------------------------------------------------------------------
    def parse_chat(self, req) -> tuple[Any, list, dict]:
        """Request -> (Sample, uploaded media, decoding settings incl. the images' content keys);
        raises RequestError. Uploads whose vision tokens are not cached are not decoded here:
        ``settings["uploads"]`` lists them (index into media, data URI) for :meth:`decode_uploads`,
        which the endpoint runs in a worker thread."""
        if self.pipe is None:
            raise RequestError(404, "this server has no chat model (start it with --model)", "model_not_found")
        if req.model != self.vlm_name:
            raise RequestError(404, f"model {req.model[:80]!r} is not served here; GET /v1/models lists "
                                    f"{self.vlm_name!r}", "model_not_found")
        if req.n != 1:
            raise RequestError(400, "n: only 1 completion per request is supported")
        refuse_unsupported(req)
        self._check_request(req)
        users = [i for i, m in enumerate(req.messages) if m.role == "user"]
        if not users:
            raise RequestError(400, "messages need a user message")
        last = req.messages[users[-1]]
        parts = [SimpleNamespace(type="text", text=last.content)] if isinstance(last.content, str) \
            else (last.content or [])
        images = [p for p in parts if p.type == "image_url"]
        if any(p.image_url is None for p in images):
            raise RequestError(400, "image_url part without an image_url object")
        if len(images) > 1:
            raise RequestError(400, "one image per request (this model takes a single image)")
        question = " ".join(p.text for p in parts if p.type == "text" and p.text).strip()
        if not question:
            raise RequestError(400, "the user message has no text question")
        self._no_placeholders(question)
        # earlier turns keep their text (the conversation so far); the image belongs to the last user turn
        history = []
        for m in req.messages[:users[-1]]:
            if isinstance(m.content, list) and any(p.type == "image_url" for p in m.content):
                raise RequestError(400, "images are accepted in the last user message only")
            text = m.content if isinstance(m.content, str) else " ".join(p.text or "" for p in (m.content or []))
            self._no_placeholders(text)
            history.append(Turn("system" if m.role == "developer" else m.role, text))
        want = req.max_completion_tokens or req.max_tokens or self.cfg.default_max_tokens
        settings = {"max_new_tokens": min(want, self.cfg.max_tokens_cap)}
        if req.temperature:  # temperature 0 / None = greedy
            settings.update(temperature=req.temperature, top_p=req.top_p or 1.0)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > self.cfg.max_stop or any(not x or len(x) > 64 for x in stop):
            raise RequestError(400, f"stop: at most {self.cfg.max_stop} non-empty strings of up to 64 characters")
        settings.update(stop=stop, seed=req.seed)
        settings["image_keys"] = keys = [content_key(p.image_url.url.encode()) for p in images]
        # last: every other check passed. An image whose vision tokens are cached (the same bytes were
        # accepted and encoded before) is not decoded again: the request carries the tokens
        settings["vision"] = [self.decoder.vision_cache.get(k, count_miss=False) for k in keys]
        media = [Media(None) for _ in images]
        # a native model's processor needs the image to lay out the prompt (its token count follows the
        # image's size), so its uploads are always decoded; the cached features still spare the tower
        settings["uploads"] = [(k, p.image_url.url) for k, (p, v) in enumerate(zip(images, settings["vision"]))
                               if v is None or self.native]
        conv = history + [Turn("user", ("<image>\n" if media else "") + question)]
        return Sample(f"req-{uuid.uuid4().hex[:12]}", media, conv), media, settings

    def _check_request(self, req) -> None:
        """What one request may ask, checked before it can join a batch: a value that would fail inside a
        packed step (a temperature of 5e-324 overflowed every row's logits; a seed past 64 bits; a lone
        UTF-16 surrogate the tokenizer cannot encode) fails this request alone, with a 400 naming the field;
        prompts are bounded before tokenisation (a 20 MB text was tokenised to 6.3 M tokens once)."""
        import math
        t = req.temperature
        if t is not None and t != 0 and not (math.isfinite(t) and 0.01 <= t <= 2.0):
            raise RequestError(400, "temperature: 0 (greedy) or between 0.01 and 2")
        if req.top_p is not None and not (math.isfinite(req.top_p) and 0.0 < req.top_p <= 1.0):
            raise RequestError(400, "top_p: above 0 and at most 1")
        if req.seed is not None and not (0 <= req.seed < 2 ** 63):
            raise RequestError(400, "seed: a whole number from 0 to 2**63 - 1")
        if len(req.messages) > self.cfg.max_messages:
            raise RequestError(400, f"messages: at most {self.cfg.max_messages} per request")
        total = 0
        for k, m in enumerate(req.messages):
            texts = [m.content] if isinstance(m.content, str) else [p.text or "" for p in (m.content or [])
                                                                    if p.type == "text"]
            for text in texts:
                total += len(text)
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise RequestError(400, f"messages[{k}].content: not valid Unicode text (a lone surrogate)") \
                        from None
        if total > self.cfg.max_prompt_chars:
            raise RequestError(400, f"messages: {total:,} characters of text, more than the {self.cfg.max_prompt_chars:,} "
                                    "this server accepts")

    def _no_placeholders(self, text: str) -> None:
        """Images come as ``image_url`` parts only: a message text holding the model's image placeholder
        would ask for image features no upload provides (before this check: a 500, and every request
        decoding in the same step failed with it)."""
        hit = next((t for t in self.placeholders if t in text), None)
        if hit:
            raise RequestError(400, f"the text contains the model's image placeholder {hit!r}; send images as "
                                    "image_url parts")
        ctl = next((t for t in self.control_tokens if t in text), None)
        if ctl:  # refused, not tokenised: as text the template would read it as a real turn boundary
            raise RequestError(400, f"the text contains the model's control token {ctl!r} (chat-template markup "
                                    "cannot be sent as message text)")

    def decode_uploads(self, media: list, uploads: list[tuple[int, str]], sample=None, settings=None) -> None:
        """Decode the listed uploads into ``media`` (in place: the Sample holds the same list); for a
        native model also lay out its prompt here (``settings["prompt"]``: the processor resizes and
        patches the image, work that stays off the event loop too)."""
        for k, url in uploads:
            media[k] = self.store.decode(url)[0]
        if self.native is not None and sample is not None:
            settings["prompt"] = self.prompt(sample)

    def prompt(self, sample) -> tuple[list[int], list]:
        """A chat's prompt ids and what the decoder needs per image: the decoded pixels' Media for a
        composed model (its image function runs on a cache miss), the processor's pixels (Qwen2-VL:
        patches and grid) for a native one."""
        if self.native is None:
            return (self.pipe.collator.prompt_ids(sample),
                    [Media(None, modality=m.modality, array=m.array) for m in sample.images])
        nat = self.native
        images = nat._images(sample) or None
        try:
            enc = nat.processor(text=[nat._text(sample, False)], images=images, return_tensors="pt")
        except ValueError as e:  # e.g. Qwen2-VL refuses an aspect ratio over 200
            raise RequestError(400, f"the model's processor cannot take this image: {e}") from None
        items = [{k: enc[k] for k in ("pixel_values", "image_grid_thw") if k in enc}] if images else []  # one image
        return enc["input_ids"][0].tolist(), items

    def _text_ids(self, sample) -> list[int]:
        """The prompt ids of a sample without its pixels (one placeholder token per image)."""
        if self.native is None:
            return self.pipe.collator.prompt_ids(sample)
        return self.native.tok(self.native._text(sample, False))["input_ids"]  # as the processor tokenizes

    def template_prefix(self) -> list[int]:
        """The tokens every default chat prompt starts with (the template's system turn and the
        user turn's opening): the longest common prefix of two prompts that differ only in their
        question, cut before the first image token. The decoder caches their KV."""
        a, b = (self._text_ids(Sample(q, [], [Turn("user", "<image>\n" + q)])) for q in ("Is it", "What"))
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        img = (self.native.model if self.native else self.pipe.model).config.image_token_id
        return a[:a.index(img)] if img in a[:n] else a[:n]

    def gen_request(self, sample, media, settings, on_text=None):
        """The decoder's request for a parsed chat: prompt ids, the images (the decoded pixels stay
        referenced by the request, so the upload can be released at once) and the settings."""
        ids, items = settings.get("prompt") or self.prompt(sample)
        return GenRequest(ids, items, settings["image_keys"],
                          vision=settings.get("vision", []),
                          max_new_tokens=settings["max_new_tokens"], temperature=settings.get("temperature", 0.0),
                          top_p=settings.get("top_p", 1.0), stop=settings["stop"], seed=settings["seed"],
                          on_text=on_text)


def refuse_unsupported(req) -> None:
    """A 400 naming the first OpenAI field the request sets that this server does not implement
    (function calling, structured output, log-probabilities, biases and penalties, audio): answering
    without honouring it would look like success. Values that ask for nothing pass (``tools: []``,
    ``response_format: {"type": "text"}``, ``logprobs: false``, penalties of 0, ``tool_choice: "none"``)."""
    asks = {
        "tools": bool(req.tools), "functions": bool(req.functions),
        "tool_choice": req.tool_choice not in (None, "none"), "function_call": req.function_call not in (None, "none"),
        "response_format": req.response_format not in (None, {}) and (req.response_format or {}).get("type") != "text",
        "logprobs": bool(req.logprobs), "top_logprobs": bool(req.top_logprobs), "logit_bias": bool(req.logit_bias),
        "presence_penalty": bool(req.presence_penalty), "frequency_penalty": bool(req.frequency_penalty),
        "audio": req.audio is not None, "modalities": req.modalities not in (None, ["text"]),
        "prediction": req.prediction is not None,
    }
    so = req.stream_options
    if so is not None and (not isinstance(so, dict) or set(so) - {"include_usage"}):
        raise RequestError(400, "stream_options: only include_usage is supported")
    for name, asked in asks.items():
        if asked:
            raise RequestError(400, f"{name}: not supported by this server (medvl serve answers text chat "
                                    "completions; leave the field out)")

