"""The trainer engine: one loop beneath every recipe.

A recipe builds its data and model and says what one step computes; :class:`Engine` does
the rest, identically for the clip and vlm recipes and for composed and native VLMs:

* distribution (:mod:`.dist`: DDP or FSDP2 under torchrun; :mod:`.zero`: DeepSpeed ZeRO), CPU or
  CUDA, the device;
* precision (bf16 autocast), gradient accumulation (no gradient sync on inner micro-batches),
  gradient clipping, the LR schedule by name (:mod:`.schedule`), AdamW;
* the data plan: the recipe returns an epoch's **global** batches (the same on every rank,
  drawn from one generator seeded alike everywhere) and each rank takes its slice
  ``batch[rank::world]``, so 1 and N processes see the same global batches;
* atomic checkpoints with exact resume (:mod:`.checkpoint`), the run's identity checked;
* logging (:mod:`.logger`): tqdm, metrics.jsonl, TensorBoard, the loss plot; samples/s,
  tokens/s and MFU — from the recipe's FLOPs per token when it gives them (6 x LM parameters
  for the VLM), otherwise counted once with ``torch.utils.flop_counter`` on the first step.

Two generators are checkpointed with the rest: ``plan_gen`` (data order; same seed on every
rank) and ``rank_gen`` (per-sample randomness such as augmentation; seed + rank).
References: torchtune's recipe/trainer split, open_clip_train's loop, lingua's checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

import medvl.train.engine.checkpoint as checkpoint
import medvl.train.engine.dist as dist
import medvl.train.engine.memory as memory
from medvl.errors import MedvlUserError
from medvl.models.precision import resolve_precision
from medvl.train.config import NOT_IDENTITY, TrainerConfig
from medvl.train.engine.logger import MetricsLogger
from medvl.train.engine.schedule import get_schedule


@dataclass
class StepResult:
    """What a recipe's step returns for one micro-batch."""
    loss: torch.Tensor
    samples: int
    tokens: int = 0
    logs: dict[str, float] = field(default_factory=dict)
    """extra scalars for the log (loss parts such as kd / ce)"""
    weight: float | None = None
    """how many terms ``loss`` averages (answer tokens). Given, the engine weights each rank's loss by its
    share of the global count, so N processes compute the gradient of the global mean, as one process
    with the whole batch would (ranks hold different numbers of answer tokens)"""


