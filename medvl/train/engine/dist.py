"""Process groups and model wrapping: the only place medvl touches ``torch.distributed``
(the contrastive loss's feature gather aside, where the maths needs it).

Launch with ``torchrun`` (multi-node by its own flags); ranks come from its environment.
Backends: NCCL on CUDA, gloo on CPU — both tested on CPU with 2 processes. Modes:

* ``ddp`` — ``DistributedDataParallel`` over the recipe's step module (replicated weights).
* ``fsdp`` — FSDP2 (``fully_shard``): each of the recipe's shard units (decoder layers) and
  then the step module become shard groups; ``fsdp_sharding: full`` reshards parameters after
  forward (ZeRO-3), ``grad_op`` keeps them gathered until backward (ZeRO-2).

References: PyTorch DDP and FSDP2 docs; torchtune's ``shard_model`` (layer-wise units).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterable

import torch
from torch import nn

from medvl.errors import MedvlUserError

MODES = ("ddp", "fsdp", "deepspeed")


def init() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
    return rank, world, local


def device(local_rank: int) -> torch.device:
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def check_mode(mode: str, sharding: str) -> None:
    if mode not in MODES:
        raise MedvlUserError(f"distributed must be one of {', '.join(MODES)}, got {mode!r}")
    if sharding not in ("full", "grad_op"):
        raise MedvlUserError(f"fsdp_sharding must be full or grad_op, got {sharding!r}")


def wrap(module: nn.Module, mode: str, world: int, shard_units: Iterable[nn.Module] = (),
         sharding: str = "full", dev: torch.device | None = None) -> nn.Module:
    """The step module wrapped for ``mode`` (unchanged in a single process)."""
    if world == 1:
        return module
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        reshard = sharding == "full"
        for unit in shard_units:
            fully_shard(unit, reshard_after_forward=reshard)
        fully_shard(module, reshard_after_forward=reshard)
        return module
    from torch.nn.parallel import DistributedDataParallel
    ids = [dev.index] if dev is not None and dev.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)  # DDP keeps the module in .module; FSDP2 shards in place


@contextlib.contextmanager
def no_sync(module: nn.Module, mode: str, world: int, skip: bool):
    """Accumulate gradients locally on micro-batches that are not the last of a step."""
    if world == 1 or not skip:
        yield
    elif mode == "fsdp":
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        with module.no_sync():
            yield


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def gather_objects(obj: Any, world: int) -> list:
    """Every rank's ``obj`` (a collective: every rank must call it)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out

