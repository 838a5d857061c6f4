"""The house's layering, read from the code's own imports (every ``import`` and ``from ...
import``, at module level or inside functions).

Layers, bottom to top: ``errors`` / ``registry`` -> ``data`` -> ``models`` / ``losses`` ->
``eval`` -> ``generate`` / ``distill`` -> ``harness`` -> ``train`` -> ``serve`` / ``quickstart`` -> ``cli``.
The ``medvl.cli`` package is the command line, one module per command group; it may import any
layer and nothing imports it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "medvl"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for name, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            edges[name] |= {t for t in targets if t in mods and t != name}
    return edges


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "medvl"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_between_modules():
    assert _cycles(_edges(_modules())) == []


def test_no_import_circle_between_layers():
    layers: dict[str, set[str]] = defaultdict(set)
    for a, bs in _edges(_modules()).items():
        layers[_layer(a)] |= {_layer(b) for b in bs if _layer(b) != _layer(a)}
    assert _cycles(layers) == []


def _violations(lower: str, forbidden: set[str]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, bs in _edges(_modules()).items() for b in bs
                  if _layer(a) == lower and _layer(b) in forbidden)


def test_models_import_nothing_above_them():
    assert _violations("models", {"train", "generate", "distill", "serve", "eval", "cli", "quickstart"}) == []


def test_distill_and_generate_never_import_train():
    assert _violations("distill", {"train", "serve", "cli"}) == []
    assert _violations("generate", {"train", "distill", "serve", "cli"}) == []


def test_nothing_imports_the_command_line():
    assert sorted(f"{a} -> {b}" for a, bs in _edges(_modules()).items() for b in bs
                  if _layer(b) == "cli" and _layer(a) != "cli") == []


def test_eval_is_metrics_and_runs_no_model():
    """Metrics only: nothing that decodes or trains; from models only the asset lookup (BERTScore's
    default encoder) and the warning filter."""
    assert _violations("eval", {"generate", "distill", "harness", "train", "serve", "cli", "quickstart"}) == []
    assert sorted(f"{a} -> {b}" for a, bs in _edges(_modules()).items() for b in bs
                  if _layer(a) == "eval" and _layer(b) == "models"
                  and b not in ("medvl.models.hub", "medvl.models.quiet")) == []


def test_harness_sits_below_train():
    assert _violations("harness", {"train", "serve", "cli", "quickstart"}) == []


def test_data_is_the_ground_floor():
    assert _violations("data", {"models", "losses", "eval", "generate", "distill", "train", "serve", "cli"}) == []


def test_recipes_stay_loops():
    """The recipe files read as recipes: the loop itself lives in the engine."""
    for name in ("clip.py", "vlm.py"):
        src = (PKG / "train" / name).read_text()
        assert len(src.splitlines()) <= 320, name
        assert "torch.distributed" not in src and ".backward(" not in src and "torch.save(" not in src, name