class Engine:
    def __init__(self, cfg: TrainerConfig, *, name: str, progress: bool = True, ignore_keys: Sequence[str] = ()):
        self.cfg = cfg
        self.name = name
        self.ds = cfg.distributed == "deepspeed"
        if self.ds:  # DeepSpeed makes the process group (one process too)
            import medvl.train.engine.zero as zero
            zero.init()
        self.rank, self.world, local = dist.init()
        self.device = dist.device(local)
        self.main = self.rank == 0
        self.progress = progress and self.main
        self.ignore_keys = set(NOT_IDENTITY) | set(ignore_keys)
        if cfg.precision not in ("bf16", "fp32", "auto"):
            raise MedvlUserError(f"precision must be bf16, fp32 or auto, got {cfg.precision!r}")
        cfg.precision = resolve_precision(cfg.precision, str(self.device))  # auto -> what this device computes
        if cfg.grad_accum < 1 or cfg.batch_size < 1:
            raise MedvlUserError("batch_size and grad_accum must be at least 1")
        get_schedule(cfg.lr_schedule)
        if self.world > 1 or self.ds:
            dist.check_mode(cfg.distributed, cfg.fsdp_sharding)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.plan_gen = torch.Generator().manual_seed(cfg.seed)
        self.rank_gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * self.rank)
        self.out = Path(cfg.output_dir)
        self.module: nn.Module | None = None
        self.opt: torch.optim.Optimizer | None = None

    # -- set-up -------------------------------------------------------------------------------
    @property
    def sharded(self) -> bool:
        """Whether the exported weights must be gathered (FSDP shards, DeepSpeed's ZeRO partitions and
        fp32 master weights) through :meth:`full_state_dict` instead of read off the model."""
        return self.ds or (self.world > 1 and self.cfg.distributed == "fsdp")

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def to_device(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(self.device, non_blocking=True)
        if isinstance(x, dict):
            return {k: self.to_device(v) for k, v in x.items()}
        if isinstance(x, tuple) and hasattr(x, "_fields"):  # a NamedTuple of tensors (top-k teacher rows)
            return type(x)(*(self.to_device(v) for v in x))
        if isinstance(x, (list, tuple)):
            return type(x)(self.to_device(v) for v in x)
        return x

    def setup(self, module: nn.Module, *, shard_units: Sequence[nn.Module] = (),
              param_groups: Callable[[nn.Module], list] | None = None, activation_bytes: float = 0.0) -> nn.Module:
        """Move the step module to the device, wrap it for the distribution mode and build AdamW
        over its trainable parameters (``param_groups(module)`` for custom groups, called after
        wrapping: FSDP replaces parameters by their shards). Prints the memory estimate first
        (:mod:`.memory`; ``activation_bytes`` from the recipe, per micro-batch)."""
        self.memory = memory.estimate(module, world=self.world, mode=self.cfg.distributed,
                                      sharding=self.cfg.fsdp_sharding, activations=activation_bytes)
        if self.progress:
            have = memory.device_memory(self.device)
            print(f"{self.name}: {self.memory.line()}" + (f"; this GPU has {have / memory.GB:.1f} GB" if have else ""))
            if have and self.memory.total > 0.9 * have:
                print(f"{self.name}: warning: that is over 90% of the GPU; " +
                      memory.oom_advice(self.cfg, self.memory, 0).split("; try: ", 1)[1])
        module = module.to(self.device)
        if not self.ds:
            module = dist.wrap(module, self.cfg.distributed, self.world, shard_units, self.cfg.fsdp_sharding,
                               self.device)
        groups = param_groups(module) if param_groups else [p for p in module.parameters() if p.requires_grad]
        if not groups:
            raise MedvlUserError("nothing to train: every module is frozen")
        self.opt = torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.module = module
        if self.ds:  # DeepSpeed takes the AdamW as its client optimizer and wraps both
            import medvl.train.engine.zero as zero
            self.module, self.opt, self._ds_scalars = zero.initialize(module, self.opt,
                                                                      zero.build_config(self.cfg, self.world))
        return self.module

    def global_batches(self, order: list, batch_size: int | None = None) -> list[list]:
        """An epoch's order cut into global batches of batch_size x world, the tail trimmed to a
        multiple of world so every rank takes the same number of samples."""
        g = (batch_size or self.cfg.batch_size) * self.world
        order = order[:len(order) - len(order) % self.world]
        return [order[i:i + g] for i in range(0, len(order), g)]

    def steps_per_epoch(self, n_items: int) -> int:
        """Micro-batches per epoch for ``n_items`` samples cut by :meth:`global_batches`."""
        return math.ceil((n_items - n_items % self.world) / (self.cfg.batch_size * self.world))

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, *, steps_per_epoch: int, plan: Callable[[int], list], step: Callable[[Any], StepResult],
            unit: str = "samples", flops_per_token: float | None = None,
            after_step: Callable[[], None] | None = None, after_train_mode: Callable[[], Any] | None = None,
            desc: str | None = None, evaluate: Callable[[], dict[str, float]] | None = None, eval_every: int = 1,
            eval_metric: str = "", keep_best: bool = False) -> dict[str, Any]:
        """Run (or resume) the loop. ``plan(epoch)`` returns the epoch's global micro-batches (lists;
        it draws from ``self.plan_gen``); ``step(local_batch)`` returns a :class:`StepResult`;
        ``after_step`` runs after each optimizer step, ``after_train_mode`` after ``module.train()``
        (to keep frozen parts in eval mode). ``evaluate`` scores the model every ``eval_every`` epochs and
        after the last; ``keep_best`` ends the run on the weights of the epoch best by ``eval_metric``
        (:mod:`.validate`)."""
        from tqdm.auto import tqdm

        cfg, module, opt = self.cfg, self.module, self.opt
        if module is None or opt is None:
            raise RuntimeError("Engine.setup() must run before fit()")
        accum = cfg.grad_accum
        opt_steps = math.ceil(steps_per_epoch / accum)
        total = cfg.max_steps or opt_steps * cfg.epochs
        schedule = get_schedule(cfg.lr_schedule)
        params = [p for g in opt.param_groups for p in g["params"]]
        identity = {"run": {k: v for k, v in asdict(cfg).items() if k not in self.ignore_keys},
                    "engine": {"world": self.world,
                               "distributed": cfg.distributed if self.world > 1 or self.ds else "single"},
                    "defaults": checkpoint.field_defaults(cfg)}
        ckpt = self.out / "checkpoints" / "last.pt"
        pos = {"step": 0, "epoch": 0, "offset": 0, "plan": None}
        ds_dir = self.out / "checkpoints" / "deepspeed"
        resumed = ckpt.exists() or (ds_dir / "identity.json").exists()
        if resumed:
            if ckpt.exists():
                st = checkpoint.load(ckpt, identity)  # also refuses a DeepSpeed run resuming a torch checkpoint
                checkpoint.restore(st, module, opt, self.sharded)
            else:
                old = json.loads((ds_dir / "identity.json").read_text())
                checkpoint.check_identity(old, json.loads(json.dumps(identity)), ds_dir / "identity.json")
                import medvl.train.engine.zero as zero
                st = zero.load(module, ds_dir)
            checkpoint.set_rng_state(st["rng"][self.rank], self._gens())
            pos = st["pos"]
            if self.progress:
                print(f"{self.name}: resumed from {ckpt} at step {pos['step']} (epoch {pos['epoch']})")
        logger = MetricsLogger(self.out, fresh=not resumed, enabled=self.main,
                               resume_step=pos["step"] if resumed else None)
        val = None
        if evaluate is not None:
            if self.sharded:
                raise MedvlUserError("validation during training (eval) needs the whole model on one process: "
                                     "use one process or distributed: ddp, or score the exported model afterwards")
            from medvl.train.engine.validate import Validator
            val = Validator(evaluate, every=eval_every, metric=eval_metric, keep_best=keep_best, out=self.out,
                            main=self.main, world=self.world, tb=logger.tb)
            val.start(fresh=not resumed)
        peak = (cfg.peak_gflops or (0.0 if self.device.type == "cuda" else 205.0 if cfg.precision == "bf16" else 88.0)) * 1e9
        bar = tqdm(total=total, initial=pos["step"], desc=desc or self.name, unit="step", disable=not self.progress)
        t0, seen, tokens, epochs_run, last, first = time.perf_counter(), 0, 0, 0, {}, (1e-9, 0, 0)
        stop_at = pos["step"] + cfg.stop_after_steps if cfg.stop_after_steps else total
        stop_at = min(stop_at, total)
        flops_per_sample = None
        saved_at, warm = -1, False
        window: list[tuple[float, dict]] = []  # (loss, parts) of each step since the last log line
        module.train()
        if after_train_mode is not None:
            after_train_mode()
        while pos["step"] < stop_at:
            if pos["plan"] is None:
                pos["plan"], pos["offset"] = plan(pos["epoch"]), 0
                if len(pos["plan"]) != steps_per_epoch:
                    raise RuntimeError(f"plan has {len(pos['plan'])} batches, steps_per_epoch says {steps_per_epoch}")
            batches = pos["plan"]
            while pos["offset"] < len(batches) and pos["step"] < stop_at:
                micro = batches[pos["offset"]:pos["offset"] + accum]
                lr = schedule(pos["step"], total, cfg.warmup_steps, cfg.lr)
                for g in opt.param_groups:
                    g["lr"] = lr
                count = flops_per_token is None and flops_per_sample is None
                counter = _flop_counter() if count else contextlib.nullcontext()
                losses, parts, n_s, n_t = [], {}, 0, 0
                with counter, self._oom_guard(pos["step"]):
                    for i, mb in enumerate(micro):
                        last_micro = i == len(micro) - 1
                        if self.ds:  # DeepSpeed accumulates and steps itself, on the boundary we give it
                            module.set_gradient_accumulation_boundary(last_micro)
                            with self.autocast():
                                res = step(mb[self.rank::self.world])
                            module.backward(self._scaled(res) / len(micro), scale_wrt_gas=False)
                            module.step()
                        else:
                            with dist.no_sync(module, cfg.distributed, self.world, skip=not last_micro):
                                with self.autocast():
                                    res = step(mb[self.rank::self.world])
                                (self._scaled(res) / len(micro)).backward()
                        losses.append(float(res.loss.detach()))
                        n_s, n_t = n_s + res.samples, n_t + res.tokens
                        for k, v in res.logs.items():
                            parts[k] = parts.get(k, 0.0) + v / len(micro)
                if count:
                    flops_per_sample = counter.get_total_flops() / max(1, n_s) if counter is not None else 0.0
                if not self.ds:
                    if cfg.clip_grad:
                        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)  # FSDP: over all shards (DTensors)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                if after_step is not None:
                    after_step()
                pos["step"] += 1
                pos["offset"] += len(micro)
                seen, tokens = seen + n_s * self.world, tokens + n_t * self.world
                if not warm:  # throughput leaves out the run's first step (warm-up, FLOP counting) ...
                    warm, first = True, (time.perf_counter() - t0, seen, tokens)
                    t0, seen, tokens = time.perf_counter(), 0, 0
                bar.update(1)
                window.append((sum(losses) / len(losses), parts))
                if pos["step"] % cfg.log_every == 0 or pos["step"] == total:
                    # the loss and its parts are means over the steps since the last line (as the HF Trainer
                    # logs them), not the one step that lands on the line: one batch of long open answers
                    # would read as a spike
                    el, ns, nt = _meter(t0, seen, tokens, first)
                    mean = {k: sum(w[1].get(k, 0.0) for w in window) / len(window) for k in parts}
                    last = {"step": pos["step"], "epoch": pos["epoch"], "loss": sum(w[0] for w in window) / len(window),
                            "lr": lr, f"{unit}_per_s": ns / el, **({"tokens_per_s": nt / el} if nt else {}), **mean}
                    window.clear()
                    done = flops_per_token * nt if flops_per_token is not None else (flops_per_sample or 0) * ns
                    if peak and done:
                        last["mfu"] = done / el / peak / self.world
                    logger.log(last)
                    bar.set_postfix(loss=f"{last['loss']:.3f}", **{f"{unit}_s": f"{ns / el:.1f}"})
                if cfg.save_every_steps and pos["step"] % cfg.save_every_steps == 0:
                    self._save(ckpt, pos, identity)
                    saved_at = pos["step"]
            if pos["offset"] >= len(batches):  # the epoch is complete
                pos.update(epoch=pos["epoch"] + 1, offset=0, plan=None)
                epochs_run += 1
                if val is not None and val.due(pos["epoch"], final=pos["step"] >= total):
                    say = bar.write if self.progress else (lambda _: None)
                    val.run(module, pos, after_train_mode, say)  # before the save: pos carries the best
                if pos["epoch"] % cfg.save_every_epochs == 0:
                    self._save(ckpt, pos, identity)
                    saved_at = pos["step"]
                if cfg.stop_after_epochs and epochs_run >= cfg.stop_after_epochs:
                    break  # every rank stops at the same epoch
        if val is not None and pos["step"] >= total and pos.get("validated_at") != pos["step"]:
            val.run(module, pos, after_train_mode, bar.write if self.progress else (lambda _: None))  # max_steps
        bar.close()
        el, ns, nt = _meter(t0, seen, tokens, first)
        loop_seconds = time.perf_counter() - t0 + first[0]
        if saved_at != pos["step"]:
            self._save(ckpt, pos, identity)  # a max_steps stop resumes from here
        if val is not None and pos["step"] >= total:
            val.restore_best(module, pos, print if self.progress else (lambda _: None))
        logger.close()
        dist.barrier(self.world)
        return {"steps": pos["step"], "epoch": pos["epoch"], "seconds": loop_seconds,
                "total_seconds": time.perf_counter() - t0 + first[0],
                "log": logger.records, "last": last, "samples_per_s": ns / el, "tokens_per_s": nt / el,
                "resumed": resumed, "finished": pos["step"] >= total,
                "validation": val.records if val is not None else [], "best": pos.get("best")}

    def _scaled(self, res: StepResult) -> torch.Tensor:
        """The rank's loss weighted by its share of the micro-batch's global weight (x world: the
        gradient all-reduce averages over ranks)."""
        if res.weight is None or self.world == 1:
            return res.loss
        import torch.distributed as tdist
        n = torch.tensor([float(res.weight)], dtype=torch.float64, device=self.device)
        tdist.all_reduce(n)
        return res.loss * (float(res.weight) * self.world / max(float(n), 1.0))

    @contextlib.contextmanager
    def _oom_guard(self, step: int):
        """A CUDA out-of-memory error becomes one message that says which knob to turn."""
        try:
            yield
        except torch.cuda.OutOfMemoryError:
            from medvl.train.engine.memory import oom_advice
            raise MedvlUserError(oom_advice(self.cfg, getattr(self, "memory", None), step)) from None

    def _gens(self) -> dict[str, torch.Generator]:
        return {"plan": self.plan_gen, "rank": self.rank_gen}

    def _save(self, path: Path, pos: dict, identity: dict) -> None:
        rng = dist.gather_objects(checkpoint.rng_state(self._gens()), self.world)
        if self.ds:
            import medvl.train.engine.zero as zero
            zero.save(self.module, path.parent / "deepspeed", f"step{pos['step']}",
                      {"pos": dict(pos), "identity": identity, "rng": rng}, json.loads(json.dumps(identity)),
                      self.rank)
            return
        checkpoint.save(path, self.module, self.opt, self.sharded, self.rank,
                        {"pos": dict(pos), "identity": identity}, rng)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The step module's full weights (gathered under FSDP: every rank must call it; under DeepSpeed the
        fp32 master weights consolidated from the final checkpoint, on rank 0)."""
        if self.ds:
            import medvl.train.engine.zero as zero
            return zero.full_state_dict(self.out / "checkpoints" / "deepspeed", self.rank, self._ds_scalars)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True,
                                                                          cpu_offload=self.world > 1))


def _meter(t0: float, seen: int, tokens: int, first: tuple) -> tuple[float, int, int]:
    """(seconds, samples, tokens) since the first step, or of the first step when it is the only one."""
    if seen:
        return max(time.perf_counter() - t0, 1e-9), seen, tokens
    return max(first[0], 1e-9), first[1], first[2]


def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    return FlopCounterMode(display=False)
