"""The trainer engine beneath every recipe: :class:`Engine` (the loop), :mod:`.dist`
(process groups, DDP / FSDP2), :mod:`.checkpoint` (atomic, exact resume), :mod:`.logger`
(metrics.jsonl, TensorBoard, plot), :mod:`.schedule` (LR schedules by name), :mod:`.validate` (scores at
epoch ends, the best epoch kept)."""

from medvl.train.engine.loop import Engine, StepResult

__all__ = ["Engine", "StepResult"]
