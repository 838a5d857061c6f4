"""What trains: stages as per-module policies (``frozen`` / ``full`` / ``lora``), applied to a
composed VLM's ``vision`` / ``connector`` / ``llm`` or, by parameter names, to a native one.

* ``align`` — connector only (LLaVA stage 1 / MedM-VL pretrain);
* ``sft`` — connector + LM (LLaVA stage 2 / MedM-VL finetune);
* ``vision-tune`` — vision tower + connector, LM frozen (medcap).

``freeze: {llm: lora}`` overrides a stage's entry; ``freeze: {embeddings: frozen}`` keeps a
composed VLM's token embeddings (and a tied output head) as they came — for a pretrained LM
they then stay equal to its source, so a saved model need not carry them
(:meth:`medvl.models.vlm.MedVLM.save_vlm`); LoRA goes through peft
(``get_peft_model``; a ``target_modules`` that matches nothing is an error, not a silent
no-op) and is merged at export so the saved model loads without peft.
"""

from __future__ import annotations

from medvl.errors import MedvlUserError

STAGES = {"align": {"vision": "frozen", "connector": "full", "llm": "frozen"},
          "sft": {"vision": "frozen", "connector": "full", "llm": "full"},
          "vision-tune": {"vision": "full", "connector": "full", "llm": "frozen"}}
MODULES = ("vision", "connector", "llm")


def resolve_policy(stage: str, overrides: dict) -> dict[str, str]:
    if stage not in STAGES:
        raise MedvlUserError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    policy = {**STAGES[stage], **overrides}
    emb = policy.pop("embeddings", None)
    if emb not in (None, "frozen", "full"):
        raise MedvlUserError(f"freeze.embeddings must be frozen or full, got {emb!r}")
    for name in policy:
        if name not in MODULES:
            raise MedvlUserError(f"freeze: unknown module {name!r} (vision, connector, llm, embeddings)")
        if policy[name] not in ("frozen", "full", "lora"):
            raise MedvlUserError(f"freeze.{name} must be frozen, full or lora, got {policy[name]!r}")
    if emb:
        policy["embeddings"] = emb
    return policy


def check_frozen_random(policy: dict[str, str], random_parts: set[str], allowed: bool) -> None:
    """Refuse to freeze a module that was never trained: a frozen random LM (or tower) stays noise for the
    whole run and the loss only teaches the other parts to work around it — nothing says so in the
    numbers. ``allow_frozen_random: true`` lets a recipe do it on purpose (a smoke test, an ablation)."""
    frozen = sorted(m for m in random_parts if policy.get(m) in ("frozen", "lora"))  # LoRA freezes the base too
    if not frozen or allowed:
        return
    hints = {"llm": "give a pretrained LM (llm.source=smollm2-135m-instruct, or a hub id / folder)",
             "vision": "give a pretrained tower (vision.source=...)",
             "connector": "start it from a trained VLM (init_connector=...)"}
    what = " and ".join(frozen)
    raise MedvlUserError(f"this recipe freezes the {what} (frozen or LoRA), which would start from random weights and stay random; "
                         f"{'; '.join(hints[m] for m in frozen)}, start from a trained VLM (init_from=...), train "
                         f"it (freeze.{frozen[0]}=full), or set allow_frozen_random=true if this is intended")


