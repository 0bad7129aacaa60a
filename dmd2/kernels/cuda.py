"""The compiled ``csrc`` extension as implementation ``"ext"`` of the fused ops (C++ on CPU, CUDA on GPU tensors).

Operators (namespace ``dmd2``, defined in ``csrc/dmd2_api.cpp``; fake kernels and autograd registered here so that
``torch.compile(fullgraph=True)`` traces them and gradients flow):

* ``torch.ops.dmd2.dm_grad_ext(x, real_x0, fake_x0, eps) -> g``, shapes ``(B, ...)``:
  :math:`g_i = (\\hat x_{0,fake} - \\hat x_{0,real}) / (\\mathrm{mean}_j|x_{ij} - \\hat x_{0,real,ij}| + \\epsilon)`
  (DMD2 Sec. 3, DMD Eq. 7; :func:`dmd2.kernels.reference.dm_grad`). Differentiable in all three tensors.
* ``torch.ops.dmd2.dm_loss_ext(x, real_x0, fake_x0, eps) -> (loss, g)``: ``loss = 0.5 * mean(g**2)`` (float32 scalar),
  the value of DMD2's surrogate ``0.5 * mse(x, (x - g).detach())``; ``d loss / d x = grad_out * g / x.numel()``,
  no gradient to ``real_x0`` / ``fake_x0`` (:func:`dmd2.kernels.reference.dm_loss`).
* ``torch.ops.dmd2.noise_add_ext(x0, alpha, sigma, seed, offset) -> x_t``: ``x_t[b] = alpha[b] * x0[b] + sigma[b] * z[b]``
  with ``x0`` ``(B, ...)``, ``alpha``, ``sigma`` ``(B,)`` and ``z`` the Philox4x32-10 + Box-Muller stream of
  ``(seed, offset)`` (:func:`dmd2.kernels.reference.philox_normal`, element ``i`` of ``z`` = ``tl.randn(seed, offset + i)``),
  never stored: the backward pass regenerates it.

Math in float32 for float32 / bfloat16 / float16 inputs; outputs in the input dtype, contiguous.

Inputs follow the acceptance rules of :mod:`dmd2.kernels.contracts` (non-empty ``(B, ...)`` data tensors of
float32 / bfloat16 / float16, the same as every backend); the extension lacks ``philox_normal``, ``fused_dm`` and
``denoise_loss`` (declared there: ``impl="ext"`` raises for them, ``impl="auto"`` never picks it for them).

The extension is compiled on first use (see :mod:`dmd2.kernels.ext_build`). ``impl="ext"`` raises ``RuntimeError``
with the build error when it cannot be built; :func:`auto_status` is what ``impl="auto"`` does when it reaches the
extension (CUDA tensors, Triton unable to run): one warning and a fallback to the reference, or an error when
``DMD2_REQUIRE_EXT=1`` (CI).

Command line (``python -m dmd2.kernels.cuda ...``)::

    --build          build the default flavour for this machine into the cache (install-time step)
    --cpu            build the C++-only flavour and run a smoke check against the reference
    --compile-cuda   compile the CUDA flavour for TORCH_CUDA_ARCH_LIST (default 8.0;9.0); exit 1 on a compile error
    --info           print the toolkit, include folders, flavour and cache key
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import warnings

import torch

from . import ext_build, reference, register

__all__ = ["dm_grad", "dm_loss", "noise_add", "availability", "auto_status", "ensure_loaded", "REQUIRE_ENV", "main"]

REQUIRE_ENV = "DMD2_REQUIRE_EXT"

_lock = threading.Lock()
_failure: str | None = None  # build error of this process (not retried)
_python_side_done = False
_warned = False


# ---------------------------------------------------------------------------------------------------------------------
# Build / load
# ---------------------------------------------------------------------------------------------------------------------

def ensure_loaded() -> None:
    """Build (or load from the cache) the extension for this machine and register its Python side, once per process.

    Raises:
        RuntimeError: the extension cannot be built here; the message carries the reason (compiler output included).
    """
    global _failure
    if _python_side_done:
        return
    with _lock:
        if _python_side_done:
            return
        if _failure is not None:
            raise RuntimeError(_failure)
        try:
            ext_build.build(ext_build.default_flavour())
        except (ext_build.ExtBuildError, ValueError) as e:
            _failure = f"the dmd2 C++/CUDA extension is unavailable: {e}"
            raise RuntimeError(_failure) from e
        _register_python_side()


def availability(*tensors) -> str | None:
    """``None`` when the extension is usable (building it if needed), else the reason; used by the dispatch.

    The answer does not depend on ``tensors`` (a CUDA tensor given to the C++-only build is refused by the op itself,
    naming the build)."""
    try:
        ensure_loaded()
    except RuntimeError as e:
        return str(e)
    return None


def auto_status(*tensors) -> bool:
    """What :func:`dmd2.kernels.resolve` does with the extension under ``impl="auto"``: True when it is usable.

    Reached only for CUDA tensors when Triton cannot run, for the ops the extension declares
    (:data:`dmd2.kernels.contracts.AUTO_ORDER`). When it is not usable, warn once and return False (``resolve`` falls
    back to the reference), or raise ``RuntimeError`` when ``DMD2_REQUIRE_EXT=1`` (CI: a failed build is an error).
    """
    global _warned
    reason = availability()
    if reason is None:
        return True
    if os.environ.get(REQUIRE_ENV, "").strip() == "1":
        raise RuntimeError(f"{REQUIRE_ENV}=1 but {reason}")
    if not _warned:
        _warned = True
        warnings.warn(f"{reason}; falling back to another implementation", RuntimeWarning, stacklevel=2)
    return False


# ---------------------------------------------------------------------------------------------------------------------
# Fake (meta) kernels and autograd; registered once the C++ library has defined the operators
# ---------------------------------------------------------------------------------------------------------------------

def _dm_grad_fake(x, real_x0, fake_x0, eps=1e-6):
    reference.check_dm_inputs(x, real_x0, fake_x0)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _dm_loss_fake(x, real_x0, fake_x0, eps=1e-6):
    g = _dm_grad_fake(x, real_x0, fake_x0, eps)
    return torch.empty((), dtype=torch.float32, device=x.device), g


def _noise_add_fake(x0, alpha, sigma, seed, offset):
    reference.check_batched("x0", x0)
    for name, t in (("alpha", alpha), ("sigma", sigma)):
        if t.dim() != 1 or t.shape[0] != x0.shape[0]:
            raise ValueError(f"dmd2::noise_add_ext: expected {name} of shape ({x0.shape[0]},), got {tuple(t.shape)}")
    return torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a (B,) tensor as (B, 1, ..., 1) to broadcast against ``like`` (B, ...)."""
    return t.reshape((t.shape[0],) + (1,) * (like.dim() - 1))


