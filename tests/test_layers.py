"""The package's layers point down only: every ``import`` of the package (module level or inside a
function) is parsed, and an edge from a lower layer to a higher one fails the test, as does a
cycle between top-level modules."""

from __future__ import annotations

import ast
from pathlib import Path

import diffusion_blend

ROOT = Path(diffusion_blend.__file__).parent
# core <- models <- domains <- methods <- fine-tuning <- evaluation <- top
LAYERS = {
    0: ("__init__", "errors", "seeding", "io", "blend", "sampling", "offline", "distributed",
        "lr"),
    1: ("adapters", "pipelines", "smc", "amortised", "rewards", "convert"),
    2: ("domains",),
    3: ("baselines",),
    4: ("finetune",),
    5: ("evaluation",),
    6: ("bench", "ui", "cli"),
}
LAYER_OF = {unit: layer for layer, units in LAYERS.items() for unit in units}


def unit_of(module: str) -> str:
    """``diffusion_blend.finetune.run`` -> ``finetune`` (the top-level module or package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports() -> list[tuple[str, str]]:
    """(importing module, imported module) for every import of the package inside it."""
    edges = []
    for path in sorted(ROOT.rglob("*.py")):
        mod = ".".join(("diffusion_blend", *path.relative_to(ROOT).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            edges += [(mod, n) for n in names if n.startswith("diffusion_blend.")]
    return edges


def test_every_module_has_a_layer():
    units = {unit_of(a) for a, _ in imports()} | {unit_of(b) for _, b in imports()}
    assert units <= LAYER_OF.keys(), sorted(units - LAYER_OF.keys())
    on_disk = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
               if (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert on_disk <= LAYER_OF.keys(), sorted(on_disk - LAYER_OF.keys())


def test_no_import_points_up():
    up = [f"{a} -> {b}" for a, b in imports()
          if LAYER_OF[unit_of(b)] > LAYER_OF[unit_of(a)]]
    assert up == []


def test_no_cycle_between_top_level_modules():
    graph: dict[str, set[str]] = {}
    for a, b in imports():
        if unit_of(a) != unit_of(b):
            graph.setdefault(unit_of(a), set()).add(unit_of(b))

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(u for u in graph if reaches(u, u, {u}))
    assert cycles == []
