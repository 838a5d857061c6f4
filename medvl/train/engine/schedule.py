"""Learning-rate schedules by exact name; each maps (step, total, warmup, peak lr) to the lr.

* ``cosine`` — linear warmup to the peak over ``warmup`` steps, then a half cosine from the
  peak to 0 over the remaining steps (the usual "cosine with warmup",
  transformers' ``get_cosine_schedule_with_warmup``). The clip recipe's default.
* ``ramped_cosine`` — a half cosine over *all* steps multiplied by a linear warmup ramp
  ``min(1, (step + 1) / warmup)``. The vlm recipe's default since its first cut; kept so the
  shipped VLM's recipe reproduces.
* ``constant`` — linear warmup, then the peak.
"""

from __future__ import annotations

import math
from typing import Callable

from medvl.errors import MedvlUserError


def cosine(step: int, total: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def ramped_cosine(step: int, total: int, warmup: int, lr: float) -> float:
    return lr * min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))


def constant(step: int, total: int, warmup: int, lr: float) -> float:
    return lr * min(1.0, (step + 1) / max(1, warmup))


SCHEDULES: dict[str, Callable[[int, int, int, float], float]] = {
    "cosine": cosine, "ramped_cosine": ramped_cosine, "constant": constant}


def get_schedule(name: str) -> Callable[[int, int, int, float], float]:
    if name not in SCHEDULES:
        raise MedvlUserError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    return SCHEDULES[name]