def _dm_grad_setup(ctx, inputs, output):
    x, real_x0, fake_x0, eps = inputs
    ctx.save_for_backward(x, real_x0, fake_x0)
    ctx.eps = eps


def _dm_grad_backward(ctx, grad_g):
    return (*reference.dm_grad_vjp(*ctx.saved_tensors, grad_g, ctx.eps), None)


def _dm_loss_setup(ctx, inputs, output):
    x = inputs[0]
    _, g = output
    ctx.mark_non_differentiable(g)
    ctx.save_for_backward(g)
    ctx.numel = x.numel()


def _dm_loss_backward(ctx, grad_loss, grad_g_unused):
    (g,) = ctx.saved_tensors
    grad_x = (grad_loss.float() * g.float() / ctx.numel).to(g.dtype)
    return grad_x, None, None, None


def _noise_add_setup(ctx, inputs, output):
    x0, alpha, sigma, seed, offset = inputs
    ctx.save_for_backward(x0, alpha, sigma)
    ctx.seed, ctx.offset = seed, offset


def _noise_add_backward(ctx, grad_out):
    """grad_x0 = alpha_b G;  grad_alpha_b = sum_j G x0;  grad_sigma_b = sum_j G z, z regenerated from (seed, offset)."""
    x0, alpha, sigma = ctx.saved_tensors
    gf = grad_out.float()
    dims = tuple(range(1, x0.dim()))
    grad_x0 = grad_alpha = grad_sigma = None
    if ctx.needs_input_grad[0]:
        grad_x0 = (gf * _per_sample(alpha.float(), x0)).to(x0.dtype)
    if ctx.needs_input_grad[1]:
        prod = gf * x0.float()
        grad_alpha = (prod.sum(dim=dims) if dims else prod).to(alpha.dtype)
    if ctx.needs_input_grad[2]:
        b = x0.shape[0]
        z = torch.ops.dmd2.noise_add_ext(
            x0.new_zeros(x0.shape, dtype=torch.float32), alpha.new_zeros((b,), dtype=torch.float32),
            alpha.new_ones((b,), dtype=torch.float32), ctx.seed, ctx.offset,
        )  # 0 * 0 + 1 * z == z exactly in float32
        prod = gf * z
        grad_sigma = (prod.sum(dim=dims) if dims else prod).to(sigma.dtype)
    return grad_x0, grad_alpha, grad_sigma, None, None


