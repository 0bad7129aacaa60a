"""Fused ops and their single dispatch point.

``impl`` selects the implementation of an op:

* ``"auto"``   - the first implementation in :data:`contracts.AUTO_ORDER` for the tensors' device that declares
  the op and can run, else the reference: on CUDA tensors Triton, then the extension (whose failure to build follows
  :func:`dmd2.kernels.cuda.auto_status`: one warning, or an error under ``DMD2_REQUIRE_EXT=1``), then the reference;
  on CPU tensors the reference. It never fails for lack of a backend.
* ``"torch"``  - :mod:`dmd2.kernels.reference`, pure PyTorch (the specification).
* ``"triton"`` - the Triton kernels (on CPU only under ``TRITON_INTERPRET=1``).
* ``"ext"``    - the compiled ``csrc`` extension (C++ on CPU tensors, CUDA on GPU tensors).

An explicit implementation never falls back: it runs, or raises ``RuntimeError`` saying why (for an op the backend
lacks, the reason its declaration gives).
The environment variable ``DMD2_KERNEL_IMPL`` (one of the names above) overrides ``impl="auto"``, so one setting
forces an implementation everywhere the library dispatches (``dmd2.core``, the trainer); an explicit ``impl=`` argument
is left as it is.

Ops (name in the registry: public wrapper, math in :mod:`dmd2.kernels.reference`):
``"philox_normal"``, ``"noise_add"``, ``"fused_dm"``, ``"denoise_loss"``, ``"dm_grad"``, ``"dm_loss"``.

What each backend implements (ops, devices, dtypes, gradients) is declared as data in :mod:`dmd2.kernels.contracts`;
backends register their callables with :func:`register`, which refuses an op the backend does not declare. An
availability function ``availability(*tensors)`` returns ``None`` when the backend can run on those tensors (or
devices), else the reason it cannot.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch

from . import contracts, reference

IMPLS = ("auto", "torch", "triton", "ext")
ENV_VAR = "DMD2_KERNEL_IMPL"

# op name -> impl name -> callable. Backends register themselves with `register`.
_REGISTRY: dict[str, dict[str, Callable]] = {
    "dm_grad": {"torch": reference.dm_grad},
    "dm_loss": {"torch": reference.dm_loss},
    "philox_normal": {"torch": reference.philox_normal},
    "noise_add": {"torch": reference.noise_add},
    "fused_dm": {"torch": reference.fused_dm},
    "denoise_loss": {"torch": reference.denoise_loss},
}
# impl name -> availability(*tensors): None when usable on those tensors / devices, or a reason string.
_AVAILABILITY: dict[str, Callable[..., str | None]] = {"torch": lambda *tensors: None}
# impl name -> auto_policy(*tensors) -> bool, for a backend whose failure under impl="auto" has a policy of its own
# (the extension: cuda.auto_status); the others are used under "auto" when their availability is None.
_AUTO_POLICY: dict[str, Callable[..., bool]] = {}


def availability(impl: str, *tensors) -> str | None:
    """``None`` if backend ``impl`` can run on ``tensors`` (tensors or devices), else the reason it cannot."""
    fn = _AVAILABILITY.get(impl)
    if fn is None:
        return "no such backend is installed"
    return fn(*tensors)


def implementations(op: str) -> Sequence[str]:
    """Names of the implementations registered for ``op`` (whether or not they can run here)."""
    if not _backends_loaded:
        _ensure_backends()
    return tuple(_REGISTRY.get(op, {}))


def register(
    op: str, impl: str, fn: Callable, availability: Callable[..., str | None] | None = None,
    auto_policy: Callable[..., bool] | None = None,
) -> None:
    """Register ``fn`` as implementation ``impl`` of ``op`` (used by the Triton and extension backends).

    ``op`` must be one that :data:`contracts.CONTRACTS` declares for ``impl``. ``availability(*tensors)`` and
    ``auto_policy(*tensors)`` (see :func:`resolve`) apply to every op of the backend.
    """
    if impl not in IMPLS or impl == "auto":
        raise ValueError(f"impl must be one of {IMPLS[1:]}, got {impl!r}")
    if contracts.contract(op, impl) is None:
        raise ValueError(f"dmd2.kernels.contracts declares no op {op!r} for impl {impl!r}")
    _REGISTRY.setdefault(op, {})[impl] = fn
    if availability is not None:
        _AVAILABILITY[impl] = availability
    if auto_policy is not None:
        _AUTO_POLICY[impl] = auto_policy


def _load_backends() -> None:
    """Import optional backends so they can register; failures only make them unavailable."""
    for mod in ("triton", "cuda"):
        try:
            __import__(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:  # backend not written / dependency missing
            if e.name and e.name.startswith(__name__):
                continue
            _AVAILABILITY.setdefault(
                "triton" if mod == "triton" else "ext", lambda *tensors, e=e: f"import failed: {e}"
            )


_backends_loaded = False


def _ensure_backends() -> None:
    global _backends_loaded
    if not _backends_loaded:
        _backends_loaded = True
        _load_backends()


def _is_cuda(t) -> bool:
    if isinstance(t, torch.Tensor):
        return t.is_cuda
    if isinstance(t, (torch.device, str)):
        return torch.device(t).type == "cuda"
    return False


def resolve(op: str, impl: str, *tensors) -> Callable:
    """Return the callable that runs ``op`` for ``tensors`` (tensors or devices; ``None`` ignored) under ``impl``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _ensure_backends()
    tensors = tuple(t for t in tensors if t is not None)
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
        return _auto(op, impls, tensors)
    if impl not in impls:
        reason = contracts.LACKS.get(impl, {}).get(op) or availability(impl, *tensors) or "op not provided"
        raise RuntimeError(f"impl={impl!r} has no implementation of {op!r}: {reason}")
    reason = availability(impl, *tensors)
    if reason is not None:
        raise RuntimeError(f"impl={impl!r} requested for {op!r} but it cannot run: {reason}")
    return impls[impl]


