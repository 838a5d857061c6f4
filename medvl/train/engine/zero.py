"""DeepSpeed ZeRO as the engine's third distribution mode (``distributed: deepspeed``).

The recipe's keys stay the single source of truth: medvl writes them into the DeepSpeed
config (``train_micro_batch_size_per_gpu`` = batch_size, ``gradient_accumulation_steps`` =
grad_accum, ``train_batch_size``, ``gradient_clipping`` = clip_grad, ``bf16.enabled`` =
precision is bf16, ZeRO stage 2 unless the config says otherwise) and refuses a config that
contradicts them, or that brings its own optimizer or scheduler (the engine's AdamW and
``lr_schedule`` drive every mode; DeepSpeed takes the AdamW as a client optimizer). The
config is ``deepspeed: {config: ds.json}`` or the DeepSpeed keys inline
(``deepspeed: {zero_optimization: {stage: 3}}``).

Checkpoints are DeepSpeed's own (``checkpoints/deepspeed/<tag>/``, every rank writes its
partition, ``latest`` names the complete tag), with the loop position, every rank's RNG and
the run's identity in its client state and beside it in ``identity.json``; the exported
model's weights are the fp32 master weights consolidated from that checkpoint
(``zero_to_fp32``), so ZeRO-2 and ZeRO-3 export the same full model a single process would.
Chosen over accelerate's DeepSpeed plugin: one call (``deepspeed.initialize``) and no second
launcher or config layer to keep in step (measured simpler here; see docs/architecture.md).
On CPU DeepSpeed JIT-compiles its shared-memory collective once (about a minute, cached in
``~/.cache/torch_extensions``).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from medvl.errors import MedvlUserError


def ensure_env() -> None:
    """Outside torchrun, the environment DeepSpeed's process group needs for one process."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def init() -> None:
    try:
        import deepspeed
    except ImportError:
        raise MedvlUserError("distributed: deepspeed needs DeepSpeed: pip install 'medvl[dist]'") from None
    ensure_env()
    import torch
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def build_config(cfg, world: int) -> dict[str, Any]:
    section = dict(getattr(cfg, "deepspeed", None) or {})
    if "config" in section:
        path = Path(section.pop("config"))
        if not path.exists():
            raise MedvlUserError("DeepSpeed config not found", path=path)
        try:
            loaded = json.loads(path.read_text())
        except ValueError as e:
            raise MedvlUserError(f"DeepSpeed config is not valid JSON ({e})", path=path) from None
        section = {**loaded, **section}
    for key in ("optimizer", "scheduler"):
        if key in section:
            raise MedvlUserError(f"the DeepSpeed config has a {key!r} section: medvl's engine sets the optimizer "
                                 "(AdamW: lr, weight_decay) and the schedule (lr_schedule); remove it")
    want = {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
            "train_batch_size": cfg.batch_size * cfg.grad_accum * world}
    for key, value in want.items():
        if key in section and section[key] not in (value, "auto"):
            raise MedvlUserError(f"the DeepSpeed config says {key}={section[key]} but the recipe gives {value} "
                                 f"(batch_size={cfg.batch_size}, grad_accum={cfg.grad_accum}, {world} process(es)); "
                                 "make them agree or drop the key from the DeepSpeed config")
    precision = cfg.precision
    if precision == "auto":  # the engine resolves it first; a direct call resolves it for this machine
        import torch

        from medvl.models.precision import resolve_precision
        precision = resolve_precision("auto", "cuda" if torch.cuda.is_available() else "cpu")
    bf16 = precision == "bf16"
    if (section.get("fp16") or {}).get("enabled"):
        raise MedvlUserError("the DeepSpeed config enables fp16; medvl trains in bf16 or fp32 (precision=...)")
    if "bf16" in section and bool(section["bf16"].get("enabled")) != bf16:
        raise MedvlUserError(f"the DeepSpeed config has bf16.enabled={section['bf16'].get('enabled')} but the "
                             f"recipe's precision is {precision}")
    if "gradient_clipping" in section and cfg.clip_grad and section["gradient_clipping"] != cfg.clip_grad:
        raise MedvlUserError(f"the DeepSpeed config clips gradients at {section['gradient_clipping']}, the recipe "
                             f"at clip_grad={cfg.clip_grad}")
    zero = dict(section.get("zero_optimization") or {})
    zero.setdefault("stage", 2)
    if zero["stage"] not in (0, 1, 2, 3):
        raise MedvlUserError(f"zero_optimization.stage must be 0-3, got {zero['stage']!r}")
    return {**section, **want, "zero_optimization": zero, "bf16": {"enabled": bf16},
            "gradient_clipping": section.get("gradient_clipping", cfg.clip_grad or 0.0),
            "steps_per_print": section.get("steps_per_print", 10**9), "wall_clock_breakdown": False}


def initialize(module, optimizer, ds_config: dict):
    """DeepSpeed's engine and optimizer. 0-dim parameters (CLIP's logit scale) become 1-element vectors
    first — DeepSpeed's initial broadcast cannot view a 0-dim tensor as bytes; the forward broadcasts
    them the same — and :func:`full_state_dict` gives them their shape back. Returns (engine, optimizer,
    names of those parameters)."""
    import deepspeed
    scalars = [n for n, p in module.named_parameters() if p.dim() == 0]
    for n, p in module.named_parameters():
        if p.dim() == 0:
            p.data = p.data.reshape(1)
    engine, opt, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    return engine, opt, scalars


def save(engine, folder: Path, tag: str, client_state: dict, identity: dict, rank: int) -> None:
    """DeepSpeed's checkpoint (a collective), then identity.json; older tags removed on rank 0."""
    import shutil

    import torch.distributed as dist
    engine.save_checkpoint(str(folder), tag=tag, client_state=client_state)
    dist.barrier()
    if rank == 0:
        tmp = folder / "identity.json.tmp"
        tmp.write_text(json.dumps(identity))
        tmp.replace(folder / "identity.json")
        for old in folder.iterdir():
            if old.is_dir() and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load(engine, folder: Path) -> dict:
    _, client = engine.load_checkpoint(str(folder))
    if client is None:
        raise MedvlUserError("the DeepSpeed checkpoint could not be loaded; remove it to start over", path=folder)
    return client


def full_state_dict(folder: Path, rank: int, scalars: list[str] = ()) -> dict:
    """The fp32 weights consolidated from the latest checkpoint (rank 0; {} elsewhere), 0-dim
    parameters back in their shape."""
    if rank != 0:
        return {}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    sd = get_fp32_state_dict_from_zero_checkpoint(str(folder))
    for n in scalars:
        if n in sd:
            sd[n] = sd[n].reshape(())
    return sd
