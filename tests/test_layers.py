"""The import arrows of docs/design.md ("Layers and their import arrows") hold: every ``import`` of a dmd2 module,
at module level or inside a function, goes along an arrow of that table."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "dmd2"

#: layer -> the layers it may import (docs/design.md); a layer may always import itself
ARROWS = {
    "recipes": {"train", "eval", "data", "models", "core"},
    "eval": {"models", "data", "core"},
    "train": {"core"},
    "models": {"core"},
    "data": set(),
    "core": {"kernels"},
    "kernels": set(),
}
#: single modules a layer may import beyond its arrows, with the reason (docs/design.md lists them too)
EXCEPTIONS = {
    ("eval", "dmd2.train.loading"): "eval's command lines take --ckpt, a run or checkpoint folder (load_generator)",
}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "dmd2" else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every dmd2 import in ``path``."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("dmd2")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # from . import x, y: each name may be a submodule
                    out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
                    continue
            else:
                mod = node.module or ""
            if mod.startswith("dmd2"):
                out.append((node.lineno, mod))
    return out


def test_every_import_goes_along_an_arrow():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        own = _layer(".".join(path.relative_to(ROOT).with_suffix("").parts))
        if own not in ARROWS:  # dmd2/__init__.py, dmd2/__main__.py: the package's front door
            continue
        for line, mod in _imports(path):
            target = _layer(mod)
            if target is not None and target != own and target not in ARROWS[own] and (own, mod) not in EXCEPTIONS:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {own} imports {mod}")
    assert not bad, "imports against docs/design.md's arrows:\n  " + "\n  ".join(bad)


def test_the_checker_sees_relative_imports(tmp_path):
    """The rule must fail on an upward import (a guard against a checker that sees nothing)."""
    found = _imports(PKG / "recipes" / "mnist.py")
    assert any(m.startswith("dmd2.train") for _, m in found) and any(m.startswith("dmd2.models") for _, m in found)
