"""Each paper preset's resolved config (what ``--dry-run`` prints) pinned key by key to a golden JSON under
tests/recipes/golden/, and the tables of docs/presets.md pinned to those goldens.

A deliberate change to a preset: check it against the official run scripts, update docs/presets.md, then regenerate
the goldens with ``UPDATE_GOLDEN=1 python -m pytest tests/recipes/test_presets_golden.py`` and commit the diff.
"""
import json
import os
import re
from pathlib import Path

import pytest

from dmd2.train import main

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
DOC = ROOT / "docs" / "presets.md"

#: (recipe module, preset) of every paper run
PAPER_RUNS = [("sdxl", "paper"), ("sdxl", "paper-lora"), ("sdxl", "paper-1step"), ("imagenet64", "paper")]


def _recipe(name):
    import importlib

    return importlib.import_module(f"dmd2.recipes.{name}").RECIPE


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _dry_run(capsys, recipe, preset) -> dict:
    assert main(_recipe(recipe), ["--preset", preset, "--dry-run"]) == 0
    return _flat(json.loads(capsys.readouterr().out))


@pytest.mark.parametrize("recipe, preset", PAPER_RUNS, ids=[f"{r}-{p}" for r, p in PAPER_RUNS])
def test_paper_preset_matches_its_golden_config_key_by_key(capsys, recipe, preset):
    resolved = _dry_run(capsys, recipe, preset)
    path = GOLDEN / f"{recipe}-{preset}.json"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(json.dumps(resolved, indent=1, sort_keys=True) + "\n")
    golden = json.loads(path.read_text())
    changed = [f"{k}: golden {golden[k]!r}, resolved {resolved[k]!r}" for k in golden if k in resolved
               and golden[k] != resolved[k]]
    problems = changed + [f"{k}: only in the golden" for k in golden if k not in resolved]
    problems += [f"{k}: new key (resolved {resolved[k]!r})" for k in resolved if k not in golden]
    assert not problems, (f"{recipe} --preset {preset} differs from {path.name} (check docs/presets.md against the "
                          "official scripts, then UPDATE_GOLDEN=1):\n  " + "\n  ".join(problems))


def _doc_tables() -> dict[tuple[str, str], dict[str, str]]:
    """``(recipe, preset) -> {key: our value as written}`` from the tables of docs/presets.md: a heading
    ``## `python -m dmd2.recipes.R --preset P` ...`` then rows ``| `key` | `value` | official | source |``."""
    tables, current = {}, None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^## `python -m dmd2\.recipes\.(\w+) --preset ([\w-]+)`", line)
        if m:
            current = tables.setdefault((m.group(1), m.group(2)), {})
            continue
        m = re.match(r"^\| `([\w.]+)` \| `([^`]*)` \|", line)
        if m and current is not None:
            assert m.group(1) not in current, f"docs/presets.md: {m.group(1)} listed twice"
            current[m.group(1)] = m.group(2)
    return tables


def _parse(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string


@pytest.mark.parametrize("recipe, preset", PAPER_RUNS, ids=[f"{r}-{p}" for r, p in PAPER_RUNS])
def test_docs_presets_table_states_the_resolved_values(recipe, preset):
    table = _doc_tables().get((recipe, preset))
    assert table, f"docs/presets.md has no table for {recipe} --preset {preset}"
    golden = json.loads((GOLDEN / f"{recipe}-{preset}.json").read_text())
    wrong = [f"{k}: docs say {v!r}, the preset resolves to {golden.get(k, '(no such key)')!r}"
             for k, v in table.items() if k not in golden or _parse(v) != golden[k]]
    assert not wrong, "docs/presets.md:\n  " + "\n  ".join(wrong)
    # every key the preset (or the recipe's defaults table) sets is in its table
    rec = _recipe(recipe)
    set_keys = set(rec.presets[preset])
    missing = sorted(k for k in set_keys if k not in table and not k.startswith(("train.out", "train.progress")))
    assert not missing, f"docs/presets.md, {recipe} --preset {preset}: no row for {missing}"
