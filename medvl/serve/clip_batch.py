"""Batched CLIP work for the server: zero-shot and embedding requests that arrive together share
one image-tower call and one text-tower call.

A batch is a list of items ``{"kind": "zero-shot", "image", "labels", "window"}`` or
``{"kind": "embed", "texts", "images"}``; the result for each is its probabilities / vectors,
or a :class:`medvl.serve.uploads.RequestError` for that item alone (one undecodable DICOM
does not fail the others). The class embeddings of a label set (the prompt ensemble of
:func:`medvl.eval.zero_shot.class_embeddings`, every prompt of every label in one text call)
are cached by label set, least recently used evicted past ``max_label_sets``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch

from medvl.eval.zero_shot import DEFAULT_TEMPLATES
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

    @torch.no_grad()
    def __call__(self, items: Sequence[dict]) -> list[Any]:
        from medvl.errors import MedvlUserError
        out: list[Any] = [None] * len(items)
        pixels, where = [], []  # where[j] = (item, image index)
        for k, it in enumerate(items):
            imgs = [it["image"]] if it["kind"] == "zero-shot" else it["images"]
            try:
                px = [self.clip.preprocess(img, window=it.get("window")) for img in imgs]
            except MedvlUserError as e:
                out[k] = RequestError(400, f"cannot use the image: {e}")
                continue
            pixels += px
            where += [(k, j) for j in range(len(px))]
        feats = self.clip.encode_image(torch.stack(pixels)).float() if pixels else None  # [n, D], normalised
        by_item: dict[int, list[torch.Tensor]] = {}
        for (k, _), f in zip(where, feats if feats is not None else []):
            by_item.setdefault(k, []).append(f)
        texts = sorted({t for it in items if it["kind"] == "embed" for t in it["texts"]})
        tvec = dict(zip(texts, self.clip.encode_text(texts).float())) if texts else {}
        scale = float(self.clip.logit_scale.exp())
        for k, it in enumerate(items):
            if out[k] is not None:
                continue
            if it["kind"] == "zero-shot":
                W = self.class_embeddings(it["labels"])
                out[k] = (scale * by_item[k][0] @ W.T).softmax(-1).tolist()
            else:
                out[k] = {"texts": [tvec[t].tolist() for t in it["texts"]],
                          "images": [v.tolist() for v in by_item.get(k, [])]}
        return out