def with_lora(module, lora: dict, name: str):
    """``module`` wrapped by peft with LoRA adapters (its base weights frozen)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise MedvlUserError("LoRA needs peft: pip install 'medvl[train]'") from None
    cfg = LoraConfig(r=int(lora.get("r", 8)), lora_alpha=int(lora.get("alpha", 16)),
                     lora_dropout=float(lora.get("dropout", 0.0)), target_modules=lora.get("target_modules"))
    try:
        return get_peft_model(module, cfg)
    except ValueError as e:
        raise MedvlUserError(f"LoRA on {name}: target_modules {lora.get('target_modules')!r} match no layer "
                             f"({str(e)[:120]})") from None


def apply_composed(model, policy: dict[str, str], lora: dict) -> None:
    """Set requires_grad per module of a composed VLM; wrap ``lora`` modules with adapters."""
    for name in MODULES:
        for p in getattr(model, name).parameters():
            p.requires_grad = policy[name] == "full"
        if policy[name] == "lora":
            setattr(model, name, with_lora(getattr(model, name), lora, name))
    if "embeddings" in policy:  # after LoRA wrapping: peft freezes the base; this decides the embeddings
        for m in (model.llm.get_input_embeddings(), model.llm.get_output_embeddings()):
            for p in (m.parameters() if m is not None else ()):
                p.requires_grad = policy["embeddings"] == "full"


def merge_composed(model, policy: dict[str, str]) -> None:
    """Merge LoRA adapters into the weights: a plain model, no peft needed to load it."""
    for name in MODULES:
        if policy[name] == "lora":
            setattr(model, name, getattr(model, name).merge_and_unload())


def trained_in_full(model, full: set[str]) -> list[str]:
    """The fewest module names whose parameters are exactly the ``full`` ones (the highest modules
    all of whose parameters train), for peft's ``modules_to_save``: so the saved adapter carries
    every module trained in full (a connector, an unfrozen tower) and base + adapter through plain
    peft *is* the trained model. Parameters directly on the root module cannot be named and are
    refused."""
    names: list[str] = []
    covered: set[str] = set()
    for name, module in model.named_modules():
        if not name or any(name.startswith(c + ".") for c in covered):
            continue
        params = [f"{name}.{n}" for n, _ in module.named_parameters()]
        if params and all(p in full for p in params):
            names.append(name)
            covered.add(name)
    left = full - {p for c in covered for p in full if p.startswith(c + ".")}
    if left:
        raise MedvlUserError(f"parameters trained in full outside any module ({', '.join(sorted(left)[:3])}): peft "
                             "cannot save them beside the adapter; use lora.export: merged")
    return names


def apply_native(model, policy: dict[str, str], lora: dict | None = None):
    """frozen / full / lora per module of a native HF VLM, by parameter names
    (:func:`medvl.models.native.module_of`). LoRA adapters go on the Linear layers of the ``lora``
    modules whose full name matches ``lora.target_modules`` (a regex, or a list of exact names);
    one peft wrapper covers every such module, and ``full`` modules stay trainable beside it, named in
    the adapter's ``modules_to_save`` (:func:`trained_in_full`) so the saved adapter is the trained model.
    Returns (the model — peft-wrapped when LoRA is on —, trainable parameter count per module)."""
    import re

    from torch import nn

    from medvl.models.native import module_of
    if "embeddings" in policy:
        raise MedvlUserError("freeze.embeddings is for composed VLMs; a native model's embeddings follow freeze.llm")
    for name, p in model.named_parameters():
        p.requires_grad = policy.get(module_of(name), "full") == "full"
    parts = sorted(m for m in MODULES if policy.get(m) == "lora")
    if parts:
        lora = dict(lora or {})
        spec = lora.get("target_modules") or r".*\.(q_proj|k_proj|v_proj|o_proj)$"
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and module_of(n) in parts]
        if isinstance(spec, str):
            targets = [n for n in linears if re.fullmatch(spec, n)]
        else:
            targets = [n for n in linears if n in set(spec) or n.rsplit(".", 1)[-1] in set(spec)]
        if not targets:
            examples = ", ".join(linears[:4]) or "none"
            raise MedvlUserError(f"LoRA on {'/'.join(parts)}: target_modules {spec!r} match no Linear layer of this "
                                 f"native model (its Linear layers there are named like: {examples})")
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise MedvlUserError("LoRA needs peft: pip install 'medvl[train]'") from None
        full = {n for n, p in model.named_parameters() if p.requires_grad}
        save = trained_in_full(model, full)
        model = get_peft_model(model, LoraConfig(r=int(lora.get("r", 8)), lora_alpha=int(lora.get("alpha", 16)),
                                                 lora_dropout=float(lora.get("dropout", 0.0)), target_modules=targets,
                                                 modules_to_save=save or None))
        for n, p in model.named_parameters():  # peft froze everything but the adapters and modules_to_save
            if n.removeprefix("base_model.model.") in full:
                p.requires_grad = True
    counts = {"vision": 0, "connector": 0, "llm": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            counts[module_of(name)] += p.numel()
    return model, counts