def _register_python_side() -> None:
    global _python_side_done
    torch.library.register_fake("dmd2::dm_grad_ext")(_dm_grad_fake)
    torch.library.register_fake("dmd2::dm_loss_ext")(_dm_loss_fake)
    torch.library.register_fake("dmd2::noise_add_ext")(_noise_add_fake)
    torch.library.register_autograd("dmd2::dm_grad_ext", _dm_grad_backward, setup_context=_dm_grad_setup)
    torch.library.register_autograd("dmd2::dm_loss_ext", _dm_loss_backward, setup_context=_dm_loss_setup)
    torch.library.register_autograd("dmd2::noise_add_ext", _noise_add_backward, setup_context=_noise_add_setup)
    _python_side_done = True


# ---------------------------------------------------------------------------------------------------------------------
# Entry points registered with the dispatch (dmd2.kernels.resolve)
# ---------------------------------------------------------------------------------------------------------------------

def _require_device(t: torch.Tensor) -> None:
    if t.is_cuda and ext_build.loaded_flavour() != "cuda":
        raise RuntimeError(
            "impl='ext' got a CUDA tensor but this process loaded the C++-only build of the dmd2 extension "
            "(no CUDA toolkit was found, or DMD2_EXT_FLAVOUR=cpu); set CUDA_HOME and start a fresh process"
        )


def dm_grad(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """:func:`dmd2.kernels.reference.dm_grad` through the compiled extension; ``(B, ...)`` in, ``(B, ...)`` out."""
    ensure_loaded()
    _require_device(x)
    return torch.ops.dmd2.dm_grad_ext(x, real_x0, fake_x0, eps)


def dm_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """:func:`dmd2.kernels.reference.dm_loss` through the compiled extension: float32 scalar, ``d/dx = g / numel``."""
    ensure_loaded()
    _require_device(x)
    return torch.ops.dmd2.dm_loss_ext(x, real_x0, fake_x0, eps)[0]


def noise_add(x0: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """``alpha_b * x0 + sigma_b * philox_normal(seed, offset, x0.shape)`` through the compiled extension.

    ``x0`` ``(B, ...)``, ``alpha`` / ``sigma`` ``(B,)`` floating tensors on ``x0``'s device, ``seed`` / ``offset``
    integers in ``[0, 2**63)`` with ``offset + x0.numel() <= 2**63``. Result in ``x0``'s dtype.
    """
    for name, v in (("seed", seed), ("offset", offset)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"noise_add: {name} must be a Python int, got {type(v).__name__}")
    ensure_loaded()
    _require_device(x0)
    return torch.ops.dmd2.noise_add_ext(x0, alpha, sigma, seed, offset)


register("dm_grad", "ext", dm_grad, availability, auto_status)
register("dm_loss", "ext", dm_loss)
register("noise_add", "ext", noise_add)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------

def _smoke_check() -> None:
    g = torch.Generator().manual_seed(0)
    x, r, f = (torch.randn(3, 5, 7, generator=g) for _ in range(3))
    torch.testing.assert_close(dm_grad(x, r, f), reference.dm_grad(x, r, f))
    z = noise_add(torch.zeros(2, 9), torch.zeros(2), torch.ones(2), 5, 11)
    torch.testing.assert_close(z, reference.philox_normal(5, 11, (2, 9)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dmd2.kernels.cuda", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--build", action="store_true", help="build the default flavour for this machine")
    g.add_argument("--cpu", action="store_true", help="build the C++-only flavour and smoke-check it")
    g.add_argument("--compile-cuda", action="store_true",
                   help="compile the CUDA flavour (TORCH_CUDA_ARCH_LIST, default 8.0;9.0); fails on a compile error")
    g.add_argument("--info", action="store_true", help="print toolkit, include folders, flavour and cache key")
    p.add_argument("--quiet", action="store_true", help="do not echo the compiler commands")
    args = p.parse_args(argv)
    if args.info:
        home = ext_build.find_cuda_home()
        print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPU visible: {torch.cuda.is_available()}")
        print(f"CUDA toolkit: {home}")
        print(f"extra CUDA includes: {ext_build.cuda_extra_includes()}")
        print(f"default flavour: {ext_build.default_flavour()}")
        print(f"cache: {ext_build.cache_root()}")
        for fl in ext_build.FLAVOURS:
            try:
                print(f"  {fl}: {ext_build.build_spec(fl).key}")
            except ext_build.ExtBuildError as e:
                print(f"  {fl}: unavailable ({e})")
        return 0
    flavour = "cuda" if args.compile_cuda else "cpu" if args.cpu else ext_build.default_flavour()
    if flavour == "cuda" and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = ext_build.DEFAULT_ARCHS
    try:
        folder = ext_build.build(flavour, verbose=not args.quiet)
    except ext_build.ExtBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ensure_loaded()
    _smoke_check()
    print(f"dmd2 extension ({flavour}) built and loaded from {folder}; smoke check against the reference passed")
    return 0


if __name__ == "__main__":
    from dmd2.kernels.cuda import main as _main  # the package module (not __main__) owns the registrations

    sys.exit(_main())
