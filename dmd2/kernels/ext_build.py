"""Build and load the ``csrc`` extension (C++ on CPU tensors, CUDA on GPU tensors) through ``torch.utils.cpp_extension``.

Two flavours share one set of sources:

* ``"cpu"``  - the C++ sources only (``csrc/*.cpp``); what CI tests run against and what CPU-only machines use;
* ``"cuda"`` - the C++ sources plus ``csrc/*.cu``, compiled with ``-DDMD2_WITH_CUDA`` for the architectures in
  ``TORCH_CUDA_ARCH_LIST`` (default ``"8.0;9.0"``, plus every visible GPU); needs a CUDA toolkit.

Builds are compiled with ninja on first use into a cache folder outside the repository,
``$DMD2_EXT_CACHE`` or ``~/.cache/dmd2/ext``, one sub-folder per key ``<flavour>-torch<version>-py<ver>-<hash>`` where
the hash covers the source bytes, the flags, the architectures and the toolkit version; a later process with the same
key loads the built library without compiling. ``python -m dmd2.kernels.cuda --build`` builds ahead of time.

Only one flavour can be loaded per process (both register the same ``dmd2::*_ext`` operators); the CUDA flavour
also carries the CPU kernels.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "FLAVOURS", "ExtBuildError", "BuildSpec", "csrc_dir", "find_cuda_home", "cuda_extra_includes",
    "default_flavour", "cuda_arch_list", "build_spec", "cache_root", "build", "loaded_flavour",
]

FLAVOURS = ("cpu", "cuda")
DEFAULT_ARCHS = "8.0;9.0"
_CPU_SOURCES = ("dmd2_api.cpp", "dmd2_cpu.cpp")
_CUDA_SOURCES = ("dmd2_cuda.cu",)
_HEADERS = ("dmd2_kernels.h", "philox.h")


class ExtBuildError(RuntimeError):
    """The extension could not be built or loaded; the message says why (compiler output included)."""


def csrc_dir() -> Path:
    """Folder of the C++/CUDA sources: ``$DMD2_CSRC``, else ``dmd2/_csrc`` (the copy a built wheel carries, see
    ``setup.py``), else ``<repository>/csrc`` next to the ``dmd2`` package (a checkout or an editable install)."""
    env = os.environ.get("DMD2_CSRC")
    if env:
        path = Path(env)
    else:
        packaged = Path(__file__).resolve().parents[1] / "_csrc"
        path = packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "csrc"
    missing = [f for f in _CPU_SOURCES + _CUDA_SOURCES + _HEADERS if not (path / f).is_file()]
    if missing:
        raise ExtBuildError(
            f"the extension sources are not at {path} (missing {', '.join(missing)}); set DMD2_CSRC to the csrc/ folder "
            "of a dmd2 checkout"
        )
    return path


def _is_toolkit(home: Path) -> bool:
    return (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file()


def find_cuda_home() -> Path | None:
    """Locate a CUDA toolkit (a folder with ``bin/nvcc`` and ``include/cuda_runtime.h``), or None.

    Order: ``$CUDA_HOME``, ``$CUDA_PATH``; the folder above ``bin/`` of ``nvcc`` on ``PATH`` after resolving symlinks,
    and, when that ``nvcc`` is a small wrapper script, the toolkit its ``exec`` line names; ``/usr/local/cuda``.
    """
    candidates: list[Path] = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        real = Path(nvcc).resolve()
        candidates.append(real.parent.parent)
        try:
            if real.stat().st_size < 4096:
                text = real.read_text(errors="replace")
                candidates += [Path(m).parent.parent for m in re.findall(r"(/[^\s'\"]+/bin/nvcc)\b", text)]
        except OSError:
            pass
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if _is_toolkit(home):
            return home.resolve()
    return None


def _nvcc_version(home: Path) -> str:
    import subprocess

    out = subprocess.run([str(home / "bin" / "nvcc"), "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def cuda_extra_includes() -> list[str]:
    """Header folders of the pip CUDA wheels (``site-packages/nvidia/cu<major>/include``: cusparse.h, cublas_v2.h, ...).

    PyTorch's CUDA headers include some library headers that a minimal toolkit lacks; the wheels ship them.
    """
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    major = (torch.version.cuda or "").split(".")[0]
    found = []
    for root in getattr(nvidia, "__path__", []):
        preferred = Path(root) / f"cu{major}" / "include"
        if major and preferred.is_dir():
            found.append(str(preferred))
    return found


def default_flavour() -> str:
    """``$DMD2_EXT_FLAVOUR`` if set, else ``"cuda"`` when a GPU is visible and a toolkit is found, else ``"cpu"``."""
    env = os.environ.get("DMD2_EXT_FLAVOUR", "").strip()
    if env:
        if env not in FLAVOURS:
            raise ValueError(f"DMD2_EXT_FLAVOUR must be one of {FLAVOURS}, got {env!r}")
        return env
    if torch.version.cuda and torch.cuda.is_available() and find_cuda_home() is not None:
        return "cuda"
    return "cpu"


def cuda_arch_list() -> list[str]:
    """Compute capabilities to compile for: ``$TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0``) plus visible GPUs."""
    raw = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    archs = [a for a in re.split(r"[;\s,]+", raw.strip()) if a]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            archs.append(f"{major}.{minor}")
    seen: list[str] = []
    for a in archs:
        if not re.fullmatch(r"\d+\.\d+a?(\+PTX)?", a):
            raise ValueError(f"TORCH_CUDA_ARCH_LIST entries must look like '8.0' or '9.0+PTX', got {a!r}")
        if a not in seen:
            seen.append(a)
    return seen


def _gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for a in archs:
        num = a.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if a.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


@dataclass(frozen=True)
class BuildSpec:
    """Everything that determines one build; ``key`` names its cache folder."""

    flavour: str
    sources: tuple[str, ...]
    cflags: tuple[str, ...]
    cuda_cflags: tuple[str, ...]
    include_paths: tuple[str, ...]
    ldflags: tuple[str, ...]
    cuda_home: str | None
    key: str


def build_spec(flavour: str) -> BuildSpec:
    """Sources, flags and cache key of a flavour (raises ExtBuildError when the CUDA flavour has no toolkit)."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    src = csrc_dir()
    names = _CPU_SOURCES + (_CUDA_SOURCES if flavour == "cuda" else ())
    sources = tuple(str(src / n) for n in names)
    # at::parallel_for is an OpenMP region inlined from ATen's headers: without -fopenmp it would run serially.
    # Linking with -fopenmp records libgomp.so.1, which resolves to the copy PyTorch has already loaded.
    cflags = ["-O3", "-fopenmp"]
    ldflags = ["-fopenmp"]
    cuda_cflags: list[str] = []
    includes: list[str] = [str(src)]
    home = None
    tag = "cpu"
    if flavour == "cuda":
        if not torch.version.cuda:
            raise ExtBuildError(f"the CUDA flavour needs a CUDA build of PyTorch; this one is {torch.__version__}")
        home_path = find_cuda_home()
        if home_path is None:
            raise ExtBuildError(
                "no CUDA toolkit found (looked at $CUDA_HOME, $CUDA_PATH, nvcc on PATH and /usr/local/cuda); "
                "install one or set CUDA_HOME"
            )
        home = str(home_path)
        cflags.append("-DDMD2_WITH_CUDA")
        archs = cuda_arch_list()
        cuda_cflags = ["-O3", "-DDMD2_WITH_CUDA", *_gencode_flags(archs)]
        includes += cuda_extra_includes()
        tag = f"cuda{_nvcc_version(home_path)}-sm{'_'.join(a.replace('.', '') for a in archs)}"
    h = hashlib.sha256()
    for n in sorted(names + _HEADERS):
        h.update(n.encode())
        h.update((src / n).read_bytes())
    h.update(repr((cflags, cuda_cflags, ldflags, tag)).encode())
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    key = f"{flavour}-torch{torch.__version__}-{py}-{h.hexdigest()[:16]}"
    return BuildSpec(flavour, sources, tuple(cflags), tuple(cuda_cflags), tuple(includes), tuple(ldflags), home, key)


