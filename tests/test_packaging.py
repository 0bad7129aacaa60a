"""The built wheel (a non-editable install) carries everything the library reads at run time: the shipped weights and
data (``dmd2/assets``), the model manifests and configs, and the C++/CUDA sources the extension compiles from."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for f in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy2(ROOT / f, src / f)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "dmd2", src / "dmd2", ignore=ignore)
    shutil.copytree(ROOT / "csrc", src / "csrc", ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (whl,) = out.glob("dmd2-*.whl")
    return set(zipfile.ZipFile(whl).namelist())


def _tracked(folder, pattern):
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / folder).glob(pattern) if p.is_file())


def test_wheel_carries_assets_and_manifests(wheel_names):
    expected = _tracked("dmd2/assets", "**/*") + _tracked("dmd2/models/manifests", "*.json")
    expected = [e for e in expected if "__pycache__" not in e and not e.endswith(".py") and not e.endswith(".pyc")]
    assert expected, "nothing to check: the assets folder is empty"
    missing = [e for e in expected if e not in wheel_names]
    assert not missing, f"not in the wheel: {missing}"


def test_wheel_carries_the_extension_sources(wheel_names):
    sources = [p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".cu", ".h")]
    assert sources
    missing = [s for s in sources if f"dmd2/_csrc/{s}" not in wheel_names]
    assert not missing, f"csrc files not in the wheel as dmd2/_csrc: {missing}"


def test_packaged_sources_are_found(tmp_path, monkeypatch):
    from dmd2.kernels import ext_build

    pkg = tmp_path / "dmd2"
    (pkg / "kernels").mkdir(parents=True)
    shutil.copytree(ROOT / "csrc", pkg / "_csrc")
    monkeypatch.delenv("DMD2_CSRC", raising=False)
    monkeypatch.setattr(ext_build, "__file__", str(pkg / "kernels" / "ext_build.py"))
    assert ext_build.csrc_dir() == pkg / "_csrc"
