"""Image controls for VQA: does a model's answer depend on the image it is shown?

A model that scores the same with another image, or with none, has learned the questions'
priors, not the images. Two controls, as in the VQA literature's "blind" baselines
(Goyal et al., CVPR 2017, on VQA v1's language priors) and the shuffled-image checks of
medical VQA papers:

* ``shuffled`` — every sample gets the images of another sample of the same set, never its own
  image (VQA-RAD asks several questions of one image: a question may not get back its own
  image through another question), by a seeded permutation: the image statistics stay those
  of the set, only the pairing is broken.
* ``blank`` — every image replaced by a zero image of the same kind (2D 256 x 256, or a
  32 x 128 x 128 volume), held in memory (``Media.array``): the model's answer from the
  question and its own priors alone.

The score of the real images minus each control's is the image's contribution; ``medvl
predict --image-control`` writes the control's predictions for ``medvl eval vqa``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from medvl.data.imageio import MedicalImage
from medvl.data.schema import Media, Sample
from medvl.errors import MedvlUserError

CONTROLS = ("shuffled", "blank")


def _key(s: Sample) -> tuple:
    return tuple(m.path for m in s.images)


def shuffled_images(samples: Sequence[Sample], seed: int = 0) -> list[Sample]:
    """Each sample with another sample's images (never an identical image set); seeded."""
    idx = [i for i, s in enumerate(samples) if s.images]
    if len({_key(samples[i]) for i in idx}) < 2:
        raise MedvlUserError("--image-control shuffled needs samples with at least two different images")
    rng = np.random.default_rng(seed)
    perm = list(rng.permutation(idx))
    keys = {i: _key(samples[i]) for i in idx}
    for pos, i in enumerate(idx):  # repair collisions by swapping with a position where both then differ
        if keys[perm[pos]] != keys[i]:
            continue
        for other in rng.permutation(len(idx)):
            j = idx[other]
            if keys[perm[other]] != keys[i] and keys[perm[pos]] != keys[j]:
                perm[pos], perm[other] = perm[other], perm[pos]
                break
        else:
            raise MedvlUserError("--image-control shuffled: one image is shared by too many samples to shuffle them")
    out = list(samples)
    for pos, i in enumerate(idx):
        donor = samples[perm[pos]]
        out[i] = replace(samples[i], images=[replace(m) for m in donor.images])
    return out


def blank_images(samples: Sequence[Sample]) -> list[Sample]:
    """Each image replaced by zeros of its kind, in memory (nothing written)."""
    blank = {"image": np.zeros((256, 256), np.float32), "volume": np.zeros((32, 128, 128), np.float32)}
    return [replace(s, images=[Media(None, kind=m.kind, modality=m.modality,
                                     array=MedicalImage(blank.get(m.kind, blank["image"]), m.kind, modality=m.modality))
                               for m in s.images]) for s in samples]


def image_control(samples: Sequence[Sample], mode: str, seed: int = 0) -> list[Sample]:
    if mode == "shuffled":
        return shuffled_images(samples, seed)
    if mode == "blank":
        return blank_images(samples)
    raise MedvlUserError(f"unknown image control {mode!r}; choose one of {', '.join(CONTROLS)}")
