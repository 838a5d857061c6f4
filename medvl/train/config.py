"""Typed recipe configs: dataclasses as the single source of truth, one YAML per recipe,
dotted ``key=value`` overrides on the command line (lingua / torchtune practice), and the
resolved config written next to every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from medvl.errors import MedvlUserError

T = TypeVar("T")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise MedvlUserError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where) if len(args) == 1 else value
    if tp in (int, float) and isinstance(value, str):
        try:
            return tp(value)
        except ValueError:
            raise MedvlUserError(f"{where}: {value!r} is not a {tp.__name__}") from None
    if tp is bool and isinstance(value, str):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise MedvlUserError(f"{where}: {value!r} is not a boolean")
    if tp is float and isinstance(value, int):
        return float(value)
    if origin in (list, tuple) and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise MedvlUserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    out = json.loads(json.dumps(data))
    for ov in overrides:
        if "=" not in ov:
            raise MedvlUserError(f"override {ov!r} is not key=value (dotted keys, e.g. optim.lr=1e-4)")
        key, raw = ov.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:  # a number indexes a list (data.sources.0.path=...)
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise MedvlUserError(f"override {ov!r}: {p} is not an index of a list of {len(node)}")
                node = node[int(p)]
            else:
                node = node.setdefault(p, {})
            if not isinstance(node, (dict, list)):
                raise MedvlUserError(f"override {ov!r}: {p} is not a section")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise MedvlUserError(f"override {ov!r}: {last} is not an index of a list of {len(node)}")
            node[int(last)] = value
        else:
            node[last] = value
    return out


def load_recipe(cls: type[T], path: str | Path, overrides: list[str] = ()) -> T:
    path = Path(path)
    if not path.exists():
        raise MedvlUserError("recipe not found", path=path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise MedvlUserError(f"malformed YAML ({e})", path=path) from None
    data.pop("recipe", None)
    return from_dict(cls, apply_overrides(data, list(overrides)), where=path.name)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_resolved(cfg: Any, path: str | Path, recipe: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump({"recipe": recipe, **to_dict(cfg)}, sort_keys=False))


@dataclasses.dataclass
class TrainerConfig:
    """What the trainer engine (:mod:`medvl.train.engine`) reads. Every recipe config extends
    it, so these keys mean the same in every recipe YAML."""

    epochs: int = 10
    batch_size: int = 32
    """samples per micro-batch on each process (global batch = batch_size x grad_accum x processes)"""
    grad_accum: int = 1
    """micro-batches whose gradients are summed before one optimizer step"""
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    lr_schedule: str = "cosine"
    """cosine | ramped_cosine | constant (medvl.train.engine.schedule)"""
    max_steps: int = 0
    """the run's length in optimizer steps (0: all epochs) — the LR schedule's horizon; a later run with
    a larger max_steps resumes and stretches the schedule to it"""
    clip_grad: float = 0.0
    """clip the global gradient norm to this (0: off)"""
    precision: str = "auto"
    """bf16 (autocast on CPU or CUDA), fp32, or auto: bf16 where the device computes it natively (CUDA with
    bf16, a CPU with AMX / AVX512-BF16), fp32 elsewhere — on an AVX2-only CPU bf16 is emulated and a
    training step ran ~100x slower than fp32 (measured: the quickstart, 40 s/step). Resolved when the run
    starts; the resolved recipe records which"""
    seed: int = 0
    output_dir: str = "runs/train"
    log_every: int = 20
    save_every_epochs: int = 1
    """write the resumable checkpoint every N epochs (and always at the end)"""
    save_every_steps: int = 0
    """also write it every N optimizer steps (0: off) — for long epochs"""
    stop_after_epochs: int = 0
    """end this run after N epochs (checkpoint kept; a rerun resumes) — for time-boxed jobs"""
    stop_after_steps: int = 0
    """end this run after N optimizer steps, mid-epoch if need be (checkpoint kept; a rerun resumes at the
    same batch; the schedule is unchanged)"""
    distributed: str = "ddp"
    """under torchrun: ddp (replicated model), fsdp (FSDP2: parameters, gradients and optimizer state
    sharded; fsdp_sharding full = ZeRO-3, grad_op = ZeRO-2; the recipe's layers are the shard units) or
    deepspeed (DeepSpeed ZeRO, stage from the deepspeed section, 2 by default; also in one process)"""
    fsdp_sharding: str = "full"
    deepspeed: dict = dataclasses.field(default_factory=dict)
    """with distributed: deepspeed — {config: ds.json} or DeepSpeed keys inline, e.g. {zero_optimization:
    {stage: 3}}; batch, accumulation, clipping and precision come from the recipe (contradictions refused)"""
    peak_gflops: float = 0.0
    """the device's peak for MFU (0: on CPU 205 for bf16, 88 for fp32 — measured on the project's 2-core
    machine; on CUDA no MFU unless set)"""
    threads: int = 0
    """torch threads (0: leave torch's default)"""


#: TrainerConfig fields that do not change what a run computes (left out of a checkpoint's identity)
NOT_IDENTITY = ("output_dir", "log_every", "stop_after_epochs", "stop_after_steps", "max_steps", "save_every_epochs",
                "save_every_steps", "threads")
