"""Fused ops and their single dispatch point.

``impl`` selects the implementation of an op:

* ``"auto"``   - the fastest available for the inputs: Triton for CUDA tensors when Triton imports, otherwise the
  reference. It may fall back; it never fails for lack of a backend.
* ``"torch"``  - :mod:`dmd2.kernels.reference`, pure PyTorch (the specification).
* ``"triton"`` - the Triton kernels (on CPU only under ``TRITON_INTERPRET=1``).
* ``"ext"``    - the compiled ``csrc`` extension (C++ on CPU tensors, CUDA on GPU tensors).

An explicit implementation never falls back: it runs, or raises ``RuntimeError`` saying why.
The environment variable ``DMD2_KERNEL_IMPL`` (one of the names above) overrides ``impl="auto"``.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from . import reference

IMPLS = ("auto", "torch", "triton", "ext")
ENV_VAR = "DMD2_KERNEL_IMPL"

# op name -> impl name -> callable. Backends register themselves with `register`.
_REGISTRY: dict[str, dict[str, Callable]] = {
    "dm_grad": {"torch": reference.dm_grad},
    "dm_loss": {"torch": reference.dm_loss},
}
# impl name -> zero-arg callable that returns None when usable, or a reason string.
_AVAILABILITY: dict[str, Callable[[], str | None]] = {"torch": lambda: None}


def register(op: str, impl: str, fn: Callable, availability: Callable[[], str | None] | None = None) -> None:
    """Register ``fn`` as implementation ``impl`` of ``op`` (used by the Triton and extension backends)."""
    if impl not in IMPLS or impl == "auto":
        raise ValueError(f"impl must be one of {IMPLS[1:]}, got {impl!r}")
    _REGISTRY.setdefault(op, {})[impl] = fn
    if availability is not None:
        _AVAILABILITY[impl] = availability


def _load_backends() -> None:
    """Import optional backends so they can register; failures only make them unavailable."""
    for mod in ("triton", "cuda"):
        try:
            __import__(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:  # backend not written / dependency missing
            if e.name and e.name.startswith(__name__):
                continue
            _AVAILABILITY.setdefault(
                "triton" if mod == "triton" else "ext", lambda e=e: f"import failed: {e}"
            )


_backends_loaded = False


def resolve(op: str, impl: str, *tensors: torch.Tensor) -> Callable:
    """Return the callable that runs ``op`` for ``tensors`` under ``impl`` (see module docstring)."""
    global _backends_loaded
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not _backends_loaded:
        _load_backends()
        _backends_loaded = True
    if impl == "auto":
        forced = os.environ.get(ENV_VAR, "").strip()
        if forced:
            if forced not in IMPLS:
                raise ValueError(f"{ENV_VAR} must be one of {IMPLS}, got {forced!r}")
            impl = forced
    impls = _REGISTRY.get(op)
    if impls is None:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(_REGISTRY)}")
    if impl == "auto":
        on_cuda = any(t.is_cuda for t in tensors)
        if on_cuda and "triton" in impls and _AVAILABILITY.get("triton", lambda: "not registered")() is None:
            return impls["triton"]
        return impls["torch"]
    if impl not in impls:
        reason = _AVAILABILITY.get(impl, lambda: "no such backend is installed")()
        raise RuntimeError(f"impl={impl!r} has no implementation of {op!r}: {reason or 'op not provided by this backend'}")
    reason = _AVAILABILITY.get(impl, lambda: None)()
    if reason is not None:
        raise RuntimeError(f"impl={impl!r} requested for {op!r} but it cannot run: {reason}")
    return impls[impl]


def dm_grad(x, real_x0, fake_x0, eps: float = 1e-6, impl: str = "auto") -> torch.Tensor:
    """Distribution-matching gradient; see :func:`dmd2.kernels.reference.dm_grad` for the math."""
    return resolve("dm_grad", impl, x, real_x0, fake_x0)(x, real_x0, fake_x0, eps)


def dm_loss(x, real_x0, fake_x0, eps: float = 1e-6, impl: str = "auto") -> torch.Tensor:
    """Scalar surrogate with d/dx == dm_grad / x.numel(); see :func:`dmd2.kernels.reference.dm_loss`."""
    return resolve("dm_loss", impl, x, real_x0, fake_x0)(x, real_x0, fake_x0, eps)


cfg = reference.cfg

__all__ = ["IMPLS", "ENV_VAR", "register", "resolve", "dm_grad", "dm_loss", "cfg", "reference"]
