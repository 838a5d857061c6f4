"""``medvl train RECIPE.yaml key=value ...``: run a recipe (the YAML's ``recipe:`` names it)."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from medvl.errors import MedvlUserError

RECIPES = ("clip",)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run a training recipe (YAML) with key=value overrides")
    p.add_argument("recipe", help="recipes/<name>.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. epochs=2 data.path=...")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    path = Path(args.recipe)
    if not path.exists():
        raise MedvlUserError("recipe not found", path=path)
    kind = (yaml.safe_load(path.read_text()) or {}).get("recipe")
    if kind not in RECIPES:
        raise MedvlUserError(f"recipe: {kind!r} is not a known recipe ({', '.join(RECIPES)})", path=path)
    from medvl.train.clip import ClipTrainConfig, train_clip
    from medvl.train.config import load_recipe
    cfg = load_recipe(ClipTrainConfig, path, args.overrides)
    res = train_clip(cfg)
    print(f"done: {res['steps']} steps, model in {res['model_dir']}")
    return 0
