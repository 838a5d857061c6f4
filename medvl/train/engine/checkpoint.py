"""Atomic training checkpoints with exact resume.

One file, ``<output_dir>/checkpoints/last.pt``, written to a temporary name and renamed (a
killed run never leaves half a checkpoint). It holds the step module's and the optimizer's
state — plain ``state_dict()`` for one process and DDP; under FSDP2 through
``torch.distributed.checkpoint.state_dict`` with the shards **gathered** into full tensors (one
portable file in the same layout, at the cost of one gather per save) — the loop's position
(step, epoch, micro-batch offset and the epoch's batch plan, so a mid-epoch stop resumes at
the same batch), every rank's RNG states (torch, CUDA, numpy, Python and the recipe's data
generators), and the run's identity: the recipe fields that change the result, the world
size and the distribution mode. Resuming another run, world size or mode is refused with a
message saying what differs; nothing is overwritten.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvl.errors import MedvlUserError


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
          "gens": {k: g.get_state() for k, g in generators.items()}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    for k, g in generators.items():
        g.set_state(st["gens"][k])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True, strict=strict)


def module_and_optim_state(module: torch.nn.Module, opt: torch.optim.Optimizer, sharded: bool) -> tuple[dict, dict]:
    """Full state dicts; under FSDP gathered (a collective every rank must join)."""
    if not sharded:
        return getattr(module, "module", module).state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import get_state_dict
    return get_state_dict(module, opt, options=_options())


def save(path: Path, module, opt, sharded: bool, rank: int, payload: dict[str, Any], rng: list) -> None:
    msd, osd = module_and_optim_state(module, opt, sharded)
    if rank != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"module": msd, "optimizer": osd, "rng": rng, **payload}, tmp)
    os.replace(tmp, path)


def load(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint, after checking it belongs to this run (raises a user error otherwise)."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise MedvlUserError(f"cannot read the checkpoint ({type(e).__name__}: {str(e)[:120]}); remove it to "
                             "start over", path=path) from None
    check_identity(st.get("identity") or {}, identity, path)
    return st


def field_defaults(cfg) -> dict[str, Any]:
    """A recipe dataclass's default values by field name (what a key absent from an older checkpoint meant)."""
    import dataclasses
    out = {}
    for f in dataclasses.fields(cfg):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        if dataclasses.is_dataclass(out.get(f.name)):  # as asdict(cfg) writes a nested section
            out[f.name] = dataclasses.asdict(out[f.name])
    return out


def check_identity(old: dict[str, Any], identity: dict[str, Any], path: Path) -> None:
    """Raise a user error when a checkpoint's identity is not this run's (engine, world size, recipe)."""
    if old.get("engine") != identity["engine"]:
        raise MedvlUserError(f"the checkpoint was written with {old.get('engine')} and this run is "
                             f"{identity['engine']}: resume with the same number of processes and distribution "
                             "mode, or use another output_dir", path=path)
    run, before, defaults = identity["run"], old.get("run") or {}, identity.get("defaults") or {}
    # a recipe key added in a later release, left at its default, does not make an older checkpoint another run
    diff = sorted(k for k in set(run) | set(before) if before.get(k) != run.get(k)
                  and not (k not in before and k in defaults and run.get(k) == defaults[k]))
    if diff:
        raise MedvlUserError(f"{path.parent.parent} holds a checkpoint of a different run (differs in: "
                             f"{', '.join(diff)}); use another output_dir or remove it", path=path)


def restore(st: dict[str, Any], module, opt, sharded: bool) -> None:
    if not sharded:
        getattr(module, "module", module).load_state_dict(st["module"])  # strict
        opt.load_state_dict(st["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import set_state_dict
    # strict=False only because a trainable parameter that never got a gradient has no optimizer
    # state; the model's keys are checked here instead
    bad = set_state_dict(module, opt, model_state_dict=st["module"], optim_state_dict=st["optimizer"],
                         options=_options(strict=False))
    if bad.missing_keys or bad.unexpected_keys:
        raise MedvlUserError(f"the checkpoint does not match the model: missing {sorted(bad.missing_keys)[:5]}, "
                             f"unexpected {sorted(bad.unexpected_keys)[:5]}")