def _auto(op: str, impls: dict[str, Callable], tensors: tuple) -> Callable:
    """``impl="auto"``: the first of ``AUTO_ORDER[device]`` that declares ``op`` on the device, is registered and can
    run (its ``auto_policy`` where it has one, else its availability); else the reference."""
    device = "cuda" if any(_is_cuda(t) for t in tensors) else "cpu"
    for impl in contracts.AUTO_ORDER[device]:
        c = contracts.contract(op, impl)
        if c is None or device not in c.devices or impl not in impls:
            continue
        policy = _AUTO_POLICY.get(impl)
        if (policy(*tensors) if policy is not None else availability(impl, *tensors) is None):
            return impls[impl]
    return impls["torch"]


def dm_grad(x, real_x0, fake_x0, eps: float = 1e-6, impl: str = "auto") -> torch.Tensor:
    """Distribution-matching gradient; see :func:`dmd2.kernels.reference.dm_grad` for the math."""
    return resolve("dm_grad", impl, x, real_x0, fake_x0)(x, real_x0, fake_x0, eps)


def dm_loss(x, real_x0, fake_x0, eps: float = 1e-6, impl: str = "auto") -> torch.Tensor:
    """Scalar surrogate with d/dx == dm_grad / x.numel(); see :func:`dmd2.kernels.reference.dm_loss`."""
    return resolve("dm_loss", impl, x, real_x0, fake_x0)(x, real_x0, fake_x0, eps)


def philox_normal(seed: int, offset: int, shape, device=None, impl: str = "auto") -> torch.Tensor:
    """Float32 normal noise from the counter-based stream ``(seed, offset)``; see :func:`reference.philox_normal`."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    return resolve("philox_normal", impl, dev)(seed, offset, shape, device=dev)


def noise_add(x0, alpha, sigma, seed: int, offset: int, impl: str = "auto") -> torch.Tensor:
    """``x_t = alpha_b * x0 + sigma_b * eps(seed, offset)``; see :func:`reference.noise_add`."""
    return resolve("noise_add", impl, x0, alpha, sigma)(x0, alpha, sigma, seed, offset)


def fused_dm(
    x, x_t, real_cond, real_uncond, fake, alpha=None, sigma=None, guidance_scale: float = 1.0,
    prediction: str = "x0", eps: float = 1e-6, return_x0: bool = False, impl: str = "auto",
) -> reference.FusedDMOutput:
    """Guided real x0, fake x0, normaliser, DM gradient and surrogate loss in one op; see :func:`reference.fused_dm`."""
    fn = resolve("fused_dm", impl, x, x_t, real_cond, real_uncond, fake, alpha, sigma)
    return fn(x, x_t, real_cond, real_uncond, fake, alpha, sigma, guidance_scale, prediction, eps, return_x0)


def denoise_loss(pred, weight, target: str = "eps", x0=None, seed=None, offset=None, impl: str = "auto") -> torch.Tensor:
    """Per-sample weighted eps- or x0-MSE with eps regenerated from ``(seed, offset)``; see :func:`reference.denoise_loss`."""
    return resolve("denoise_loss", impl, pred, weight, x0)(pred, weight, target, x0, seed, offset)


cfg = reference.cfg
FusedDMOutput = reference.FusedDMOutput

__all__ = [
    "IMPLS", "ENV_VAR", "register", "resolve", "availability", "implementations", "contracts",
    "dm_grad", "dm_loss", "philox_normal", "noise_add", "fused_dm", "FusedDMOutput", "denoise_loss", "cfg", "reference",
]
