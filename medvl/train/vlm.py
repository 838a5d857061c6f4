"""The ``vlm`` recipe: supervised training of a VLM — composed (vision tower -> connector ->
LM, :class:`medvl.models.vlm.MedVLM`) or native (a Hugging Face VLM folder, ``native: PATH``)
— on canonical data, through the one trainer engine (:mod:`medvl.train.engine`).

The recipe is four steps: build the data (encoded samples, vision tokens cached once per
distinct image when the tower is frozen), build the model (from an LM config with a BPE
tokenizer trained on the texts, a hub LM, a previous stage's folder, or the native
folder), define one step's loss, and let the engine run it. Stages and per-module
``frozen`` / ``full`` / ``lora`` policies are in :mod:`medvl.train.policy`; the loss is
next-token cross-entropy on assistant tokens only with the LM head run only there
(:func:`medvl.models.answer.answer_logits`), or ClinKD's ``(alpha * KD + CE) / (1 + alpha)``
with a ``distill`` section (:mod:`medvl.distill.teacher`). Packing (optional) is in
:mod:`medvl.data.collate`. MFU counts 6 x non-embedding LM parameters per token.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from medvl.data.collate import VLMCollator, pack, packed_batch
from medvl.data.loading import strip_images
from medvl.data.schema import Media
from medvl.distill.teacher import make_teacher
from medvl.errors import MedvlUserError
from medvl.models.hub import load_model_tokenizer, resolve_model_path
from medvl.train import attention
from medvl.train.config import save_resolved
from medvl.train.engine import Engine, StepResult
from medvl.train.engine.memory import transformer_activations
from medvl.train.policy import apply_composed, check_frozen_random, merge_composed, resolve_policy
from medvl.train.validation import fit_arguments, plan_validation
from medvl.train.vlm_config import VLMTrainConfig  # noqa: F401 - the recipe's config, imported from here too
from medvl.train.vlm_step import VLMStep


def load_init(cfg: VLMTrainConfig):
    """Weights, tokenizer and model config from a previous VLM folder (strict load)."""
    from medvl.models.vlm import load_vlm
    path = resolve_model_path(cfg.init_from)
    model = load_vlm(path).train()
    if cfg.position_gap != getattr(model.config, "position_gap", 0):
        model.config.position_gap = cfg.position_gap
    return model, load_model_tokenizer(path)


def _prepare_composed(cfg: VLMTrainConfig, samples, policy: dict, engine: Engine) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from medvl.models.vlm import image_loader_for

    if cfg.position_gap and cfg.packing:
        raise MedvlUserError("position_gap with packing is not supported: packed rows restart positions per "
                             "sample; turn one of them off")
    if engine.sharded and "lora" in policy.values():
        raise MedvlUserError("LoRA with fsdp is not supported yet; use distributed: ddp")
    texts = [t.text.replace("<image>", " ") for s in samples for t in s.conversation]
    teacher, kd = make_teacher(cfg.distill, cfg.max_length, cfg.precision) if cfg.distill else (None, None)
    if cfg.init_from:
        if cfg.system_prompt is not None:
            raise MedvlUserError("system_prompt shapes a new model's chat template; with init_from the folder's "
                                 "own template is used — leave system_prompt unset")
        model, tok = load_init(cfg)
    else:  # the BPE training is deterministic, so a resume rebuilds the same vocabulary
        from medvl.models.build import build_composed
        model, tok = build_composed(cfg.vision, cfg.connector, cfg.llm, texts, vocab_size=cfg.vocab_size,
                                    position_gap=cfg.position_gap, tokenizer=teacher.tokenizer if teacher else None,
                                    system_prompt=cfg.system_prompt)
    if cfg.init_connector:  # refused with init_from by the config check below
        from medvl.models.hub import resolve_model_path
        from medvl.models.build import load_connector
        load_connector(model, resolve_model_path(cfg.init_connector))
    if not cfg.init_from:
        from medvl.models.vision_towers import is_pretrained
        random_parts = {m for m, trained in (("llm", "source" in cfg.llm), ("vision", is_pretrained(cfg.vision)),
                                             ("connector", bool(cfg.init_connector))) if not trained}
        check_frozen_random(policy, random_parts, cfg.allow_frozen_random)
    built_attention = attention.for_training(model.llm, cfg.attn_implementation, engine.device.type, cfg.max_length)
    apply_composed(model, policy, cfg.lora)
    if cfg.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    collator = VLMCollator(tok, tokens_per_image=model.tokens_per_image, max_length=cfg.max_length)
    encoded = [e for e in (collator.encode(s) for s in samples) if e is not None]
    if teacher is not None:  # the teacher encodes the same samples with its own image-token count
        lost = teacher.prepare([s for s in samples if s.id in {e.id for e in encoded}])
        if lost:
            encoded = [e for e in encoded if e.id not in lost]
            collator.stats.dropped["teacher cannot encode (too long for it / not in the cache)"] = len(lost)
    if not encoded:
        raise MedvlUserError("no training sample survived encoding: " + json.dumps(collator.stats.dropped))
    load = image_loader_for(model)
    cache: dict[str, torch.Tensor] = {}  # frozen tower: its tokens once per distinct image, [N, Dv] each
    bad: set[str] = set()
    frozen = policy["vision"] == "frozen"
    with torch.no_grad():
        for p in tqdm(sorted({m.path for e in encoded for m in e.images}), unit="img", disable=not engine.progress,
                      desc="caching vision tokens" if frozen else "checking images"):
            try:
                x = load(Media(p))[None]
            except MedvlUserError:
                bad.add(p)
                continue
            if frozen:
                model.vision.eval()
                cache[p] = model.vision(x)[0]
    if bad:  # samples whose image does not decode are left out, and counted
        before = len(encoded)
        encoded = [e for e in encoded if not any(m.path in bad for m in e.images)]
        collator.stats.dropped[f"image does not decode ({len(bad)} file(s))"] = before - len(encoded)
        if not encoded:
            raise MedvlUserError("no training image decodes")

    world, G = engine.world, cfg.batch_size * engine.world
    if cfg.packing:  # rows of packed samples; one micro-batch takes rows worth ~batch_size samples
        n_bins = len(pack(encoded, cfg.pack_length, list(range(len(encoded)))))
        rows = max(1, round(cfg.batch_size / max(1.0, len(encoded) / n_bins))) * world
        steps = -(-(n_bins - n_bins % world) // rows)
    else:
        steps = engine.steps_per_epoch(len(encoded))

    def plan(epoch: int) -> list:
        gen = engine.plan_gen
        order = torch.randperm(len(encoded), generator=gen).tolist()
        if cfg.packing:
            bins = pack(encoded, cfg.pack_length, order)
            perm = torch.randperm(len(bins), generator=gen).tolist()
            perm = perm[:len(perm) - len(perm) % world]
            return [[bins[k] for k in perm[j:j + rows]] for j in range(0, len(perm), rows)]
        if cfg.group_by_length:  # sort within windows of 32 global batches, then shuffle the batches
            order = order[:len(order) - len(order) % world]
            grouped = []
            for w in range(0, len(order), 32 * G):
                chunk = sorted(order[w:w + 32 * G], key=lambda i: len(encoded[i].input_ids))
                grouped += [chunk[k:k + G] for k in range(0, len(chunk), G)]
            return [grouped[k] for k in torch.randperm(len(grouped), generator=gen).tolist()]
        return engine.global_batches(order)

    step_module = VLMStep(model, cfg.packing, kd)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def step(batch: list) -> StepResult:
        if cfg.packing:
            rows_ = [[encoded[i] for i in row] for row in batch]
            items = [e for row in rows_ for e in row]  # image order = token order
            enc = packed_batch(rows_, pad)
        else:
            items = [encoded[i] for i in batch]
            enc = collator(items)
        imgs = [m for e in items for m in e.images]
        vt = None
        if imgs:  # [n, N, Dv] cached tokens, or [n, 3, S, S] pixels for a trainable tower
            vt = torch.stack([cache[m.path] for m in imgs]) if cache else torch.stack([load(m) for m in imgs])
        trows = teacher.rows([e.id for e in items]) if teacher is not None else None  # [N, V] or TopK
        loss = engine.module(engine.to_device(enc), engine.to_device(vt), bool(cache), engine.to_device(trows))
        answers = int((enc["labels"][:, 1:] != -100).sum())  # the terms the loss averages
        return StepResult(loss, len(items), sum(len(e.input_ids) for e in items), dict(step_module.parts), answers)

    def export() -> Any:
        from medvl.models.vlm import MedVLM
        out_model = model
        if engine.sharded:  # gather the full weights (every rank) into a plain model on rank 0
            full = engine.full_state_dict()
            if engine.main:
                out_model = MedVLM(model.config)
                out_model.load_state_dict({k.removeprefix("model."): v for k, v in full.items()
                                           if k.startswith("model.")}, strict=True)
        out_model = out_model.cpu().eval()
        merge_composed(out_model, policy)
        attention.set_attention(out_model.llm, built_attention)  # the kernel chosen for training is not the model's
        if policy.get("embeddings") == "frozen" and engine.main:  # leave the source's rows out of the checkpoint
            from medvl.models.source_weights import share_spec
            out_model.config.llm_from_source = share_spec(out_model)
        if engine.main:
            out_model.save_vlm(engine.out / "model")
            tok.save_pretrained(str(engine.out / "model" / "tokenizer"))  # own folder: no model config beside it
            save_resolved(cfg, engine.out / "model" / "recipe.yaml", "vlm")
        return out_model

    n_llm = sum(p.numel() for n, p in model.llm.named_parameters() if "embed" not in n)
    lc = model.llm.config
    act = transformer_activations(cfg.batch_size * cfg.max_length, lc.hidden_size, lc.num_hidden_layers,
                                  cfg.gradient_checkpointing)
    layers = getattr(getattr(model.llm, "model", None), "layers", None) or []
    return {"module": step_module, "shard_units": list(layers), "steps": steps, "plan": plan, "step": step,
            "flops_per_token": 6.0 * n_llm, "export": export, "model": model, "tokenizer": tok, "activation_bytes": act,
            "collator": collator, "dropped": collator.stats.dropped,
            "after_train_mode": model.vision.eval if frozen else None}  # a frozen tower stays in eval mode


def train_vlm(cfg: VLMTrainConfig, train_samples, *, progress: bool = True, native_model=None) -> dict[str, Any]:
    """Run (or resume) the recipe; returns the trained model, tokenizer, collator, the log and counts of
    what was left out. ``native_model``: an already loaded :class:`medvl.models.native.NativeVLM`."""

    policy = resolve_policy(cfg.stage, cfg.freeze)
    engine = Engine(cfg, name="vlm", progress=progress)
    samples = strip_images(train_samples) if cfg.question_only else list(train_samples)
    native = bool(cfg.native or native_model is not None)
    if cfg.init_connector and cfg.init_from:
        raise MedvlUserError("init_connector starts a new model's connector; with init_from the folder's own "
                             "connector is used — leave init_connector unset")
    samples, vplan = plan_validation(cfg.eval, samples, question_only=cfg.question_only, native=native,
                                     progress=engine.progress)
    if native:
        from medvl.train.vlm_native import prepare_native
        job = prepare_native(cfg, samples, policy, engine, native_model)
    else:
        job = _prepare_composed(cfg, samples, policy, engine)
    engine.setup(job["module"], shard_units=job["shard_units"], activation_bytes=job.get("activation_bytes", 0.0))
    res = engine.fit(steps_per_epoch=job["steps"], plan=job["plan"], step=job["step"],
                     flops_per_token=job["flops_per_token"], after_train_mode=job.get("after_train_mode"),
                     desc=f"vlm {cfg.stage}{' (question only)' if cfg.question_only else ''}",
                     **fit_arguments(vplan, job["model"], job["collator"]))
    model = job["export"]()
    return {"model": model, "tokenizer": job["tokenizer"], "collator": job["collator"], "steps": res["steps"],
            "seconds": res["seconds"], "dropped": job["dropped"], "log": res["log"],
            "samples_per_s": res["samples_per_s"], "validation": res["validation"], "best": res["best"],
            **({"trainable": job["trainable"]} if "trainable" in job else {})}


def train_native(vlm, samples, *, epochs: int = 1, batch_size: int = 8, lr: float = 1e-3, precision: str = "bf16",
                 seed: int = 0, output_dir: str | None = None) -> dict[str, Any]:
    """The vlm recipe (sft stage, every module trained) on an already loaded native VLM, for use
    from Python; checkpoints go to ``output_dir`` (a temporary folder by default)."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        cfg = VLMTrainConfig(stage="sft", freeze={"vision": "full"}, epochs=epochs, batch_size=batch_size, lr=lr,
                             precision=precision, seed=seed, output_dir=output_dir or tmp, log_every=1,
                             lr_schedule="constant", warmup_steps=1, clip_grad=0.0)
        res = train_vlm(cfg, samples, progress=False, native_model=vlm)
    return {"losses": [r["loss"] for r in res["log"]], "dropped": sum(res["dropped"].values()),
            "samples_per_s": res["samples_per_s"]}