def cache_root() -> Path:
    """``$DMD2_EXT_CACHE``, else ``$XDG_CACHE_HOME/dmd2/ext``, else ``~/.cache/dmd2/ext``."""
    env = os.environ.get("DMD2_EXT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dmd2" / "ext"


_loaded: str | None = None  # flavour loaded into this process


def loaded_flavour() -> str | None:
    """The flavour whose operators this process has loaded, or None."""
    return _loaded


def build(flavour: str, verbose: bool = False) -> Path:
    """Compile (if not cached) and load ``flavour`` into this process; return its build folder.

    Raises:
        ExtBuildError: no toolkit, a compiler error (its output is in the message), or the other flavour is loaded.
    """
    global _loaded
    if _loaded is not None:
        if _loaded == flavour or _loaded == "cuda":  # the CUDA flavour carries the CPU kernels too
            return cache_root() / build_spec(_loaded).key
        raise ExtBuildError(
            f"the {_loaded!r} build of the dmd2 extension is already loaded in this process; the {flavour!r} build "
            "needs a fresh process (set DMD2_EXT_FLAVOUR before first use)"
        )
    spec = build_spec(flavour)
    folder = cache_root() / spec.key
    folder.mkdir(parents=True, exist_ok=True)
    if "torch.utils.cpp_extension" not in sys.modules:
        # its import logs "No CUDA runtime is found" on GPU-less machines; that is expected for the CPU flavour
        log = logging.getLogger("torch.utils.cpp_extension")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            from torch.utils import cpp_extension
        finally:
            log.setLevel(level)
    from torch.utils import cpp_extension

    saved_home = cpp_extension.CUDA_HOME
    if spec.cuda_home is not None:
        cpp_extension.CUDA_HOME = spec.cuda_home  # the module reads it when it writes the ninja file
    t0 = time.perf_counter()
    try:
        cpp_extension.load(
            name=f"dmd2_ext_{flavour}",
            sources=list(spec.sources),
            extra_cflags=list(spec.cflags),
            extra_cuda_cflags=list(spec.cuda_cflags),
            extra_ldflags=list(spec.ldflags),
            extra_include_paths=list(spec.include_paths),
            build_directory=str(folder),
            with_cuda=flavour == "cuda",
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as e:  # compiler / linker / loader errors arrive as RuntimeError, OSError, ImportError
        raise ExtBuildError(f"building the {flavour!r} dmd2 extension in {folder} failed: {e}") from e
    finally:
        cpp_extension.CUDA_HOME = saved_home
    _loaded = flavour
    if verbose:
        print(f"dmd2 extension ({flavour}) ready in {time.perf_counter() - t0:.1f} s: {folder}", file=sys.stderr)
    return folder
