"""CLIP tasks: zero-shot classification, linear probing, retrieval, feature extraction.

* Zero-shot (open_clip / clip_benchmark recipe): each class is embedded with every prompt
  template, the normalised prompt embeddings are averaged and re-normalised (a prompt
  ensemble), and an image's class probabilities are the softmax of
  ``logit_scale * image @ classes.T``.
* Linear probe: a multinomial logistic regression on frozen, normalised image features,
  trained with L-BFGS in torch (L2 weight chosen on a held-out split of the training
  features), as CLIP's paper evaluates representations.
* Retrieval: the image-text similarity matrix, scored with
  :func:`medvl.eval.classification.retrieval_scores`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from medvl.errors import MedvlUserError

DEFAULT_TEMPLATES = ("a radiology image of the {}.", "a medical image of the {}.", "an image showing the {}.",
                     "{}.")


def check_labels(labels: Sequence[str]) -> list[str]:
    labels = [str(x).strip() for x in labels]
    if not labels:
        raise MedvlUserError("no labels given")
    empty = [i for i, x in enumerate(labels) if not x]
    if empty:
        raise MedvlUserError(f"empty label at position(s) {', '.join(map(str, empty))}")
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise MedvlUserError(f"duplicate label(s): {', '.join(dup)} (each class must be named once)")
    return labels


def check_templates(templates: Sequence[str]) -> list[str]:
    out = [t for t in templates]
    bad = [t for t in out if not t.strip() or "{}" not in t]
    if not out or bad:
        raise MedvlUserError(f"prompt templates must be non-empty and contain '{{}}' for the label; bad: {bad[:3]}")
    return out


@torch.no_grad()
def class_embeddings(model, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
    labels, templates = check_labels(labels), check_templates(templates)
    W = []
    for lab in labels:
        e = model.encode_text([t.format(lab) for t in templates])  # [T, D] normalised
        W.append(torch.nn.functional.normalize(e.mean(dim=0), dim=-1))
    return torch.stack(W)  # [C, D]


@torch.no_grad()
def embed_images(model, images: Sequence, batch_size: int = 64, window=None, progress: bool = False
                 ) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
    """Normalised image embeddings [N_ok, D], the indices that decoded, and the failures
    (index, message) — a corrupt image is reported, never silently dropped."""
    from tqdm.auto import tqdm

    feats, ok, failed = [], [], []
    batch, batch_idx = [], []

    def flush():
        if batch:
            feats.append(model.encode_image(torch.stack(batch)).float().cpu())
            ok.extend(batch_idx)
            batch.clear()
            batch_idx.clear()

    for i, img in enumerate(tqdm(images, desc="embedding images", unit="img", disable=not progress)):
        try:
            batch.append(model.preprocess(img, window=window))
            batch_idx.append(i)
        except MedvlUserError as e:
            failed.append((i, str(e)))
        if len(batch) == batch_size:
            flush()
    flush()
    D = model.config.embed_dim
    return (torch.cat(feats) if feats else torch.zeros(0, D)), ok, failed


@torch.no_grad()
def zero_shot(model, images: Sequence, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
              batch_size: int = 64, window=None, progress: bool = False) -> dict:
    """Probabilities per image (``probs`` [N_ok, C]), predicted labels, failures."""
    W = class_embeddings(model, labels, templates)
    X, ok, failed = embed_images(model, images, batch_size, window, progress)
    logits = model.logit_scale.exp().float() * X @ W.T.float()  # [N, C]
    probs = logits.softmax(dim=-1)
    labels = list(labels)
    return {"labels": labels, "indices": ok, "probs": probs.numpy(),
            "pred": [labels[k] for k in probs.argmax(dim=1).tolist()], "failed": failed}


def linear_probe(train_x: np.ndarray, train_y: Sequence, test_x: np.ndarray,
                 l2_grid: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1), seed: int = 0, max_iter: int = 200) -> dict:
    """Logistic regression on frozen features; returns predictions and class scores for
    ``test_x`` and the chosen L2 weight."""
    classes = sorted(set(train_y))
    y = torch.tensor([classes.index(v) for v in train_y])
    X = torch.as_tensor(train_x, dtype=torch.float32)
    Xt = torch.as_tensor(test_x, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(X), generator=g)
    n_val = max(1, len(X) // 5)
    val, tr = perm[:n_val], perm[n_val:]

    def fit(Xa, ya, l2):
        W = torch.zeros(Xa.shape[1], len(classes), requires_grad=True)
        b = torch.zeros(len(classes), requires_grad=True)
        opt = torch.optim.LBFGS([W, b], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(Xa @ W + b, ya) + l2 * (W ** 2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        return W.detach(), b.detach()

    best, best_acc = l2_grid[0], -1.0
    if len(tr) > 0 and len(set(y[tr].tolist())) > 1:
        for l2 in l2_grid:
            W, b = fit(X[tr], y[tr], l2)
            acc = float(((X[val] @ W + b).argmax(1) == y[val]).float().mean())
            if acc > best_acc:
                best, best_acc = l2, acc
    W, b = fit(X, y, best)
    scores = (Xt @ W + b).softmax(dim=1).numpy()
    return {"classes": classes, "pred": [classes[k] for k in scores.argmax(1)], "scores": scores, "l2": best}


@torch.no_grad()
def similarity(model, images: Sequence, texts: Sequence[str], batch_size: int = 64) -> tuple[np.ndarray, list[int]]:
    X, ok, failed = embed_images(model, images, batch_size)
    if failed:
        raise MedvlUserError(f"{len(failed)} image(s) do not decode, e.g. {failed[0][1]}")
    T = torch.cat([model.encode_text(list(texts[i:i + 256])).float() for i in range(0, len(texts), 256)])
    return (X @ T.T).numpy(), ok


def read_labels(spec: Sequence[str], warn=None) -> list[str]:
    """Labels from the command line: one per argument, a single comma list, or @file (one per line).

    Several arguments are several labels, each kept whole — ``--labels "face, sinuses, and neck"
    chest`` is two classes, as VQA-Med's organ answers need. Only a lone argument is split at
    its commas (``--labels head,chest,abdomen``), and ``warn`` is told when that split happened,
    so a single label with a comma can be passed as ``@file`` instead. An empty label (a stray
    comma) is refused; repeated labels are refused where the classes are checked.
    """
    warn = warn or (lambda msg: None)
    out: list[str] = []
    for s in spec:
        if s.startswith("@"):
            p = Path(s[1:])
            if not p.exists():
                raise MedvlUserError("label file not found", path=p)
            out += [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        elif len(spec) == 1 and "," in s:
            parts = [x.strip() for x in s.split(",")]
            warn(f"--labels {s!r} split at its commas into {len(parts)} labels; to keep a label with a comma, "
                 "pass each label as its own argument or one per line in @FILE")
            out += parts
        else:
            out.append(s.strip())  # one argument, one label: a comma inside belongs to it
    empty = [i for i, x in enumerate(out) if not x]
    if empty:
        raise MedvlUserError(f"--labels: empty label at position {empty[0] + 1} (a stray comma?)")
    return out
