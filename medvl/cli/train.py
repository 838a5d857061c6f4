"""``medvl train RECIPE.yaml key=value ...``: run a recipe (the YAML's ``recipe:`` names it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from medvl.errors import MedvlUserError

RECIPES = ("clip", "vlm", "vlm-distill")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run a training recipe (YAML) with key=value overrides")
    p.add_argument("recipe", nargs="?", help="recipes/<name>.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. epochs=2 data.path=...")
    p.add_argument("--keys", metavar="KIND", help="print every key a recipe of this kind (vlm, clip) takes, with "
                   "its type, default and what it does, and exit")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    if args.keys:
        from medvl.train.keys import recipe_keys
        print(recipe_keys(args.keys))
        return 0
    if not args.recipe:
        raise MedvlUserError("give a recipe (recipes/<name>.yaml), or --keys vlm|clip for the keys recipes take")
    from medvl.data.textfile import check_output_path
    from medvl.train.config import read_recipe
    path = Path(args.recipe)
    kind = read_recipe(path).get("recipe")
    if kind not in RECIPES:
        raise MedvlUserError(f"recipe: {kind!r} is not a known recipe ({', '.join(RECIPES)})", path=path)
    from medvl.train.config import load_recipe
    if kind in ("vlm", "vlm-distill"):  # vlm-distill: the vlm recipe with a distill section (ClinKD)
        from medvl.data.loading import load_training_samples
        from medvl.train.vlm import VLMTrainConfig, train_vlm
        cfg = load_recipe(VLMTrainConfig, path, args.overrides)
        check_output_path(cfg.output_dir, folder=True)  # before minutes of data preparation
        if kind == "vlm-distill" and not cfg.distill:
            raise MedvlUserError("a vlm-distill recipe needs a distill section (teacher or teacher_cache)", path=path)
        samples, skipped = load_training_samples(cfg.data)
        for k, v in skipped.items():
            print(f"note: {v} record(s) left out ({k})")
        if cfg.reflect:
            from medvl.train.reflect import run_reflective
            res = run_reflective(cfg, samples)
            cfg.output_dir = str(Path(cfg.output_dir) / f"round{len(res['reflection'])}")
        else:
            res = train_vlm(cfg, samples)
        if res["dropped"]:
            print("note: left out while encoding: " + ", ".join(f"{v} {k}" for k, v in res["dropped"].items()))
        if res.get("validation"):
            print(f"validation scores per epoch: {cfg.output_dir}/validation.jsonl")
        print(f"done: {res['steps']} steps, model in {cfg.output_dir}/model")
        return 0
    from medvl.train.clip import ClipTrainConfig, train_clip
    cfg = load_recipe(ClipTrainConfig, path, args.overrides)
    check_output_path(cfg.output_dir, folder=True)
    res = train_clip(cfg)
    print(f"done: {res['steps']} steps, model in {res['model_dir']}")
    return 0
