"""Building the extension: toolkit discovery, cache keys, the failure policy, and the CUDA compile check.

The CUDA compile check runs ``python -m dmd2.kernels.cuda --compile-cuda`` (sm_80 + sm_90 with the machine's nvcc) in
a subprocess: a compile error fails it. Without a toolkit it is skipped, unless ``DMD2_REQUIRE_EXT=1`` (CI).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmd2.kernels import ext_build

ROOT = Path(__file__).resolve().parents[2]


def _fake_toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\necho nvcc\n")
    (root / "bin" / "nvcc").chmod(0o755)
    (root / "include" / "cuda_runtime.h").write_text("")
    return root


def test_find_cuda_home_follows_a_wrapper_script(tmp_path, monkeypatch):
    real = _fake_toolkit(tmp_path / "cuda-99.9")
    wrapper_bin = tmp_path / "wrapbin"
    wrapper_bin.mkdir()
    wrapper = wrapper_bin / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper_bin))
    # the folder above the wrapper's bin/ has no include/: the exec line names the real toolkit
    assert ext_build.find_cuda_home() == real.resolve()


def test_find_cuda_home_resolves_symlinks_and_prefers_cuda_home(tmp_path, monkeypatch):
    real = _fake_toolkit(tmp_path / "toolkit")
    links = tmp_path / "links"
    links.mkdir()
    (links / "nvcc").symlink_to(real / "bin" / "nvcc")
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(links))
    assert ext_build.find_cuda_home() == real.resolve()
    other = _fake_toolkit(tmp_path / "other")
    monkeypatch.setenv("CUDA_HOME", str(other))
    assert ext_build.find_cuda_home() == other.resolve()


def test_cache_key_tracks_sources_torch_and_flavour(tmp_path, monkeypatch):
    monkeypatch.setenv("DMD2_CSRC", str(ROOT / "csrc"))
    key = ext_build.build_spec("cpu").key
    assert key.startswith(f"cpu-torch{torch.__version__}-")
    copy = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", copy)
    monkeypatch.setenv("DMD2_CSRC", str(copy))
    assert ext_build.build_spec("cpu").key == key  # same bytes, same key, wherever they live
    with open(copy / "dmd2_cpu.cpp", "a") as fh:
        fh.write("\n// edited\n")
    assert ext_build.build_spec("cpu").key != key
    spec = ext_build.build_spec("cpu")
    assert not any(s.endswith(".cu") for s in spec.sources) and "-DDMD2_WITH_CUDA" not in spec.cflags


def test_cuda_spec_compiles_for_sm80_and_sm90(monkeypatch):
    if ext_build.find_cuda_home() is None or not torch.version.cuda:
        if os.environ.get("DMD2_REQUIRE_EXT") == "1":
            pytest.fail("DMD2_REQUIRE_EXT=1 but no CUDA toolkit was found (set CUDA_HOME)")
        pytest.skip("no CUDA toolkit / CUDA build of PyTorch")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    spec = ext_build.build_spec("cuda")
    assert "-gencode=arch=compute_80,code=sm_80" in spec.cuda_cflags
    assert "-gencode=arch=compute_90,code=sm_90" in spec.cuda_cflags
    assert any(s.endswith("dmd2_cuda.cu") for s in spec.sources) and spec.key.startswith("cuda-")


def test_missing_sources_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DMD2_CSRC", str(tmp_path))
    with pytest.raises(ext_build.ExtBuildError, match="set DMD2_CSRC"):
        ext_build.build_spec("cpu")


_POLICY_SCRIPT = r"""
import os, warnings, torch
import dmd2.kernels as K
from dmd2.kernels import cuda as ext
x = torch.zeros(2, 3)
try:
    K.dm_grad(x, x, x, impl="ext")
except RuntimeError as e:
    print("EXPLICIT_RAISES", "DMD2_CSRC" in str(e))
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    try:
        print("AUTO", ext.auto_status(), ext.auto_status())
    except RuntimeError as e:
        print("REQUIRED_RAISES", "DMD2_REQUIRE_EXT=1" in str(e))
    print("WARNINGS", sum("unavailable" in str(m.message) for m in w))
"""


@pytest.mark.parametrize("require", ["0", "1"])
def test_failed_build_policy(tmp_path, require):
    """Explicit impl='ext' raises; auto warns once and falls back; DMD2_REQUIRE_EXT=1 makes it an error."""
    env = dict(os.environ, DMD2_CSRC=str(tmp_path / "nowhere"), DMD2_REQUIRE_EXT=require, DMD2_EXT_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", _POLICY_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert "EXPLICIT_RAISES True" in out.stdout, out.stdout + out.stderr
    if require == "1":
        assert "REQUIRED_RAISES True" in out.stdout, out.stdout + out.stderr
    else:
        assert "AUTO False False" in out.stdout and "WARNINGS 1" in out.stdout, out.stdout + out.stderr


@pytest.mark.slow
def test_cuda_sources_compile_for_sm80_sm90():
    """nvcc compiles csrc/*.cu for sm_80 and sm_90 (about 100 s on 2 cores the first time, then cached)."""
    if ext_build.find_cuda_home() is None or not torch.version.cuda:
        if os.environ.get("DMD2_REQUIRE_EXT") == "1":
            pytest.fail("DMD2_REQUIRE_EXT=1 but no CUDA toolkit was found (set CUDA_HOME)")
        pytest.skip("no CUDA toolkit / CUDA build of PyTorch")
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST="8.0;9.0")
    out = subprocess.run([sys.executable, "-m", "dmd2.kernels.cuda", "--compile-cuda", "--quiet"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-8000:]
    assert "smoke check against the reference passed" in out.stdout
