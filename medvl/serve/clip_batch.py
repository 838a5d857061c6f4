"""Batched CLIP work for the server: zero-shot and embedding requests that arrive together share
one image-tower call and one text-tower call.

A batch is a list of items ``{"kind": "zero-shot", "pixels", "labels"}`` or
``{"kind": "embed", "texts", "pixels"}`` (``pixels``: ``[n, 3, S, S]``, already preprocessed by
:meth:`ClipRunner.pixels` in the request's own worker thread, so an image the CLIP cannot use
is that request's 400 before it joins a batch, and the batch's thread runs only the towers);
the result for each is its probabilities / vectors. The class embeddings of a label set (the
prompt ensemble of :func:`medvl.harness.zero_shot.class_embeddings`, every prompt of every label
in one text call) are cached by label set, least recently used evicted past ``max_label_sets``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch

from medvl.errors import MedvlUserError
from medvl.harness.zero_shot import DEFAULT_TEMPLATES
from medvl.serve.uploads import RequestError


class ClipRunner:
    def __init__(self, clip, max_label_sets: int = 256):
        self.clip = clip
        self.class_cache: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()
        self.max_label_sets = max_label_sets

    @torch.no_grad()
    def class_embeddings(self, labels: Sequence[str]) -> torch.Tensor:
        key = tuple(labels)
        W = self.class_cache.get(key)
        if W is not None:
            self.class_cache.move_to_end(key)
            return W
        T = len(DEFAULT_TEMPLATES)
        e = self.clip.encode_text([t.format(lab) for lab in labels for t in DEFAULT_TEMPLATES]).float()  # [C*T, D]
        W = torch.nn.functional.normalize(e.view(len(labels), T, -1).mean(1), dim=-1)  # [C, D]
        self.class_cache[key] = W
        while len(self.class_cache) > self.max_label_sets:
            self.class_cache.popitem(last=False)
        return W

    def pixels(self, images: Sequence[Any], window=None) -> torch.Tensor:
        """Decoded images -> the tower's input ``[n, 3, S, S]``; raises RequestError (400) for an
        image it cannot use. Called in the request's worker thread, before batching: resizing and
        normalising run beside the tower instead of inside its batch."""
        S = self.clip.config.image_size
        try:
            px = [self.clip.preprocess(img, window=window) for img in images]
        except MedvlUserError as e:
            raise RequestError(400, f"cannot use the image: {e}") from None
        return torch.stack(px) if px else torch.zeros(0, 3, S, S)

    @torch.no_grad()
    def __call__(self, items: Sequence[dict]) -> list[Any]:
        out: list[Any] = [None] * len(items)
        counts = [len(it["pixels"]) for it in items]
        pixels = torch.cat([it["pixels"] for it in items]) if sum(counts) else None  # [n, 3, S, S]
        feats = self.clip.encode_image(pixels).float() if pixels is not None else None  # [n, D], normalised
        by_item = list(torch.split(feats, counts)) if feats is not None else [[] for _ in items]
        texts = sorted({t for it in items if it["kind"] == "embed" for t in it["texts"]})
        tvec = dict(zip(texts, self.clip.encode_text(texts).float())) if texts else {}
        scale = float(self.clip.logit_scale.exp())
        for k, it in enumerate(items):
            if it["kind"] == "zero-shot":
                W = self.class_embeddings(it["labels"])
                out[k] = (scale * by_item[k][0] @ W.T).softmax(-1).tolist()
            else:
                out[k] = {"texts": [tvec[t].tolist() for t in it["texts"]],
                          "images": [v.tolist() for v in by_item[k]]}
        return out
