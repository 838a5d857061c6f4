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

from medvl.data.textfile import read_text
from medvl.errors import MedvlUserError

T = TypeVar("T")


#: the largest recipe file read, and the most YAML aliases it may use (a "billion laughs" document
#: expands a few aliases into gigabytes when the recipe is copied or printed)
MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_ALIASES = 100


class _LimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no ``!!python/`` tags) that refuses documents with many aliases."""

    def compose_node(self, parent, index):  # noqa: D102 - counts alias events as they are composed
        if self.check_event(yaml.AliasEvent):
            self.n_aliases = getattr(self, "n_aliases", 0) + 1
            if self.n_aliases > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases (*name): refused")
        return super().compose_node(parent, index)


#: the most values a recipe may hold once its aliases are expanded
MAX_YAML_VALUES = 100_000


def _expanded_size(node: Any, memo: dict) -> int:
    """How many values ``node`` holds with every alias expanded (shared objects counted once per use)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if isinstance(node, dict):
        n = 1 + sum(_expanded_size(v, memo) for v in node.values())
    elif isinstance(node, list):
        n = 1 + sum(_expanded_size(v, memo) for v in node)
    else:
        n = 1
    memo[key] = n
    return n


def load_yaml(text: str, where: str | Path) -> Any:
    """YAML from a recipe or an override value, safely: no code (a safe loader), at most
    :data:`MAX_YAML_ALIASES` aliases and :data:`MAX_YAML_VALUES` values once they are expanded (a few
    nested aliases — "billion laughs" — expand to gigabytes when the recipe is copied or saved)."""
    try:
        data = yaml.load(text, Loader=_LimitedLoader)  # noqa: S506 - _LimitedLoader is a SafeLoader
        if isinstance(data, (dict, list)) and _expanded_size(data, {}) > MAX_YAML_VALUES:
            raise MedvlUserError(f"more than {MAX_YAML_VALUES:,} values once its aliases are expanded: refused",
                                 path=str(where))
        return data
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split())
        raise MedvlUserError(f"malformed YAML ({msg[:200]})", path=str(where)) from None
    except RecursionError:
        raise MedvlUserError("YAML nested too deeply", path=str(where)) from None


def closest(name: str, known) -> str:
    """" (did you mean 'x'?)" for the known name closest to a typo, or ""."""
    import difflib
    near = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` as the field type ``tp``, or one line naming the key, what it got and what it needs."""
    import math
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise MedvlUserError(f"{where}: expected a mapping (key: value, ...), got {value!r}")
        return from_dict(tp, value, where)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where) if len(args) == 1 else value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise MedvlUserError(f"{where}: {value!r} is not a boolean (true / false)")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise MedvlUserError(f"{where}: {value!r} is not a whole number")
        try:
            f = float(value)
        except ValueError:
            raise MedvlUserError(f"{where}: {value!r} is not a whole number") from None
        if not math.isfinite(f) or f != int(f):
            raise MedvlUserError(f"{where}: {value!r} is not a whole number")
        return int(f)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise MedvlUserError(f"{where}: {value!r} is not a number")
        try:
            return float(value)
        except ValueError:
            raise MedvlUserError(f"{where}: {value!r} is not a number") from None
    if tp is str:
        if value is None:  # `key=` on the command line: empty
            return ""
        if isinstance(value, (dict, list)):
            raise MedvlUserError(f"{where}: expected a single value (text), got {value!r}"[:300])
        return str(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise MedvlUserError(f"{where}: expected a mapping (key: value, ...), got {value!r}"[:300])
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise MedvlUserError(f"{where}: expected a list, got {value!r}"[:300])
        return list(value)
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    if not isinstance(data, dict):
        raise MedvlUserError(f"{where}: expected a mapping (key: value, ...), got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - names)
    if unknown:
        raise MedvlUserError(f"{where}: unknown key {unknown[0]!r}{closest(unknown[0], names)}"
                             + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                             + f"; known: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if callable(check):
        check(where)
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    out = json.loads(json.dumps(data))
    for ov in overrides:
        if "=" not in ov:
            raise MedvlUserError(f"override {ov!r} is not key=value (dotted keys, e.g. optim.lr=1e-4)")
        key, raw = ov.split("=", 1)
        try:
            value = load_yaml(raw, f"override {key}")
        except MedvlUserError as e:
            if "malformed YAML" not in str(e):
                raise
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
    data = read_recipe(path)
    data.pop("recipe", None)
    return from_dict(cls, apply_overrides(data, list(overrides)), where=Path(path).name)


def read_recipe(path: str | Path) -> dict:
    """A recipe file's mapping: a regular UTF-8 file under 1 MB, safe YAML, a mapping at the top."""
    path = Path(path)
    if not path.exists():
        raise MedvlUserError("recipe not found", path=path)
    data = load_yaml(read_text(path, max_bytes=MAX_RECIPE_BYTES), path) or {}
    if not isinstance(data, dict):
        raise MedvlUserError(f"a recipe is a mapping of keys (recipe: vlm, epochs: 3, ...), got a "
                             f"{type(data).__name__} at the top level", path=path)
    return data


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
    """passes over the training data"""
    batch_size: int = 32
    """samples per micro-batch on each process (global batch = batch_size x grad_accum x processes)"""
    grad_accum: int = 1
    """micro-batches whose gradients are summed before one optimizer step"""
    lr: float = 1e-3
    """peak learning rate of AdamW (> 0)"""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay"""
    warmup_steps: int = 50
    """optimizer steps of linear warm-up before the schedule"""
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
    """seeds data order, initialisation, dropout and sampling (runs with one seed repeat exactly)"""
    output_dir: str = "runs/train"
    """where the run writes model/, checkpoints/, metrics.jsonl, the loss curve; a rerun resumes"""
    log_every: int = 20
    """optimizer steps between logged loss lines"""
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
    """with distributed: fsdp — full (ZeRO-3) or grad_op (ZeRO-2)"""
    deepspeed: dict = dataclasses.field(default_factory=dict)
    """with distributed: deepspeed — {config: ds.json} or DeepSpeed keys inline, e.g. {zero_optimization:
    {stage: 3}}; batch, accumulation, clipping and precision come from the recipe (contradictions refused)"""
    peak_gflops: float = 0.0
    """the device's peak for MFU (0: on CPU 205 for bf16, 88 for fp32 — measured on the project's 2-core
    machine; on CUDA no MFU unless set)"""
    threads: int = 0
    """torch threads (0: leave torch's default)"""

    def check(self, where: str = "recipe") -> None:
        """Ranges the engine relies on, checked once when the recipe is read (one line naming the key)."""
        import math

        def bad(key: str, need: str) -> None:
            raise MedvlUserError(f"{where}.{key} = {getattr(self, key)!r}: {need}")
        for key in ("epochs", "batch_size", "grad_accum", "log_every"):
            if getattr(self, key) < 1:
                bad(key, "must be at least 1")
        for key in ("warmup_steps", "max_steps", "save_every_epochs", "save_every_steps", "stop_after_epochs",
                    "stop_after_steps", "threads"):
            if getattr(self, key, 0) < 0:
                bad(key, "must be 0 or more")
        if not (math.isfinite(self.lr) and self.lr > 0):
            bad("lr", "must be a finite number above 0")
        for key in ("weight_decay", "clip_grad", "peak_gflops"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                bad(key, "must be a finite number, 0 or more")


#: TrainerConfig fields that do not change what a run computes (left out of a checkpoint's identity)
NOT_IDENTITY = ("output_dir", "log_every", "stop_after_epochs", "stop_after_steps", "max_steps", "save_every_epochs",
                "save_every_steps", "threads")
