"""Validation during training: score the model at epoch ends and keep the best weights.

The recipe supplies ``evaluate() -> {metric: value}`` (higher is better; the vlm recipe
generates answers to held-out questions and scores them, :mod:`medvl.train.validation`);
the engine calls it every ``every`` epochs and after the last one, on rank 0 with the model
in eval mode, and appends each result to ``validation.jsonl`` (and TensorBoard, ``val/...``)
beside ``metrics.jsonl``. With ``keep_best`` the trainable weights (and every buffer) of the
best-scoring epoch so far are written to ``checkpoints/best.pt`` and, when the run ends, put
back into the model the recipe exports: the early stopping by validation score that
small-data fine-tuning needs (a VQA-RAD model reaches a training loss near 0.02 by its last
epochs, memorising; the HF Trainer's ``load_best_model_at_end`` does the same). Where the best
epoch stands is part of the resumable checkpoint (``pos["best"]``), so a resumed run compares
against the same record.

One process or DDP: rank 0 evaluates while the others wait at a barrier (a long evaluation
must fit the process group's timeout). FSDP and DeepSpeed shard the weights, which
generation on one rank cannot read; they are refused with a message.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import medvl.train.engine.dist as dist


class Validator:
    def __init__(self, evaluate: Callable[[], dict[str, float]], *, every: int, metric: str, keep_best: bool,
                 out: Path, main: bool, world: int, tb=None):
        self.evaluate, self.every, self.metric, self.keep_best = evaluate, max(1, int(every)), metric, keep_best
        self.path = out / "validation.jsonl"
        self.best_path = out / "checkpoints" / "best.pt"
        self.main, self.world, self.tb = main, world, tb
        self.records: list[dict] = []

    def start(self, fresh: bool) -> None:
        if self.main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if fresh or not self.path.exists():
                self.path.write_text("")
            else:  # a resumed run keeps its history
                self.records = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]

    def due(self, epoch: int, final: bool) -> bool:
        return final or epoch % self.every == 0

    def run(self, module: nn.Module, pos: dict, after_train_mode: Callable | None, write: Callable[[str], None]) -> None:
        """Score the model now (epoch ``pos["epoch"]`` just ended, or a ``max_steps`` run stopped inside it);
        log it; keep it if it is the best."""
        pos["validated_at"] = pos["step"]  # every rank: the loop's end asks whether the last weights were scored
        if self.main:
            inner = dist.unwrap(module)
            inner.eval()
            t0 = time.perf_counter()
            with torch.no_grad():
                scores = {k: float(v) for k, v in self.evaluate().items()}
            module.train()
            if after_train_mode is not None:
                after_train_mode()
            if self.metric not in scores:
                from medvl.errors import MedvlUserError
                raise MedvlUserError(f"validation metric {self.metric!r} is not among the scores "
                                     f"({', '.join(sorted(scores))}); set eval.metric to one of them")
            rec = {"step": pos["step"], "epoch": pos["epoch"], **scores, "seconds": time.perf_counter() - t0}
            best = pos.get("best")
            better = best is None or scores[self.metric] > best["value"]
            if better:
                pos["best"] = {"epoch": pos["epoch"], "step": pos["step"], "metric": self.metric,
                               "value": scores[self.metric]}
                if self.keep_best:
                    self._save_best(inner)
            rec["best"] = better
            self.records.append(rec)
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.tb is not None:
                for k, v in scores.items():
                    self.tb.add_scalar(f"val/{k}", v, pos["step"])
            shown = ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
            write(f"validation after epoch {pos['epoch']}: {shown}" + ("  (best so far)" if better else
                  f"  (best: {self.metric} {pos['best']['value']:.3f} after epoch {pos['best']['epoch']})"))
        dist.barrier(self.world)

    def _save_best(self, inner: nn.Module) -> None:
        """The weights that training changes (trainable parameters) and every buffer, atomically."""
        params = dict(inner.named_parameters(remove_duplicate=False))  # tied weights under each name
        state = {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()
                 if k not in params or params[k].requires_grad}  # persistent buffers, trainable parameters
        self.best_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.best_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.best_path)

    def restore_best(self, module: nn.Module, pos: dict, write: Callable[[str], None]) -> None:
        """Put the best epoch's weights back (rank 0, which exports), unless the last epoch was the best."""
        best = pos.get("best")
        if not (self.keep_best and self.main and best) or not self.best_path.exists():
            return
        if best["step"] == pos["step"]:
            write(f"the last epoch ({best['epoch']}) scored best on validation: keeping it")
            return
        inner = dist.unwrap(module)
        missing = inner.load_state_dict(torch.load(self.best_path, map_location="cpu"), strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"{self.best_path} does not fit this model: {missing.unexpected_keys[:3]}")
        write(f"keeping the weights of epoch {best['epoch']} ({best['metric']} {best['value']:.3f} on validation), "
              f"not the last epoch's")
