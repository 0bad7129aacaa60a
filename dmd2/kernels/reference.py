"""Pure-PyTorch reference implementations: the specification of every fused op.

Every other implementation (Triton in ``dmd2/kernels/triton``, the C++/CUDA extension in ``csrc``) must
agree with the functions here; tests and benchmarks import them from this module.

All math runs in float32 whatever the input dtype (bf16 / fp16 inputs are upcast on entry) and results are
returned in the dtype of ``x``. The ``check_*`` functions are the acceptance rules every backend shares
(:mod:`dmd2.kernels.contracts`): data tensors non-empty ``(B, ...)`` of float32 / bfloat16 / float16.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .contracts import DTYPES

__all__ = [
    "dm_grad", "dm_grad_vjp", "dm_loss", "cfg", "check_batched", "check_dm_inputs",
    "philox4x32_10", "uint32_to_uniform", "box_muller", "philox_normal",
    "noise_add", "fused_dm", "FusedDMOutput", "denoise_loss",
    "check_noise_add_inputs", "check_fused_dm_inputs", "check_denoise_loss_inputs",
]


def check_dm_inputs(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``x``, ``real_x0`` and ``fake_x0`` agree in shape, dtype and device.

    Only metadata is read: no host synchronisation.
    """
    check_batched("x", x)
    for name, t in (("real_x0", real_x0), ("fake_x0", fake_x0)):
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] != x.shape[0]:
            raise ValueError(f"batch size mismatch: x has B={x.shape[0]} but {name} has B={t.shape[0]}")
        _check_like(name, t, x)


def dm_grad(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    r"""Distribution-matching gradient of DMD / DMD2 (Yin et al. 2024, Eq. 2 and Sec. 4 of DMD, arXiv 2311.18828).

    .. math::
        g_i = \frac{\hat x_{0,\mathrm{fake}}^{(i)} - \hat x_{0,\mathrm{real}}^{(i)}}
                   {\operatorname{mean}_j |x^{(i)}_j - \hat x_{0,\mathrm{real}}^{(i)}{}_j| + \epsilon}

    The denominator is the per-sample mean absolute distance between the generator sample and the teacher's
    denoised estimate (DMD's "normaliser" that makes the gradient scale-free across noise levels).

    Args:
        x: generator output ``(B, ...)``.
        real_x0: teacher (real score) x0 prediction at ``x_t``, same shape / dtype / device as ``x``.
        fake_x0: fake-score x0 prediction at ``x_t``, same shape / dtype / device as ``x``.
        eps: added to the normaliser; no other guard (a NaN input gives a NaN output).

    Returns:
        ``g`` with the shape and dtype of ``x``; computed in float32.
    """
    check_dm_inputs(x, real_x0, fake_x0)
    xf, rf, ff = x.float(), real_x0.float(), fake_x0.float()
    dims = tuple(range(1, x.dim()))
    if dims:
        norm = (xf - rf).abs().mean(dim=dims, keepdim=True)
    else:  # (B,) inputs: one element per sample
        norm = (xf - rf).abs()
    return ((ff - rf) / (norm + eps)).to(x.dtype)


def dm_grad_vjp(
    x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor, grad_g: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Vector-Jacobian product of :func:`dm_grad` for an upstream gradient ``G`` (the fused backends' backward).

    Per sample, with :math:`d = \operatorname{mean}_j |x_j - r_j| + \epsilon` over ``n`` elements and
    :math:`s = \sum_j G_j (f_j - r_j)`:

    .. math::
        \partial_f = G / d,\quad \partial_x = -\frac{s}{d^2} \frac{\operatorname{sign}(x - r)}{n},\quad
        \partial_r = -G / d - \partial_x

    Math in float32; returns ``(grad_x, grad_real_x0, grad_fake_x0)`` in the inputs' dtypes.
    """
    xf, rf, ff, gf = x.float(), real_x0.float(), fake_x0.float(), grad_g.float()
    dims = tuple(range(1, x.dim()))
    n = xf[0].numel()
    diff = xf - rf
    d = (diff.abs().mean(dim=dims, keepdim=True) if dims else diff.abs()) + eps
    s = (gf * (ff - rf)).sum(dim=dims, keepdim=True) if dims else gf * (ff - rf)
    grad_f = gf / d
    grad_x = (-s / (d * d)) * torch.sign(diff) / n
    grad_r = -grad_f - grad_x
    return grad_x.to(x.dtype), grad_r.to(real_x0.dtype), grad_f.to(fake_x0.dtype)


def dm_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    r"""Scalar surrogate whose gradient with respect to ``x`` is ``dm_grad(x, real_x0, fake_x0) / x.numel()``.

    DMD2's form: ``0.5 * mse(x, (x - g).detach())`` with mean reduction, so
    :math:`\partial L / \partial x = (x - (x - g)) / N = g / N` with ``N = x.numel()``.
    ``real_x0`` and ``fake_x0`` carry no gradient (they are detached here). Returns a float32 scalar.
    """
    g = dm_grad(x.detach(), real_x0.detach(), fake_x0.detach(), eps).float()
    xf = x.float()
    target = (xf - g).detach()
    return 0.5 * torch.nn.functional.mse_loss(xf, target, reduction="mean")


def cfg(uncond: torch.Tensor, cond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    r"""Classifier-free guidance in the standard form :math:`u + s\,(c - u)` (Ho & Salimans 2022).

    ``scale=1`` returns ``cond``; ``scale=0`` returns ``uncond``. Math in float32, result in ``cond``'s dtype.
    ``scale``: a number, a 0-d tensor, a per-sample ``(B,)`` tensor, or a tensor of ``cond``'s rank whose every
    dimension is 1 or ``cond``'s (e.g. ``(B, 1, 1, 1)``); any other shape is refused (a ``(B,)`` scale is never
    broadcast along the last dimension).
    """
    if uncond.shape != cond.shape:
        raise ValueError(f"cfg: uncond and cond must have the same shape, got {tuple(uncond.shape)} and {tuple(cond.shape)}")
    if uncond.dtype != cond.dtype or uncond.device != cond.device:
        raise ValueError(
            f"cfg: uncond and cond must share dtype and device, got {uncond.dtype}/{uncond.device} and {cond.dtype}/{cond.device}"
        )
    if isinstance(scale, torch.Tensor) and scale.dim() > 0:
        if scale.dim() == 1 and cond.dim() > 1 and scale.shape[0] == cond.shape[0]:
            scale = scale.reshape(-1, *([1] * (cond.dim() - 1)))
        elif scale.dim() != cond.dim() or any(s not in (1, n) for s, n in zip(scale.shape, cond.shape)):
            raise ValueError(f"cfg: scale must be a number, a 0-d tensor, a per-sample (B,) = ({cond.shape[0]},) tensor "
                             f"or of cond's rank with each dim 1 or cond's {tuple(cond.shape)}; got {tuple(scale.shape)}")
    u, c = uncond.float(), cond.float()
    return (u + scale * (c - u)).to(cond.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Counter-based noise: Philox4x32-10 + Box-Muller, bit-compatible with ``triton.language.randn``.
# ----------------------------------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9  # golden-ratio Weyl increments of the key (Salmon et al. 2011, "Random123")
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53  # round multipliers of Philox4x32
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_ROUNDS = 10
_UNIFORM_SCALE = 4.6566127342e-10  # largest s with (2**31 - 1) * s < 1 in float32: maps int31 to [0, 1)
_BOX_MULLER_MIN_U = 1.0e-7  # lower clamp of u1 before the log
_TWO_PI = 6.283185307179586
_MAX_COUNTER = 2**63  # counters (offset + i) and seeds stay in [0, 2**63): they fit a signed int64


def _mul32(a: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` 32-bit halves of ``a * c`` for a 32-bit constant ``a`` and int64 tensor ``c`` in [0, 2**32).

    Computed through 16-bit limbs of ``a`` so that no intermediate leaves int64 (no signed overflow).
    """
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_hi = a_hi * c  # < 2**48
    p_lo = a_lo * c  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32_10(seed: int, counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Philox4x32-10 (Salmon et al. 2011) on 64-bit counters, as ``triton.language.randint4x`` computes it.

    The 128-bit counter is ``(c0, c1, c2, c3) = (lo32(n), hi32(n), 0, 0)`` for each element ``n`` of ``counter``;
    the key is ``(k0, k1) = (lo32(seed), hi32(seed))``. Each of the 10 rounds does

    .. math::
        c_0' = \mathrm{hi}(B c_2) \oplus c_1 \oplus k_0,\quad c_2' = \mathrm{hi}(A c_0) \oplus c_3 \oplus k_1,\quad
        c_1' = \mathrm{lo}(B c_2),\quad c_3' = \mathrm{lo}(A c_0)

    with ``A = 0xD2511F53``, ``B = 0xCD9E8D57``, then bumps the key by ``(0x9E3779B9, 0xBB67AE85)`` mod 2**32.

    Args:
        seed: integer key in ``[0, 2**63)``.
        counter: int64 tensor of counters in ``[0, 2**63)``, any shape.

    Returns:
        four int64 tensors shaped like ``counter`` holding the uint32 outputs ``(c0, c1, c2, c3)``.
    """
    if counter.dtype != torch.int64:
        raise ValueError(f"philox4x32_10: counter must be an int64 tensor, got {counter.dtype}")
    zero = torch.zeros_like(counter)
    return _philox_rounds(counter & _MASK32, (counter >> 32) & _MASK32, zero, zero, seed & _MASK32, (seed >> 32) & _MASK32)


def _philox_rounds(c0, c1, c2, c3, k0: int, k1: int):
    """The 10 Philox4x32 rounds on uint32 words held in int64 tensors (see :func:`philox4x32_10`)."""
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mul32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def uint32_to_uniform(u: torch.Tensor) -> torch.Tensor:
    r"""Map uint32 values (held in int64) to float32 in ``[0, 1)`` exactly as Triton's ``uint_to_uniform_float``.

    The bits are read as an int32 ``v``; negative values are folded with ``~v`` (so ``v`` lies in ``[0, 2**31)``),
    converted to float32 (round to nearest) and multiplied in float32 by ``4.6566127342e-10``.
    """
    v = torch.where(u >= 2**31, u - 2**32, u)  # bit pattern as signed int32
    v = torch.where(v < 0, -v - 1, v)  # ~v
    return v.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=u.device)


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    r"""First output of the Box-Muller transform in float32, as Triton's ``pair_uniform_to_normal``:

    .. math:: z = \sqrt{-2 \ln \max(10^{-7}, u_1)}\,\cos(2\pi u_2)
    """
    f32 = torch.float32
    u1 = torch.clamp_min(u1, _BOX_MULLER_MIN_U)  # the bound rounds to float32, as in the kernel
    th = torch.tensor(_TWO_PI, dtype=f32, device=u2.device) * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th)


def _check_seed_offset(seed: int, offset: int, numel: int) -> None:
    for name, v in (("seed", seed), ("offset", offset)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be a Python int, got {type(v).__name__}")
        if not 0 <= v < _MAX_COUNTER:
            raise ValueError(f"{name} must lie in [0, 2**63), got {v}")
    if offset + numel > _MAX_COUNTER:
        raise ValueError(f"offset + numel must not exceed 2**63, got offset={offset} with {numel} elements")


def philox_normal(seed: int, offset: int, shape, device=None) -> torch.Tensor:
    r"""Standard normal noise from the counter-based stream ``(seed, offset)``; float32, shape ``shape``.

    Element ``i`` in row-major (flat) order equals Triton's ``tl.randn(seed, offset + i)`` with a 64-bit offset:
    Philox4x32-10 (:func:`philox4x32_10`) on counter ``offset + i`` with key ``seed``, the first two uint32 outputs
    mapped to uniforms (:func:`uint32_to_uniform`), then :func:`box_muller`. The integer stream and the uniforms are
    bit-identical to Triton's; the normals agree up to the last-ulp differences of ``log`` / ``cos`` / ``sqrt``
    between math libraries (CUDA's approximate intrinsics, numpy in the interpreter, PyTorch here).

    Disjoint draws need disjoint counter ranges: a tensor of ``n`` elements consumes ``[offset, offset + n)``.
    Because the noise is a pure function of ``(seed, offset)``, kernels regenerate it instead of storing it.

    Args:
        seed: integer in ``[0, 2**63)``.
        offset: first counter, integer in ``[0, 2**63 - numel]``.
        shape: output shape (an int or a sequence of ints).
        device: output device (default: CPU).
    """
    shape = torch.Size([shape] if isinstance(shape, int) else shape)
    n = shape.numel()
    _check_seed_offset(seed, offset, n)
    counter = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    c0, c1, _, _ = philox4x32_10(seed, counter)
    return box_muller(uint32_to_uniform(c0), uint32_to_uniform(c1)).reshape(shape)


# ----------------------------------------------------------------------------------------------------------------------
# Noising, the fused distribution-matching step, and the critic's denoising loss.
# ----------------------------------------------------------------------------------------------------------------------


def _check_per_sample(name: str, t, x: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a (B,) float tensor, got {type(t).__name__}")
    if t.shape != (x.shape[0],):
        raise ValueError(f"{name} must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"device mismatch: expected {name} on {x.device}, got {t.device}")


def _check_like(name: str, t, x: torch.Tensor, x_name: str = "x") -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != x.shape:
        raise ValueError(f"shape mismatch: expected {name} of shape {tuple(x.shape)} (like {x_name}), got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise ValueError(f"dtype mismatch: expected {name} of dtype {x.dtype} (like {x_name}), got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"device mismatch: expected {name} on {x.device} (like {x_name}), got {t.device}")


def check_batched(name: str, x) -> None:
    """Raise ``ValueError`` unless ``x`` is a data tensor every backend accepts: ``(B, ...)`` with ``B >= 1`` and no
    zero-sized dimension, of dtype float32, bfloat16 or float16 (metadata only)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty (B, ...) tensor with B >= 1, got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"{name} must be a floating-point tensor of dtype float32, bfloat16 or float16, got {x.dtype}")


def _per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> float32 ``(B, 1, ..., 1)`` broadcastable against ``x``."""
    return t.float().reshape((x.shape[0],) + (1,) * (x.dim() - 1))


def check_noise_add_inputs(x0, alpha, sigma, seed, offset) -> None:
    """Raise ``ValueError`` on inputs :func:`noise_add` cannot take (metadata only, no host sync)."""
    check_batched("x0", x0)
    _check_per_sample("alpha", alpha, x0)
    _check_per_sample("sigma", sigma, x0)
    _check_seed_offset(seed, offset, x0.numel())


def noise_add(x0: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    r"""Forward diffusion with counter-based noise: :math:`x_t = \alpha_b x_0 + \sigma_b \epsilon`.

    ``eps = philox_normal(seed, offset, x0.shape)``: element ``i`` (row-major) of the noise uses counter
    ``offset + i``, so the same ``(seed, offset)`` regenerates the same ``eps`` later (in a backward pass or in the
    critic's loss, :func:`denoise_loss`) without storing it. VP schedules (DDPM / SD / SDXL) pass
    ``alpha = sqrt(alpha_bar_t)``, ``sigma = sqrt(1 - alpha_bar_t)``; EDM passes ``alpha = 1`` and ``sigma`` (Karras
    et al. 2022, Eq. 7: ``x = y + n``, ``n ~ N(0, sigma^2 I)``). DMD2 Sec. 3 (Eq. 1-2) noises generator samples this way.

    Args:
        x0: clean samples ``(B, ...)``, fp32 / bf16 / fp16.
        alpha, sigma: per-sample coefficients ``(B,)``, any float dtype, same device as ``x0``.
        seed, offset: the noise stream (see :func:`philox_normal`); the draw consumes ``[offset, offset + x0.numel())``.

    Returns:
        ``x_t`` shaped like ``x0`` in ``x0.dtype`` (math in float32). Differentiable in ``x0``, ``alpha`` and ``sigma``.
    """
    check_noise_add_inputs(x0, alpha, sigma, seed, offset)
    eps = philox_normal(seed, offset, x0.shape, device=x0.device)
    return (_per_sample(alpha, x0) * x0.float() + _per_sample(sigma, x0) * eps).to(x0.dtype)


PREDICTIONS = ("x0", "eps")


class FusedDMOutput(NamedTuple):
    """Result of :func:`fused_dm`.

    loss: float32 scalar surrogate, value ``0.5 * mean(g**2)``, ``d loss / d x = g / x.numel()``.
    grad: ``g`` shaped like ``x`` in ``x.dtype``.
    norm: float32 ``(B,)``: the per-sample normaliser ``mean_j |x - real_x0| + eps``.
    real_x0, fake_x0: the guided teacher and fake x0 estimates (``x.dtype``), or ``None`` unless ``return_x0``.
    """

    loss: torch.Tensor
    grad: torch.Tensor
    norm: torch.Tensor
    real_x0: torch.Tensor | None
    fake_x0: torch.Tensor | None


def check_fused_dm_inputs(x, x_t, real_cond, real_uncond, fake, alpha, sigma, guidance_scale, prediction) -> None:
    """Raise ``ValueError`` on inputs :func:`fused_dm` cannot take (metadata only, no host sync)."""
    check_batched("x", x)
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    _check_like("real_cond", real_cond, x)
    _check_like("fake", fake, x)
    if real_uncond is not None:
        _check_like("real_uncond", real_uncond, x)
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise ValueError(f"guidance_scale must be a Python float, got {type(guidance_scale).__name__}")
    if real_uncond is None and guidance_scale != 1:
        raise ValueError(f"guidance_scale={guidance_scale} needs real_uncond (classifier-free guidance); got None")
    if prediction == "eps":
        if x_t is None or alpha is None or sigma is None:
            raise ValueError("prediction='eps' needs x_t, alpha and sigma to convert eps predictions to x0")
        _check_like("x_t", x_t, x)
        _check_per_sample("alpha", alpha, x)
        _check_per_sample("sigma", sigma, x)


def fused_dm(
    x: torch.Tensor,
    x_t: torch.Tensor | None,
    real_cond: torch.Tensor,
    real_uncond: torch.Tensor | None,
    fake: torch.Tensor,
    alpha: torch.Tensor | None = None,
    sigma: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    prediction: str = "x0",
    eps: float = 1e-6,
    return_x0: bool = False,
) -> FusedDMOutput:
    r"""The whole distribution-matching step of DMD2's generator update (Sec. 3, Eq. 2; docs/design.md "Generator update" 3-4).

    With ``P`` the prediction-to-x0 map (``P(y) = y`` for ``prediction="x0"``, ``P(y) = (x_t - sigma_b y) / alpha_b``
    for ``prediction="eps"``) and ``s`` the CFG scale:

    .. math::
        \hat x_{0,\mathrm{real}} = P(u + s (c - u)),\quad \hat x_{0,\mathrm{fake}} = P(f),\quad
        n_b = \operatorname{mean}_j |x_{bj} - \hat x_{0,\mathrm{real},bj}| + \epsilon,\quad
        g = (\hat x_{0,\mathrm{fake}} - \hat x_{0,\mathrm{real}}) / n_b

    and the scalar surrogate ``loss`` (value ``0.5 * mean(g^2)``) whose gradient is ``d loss / d x = g / x.numel()``
    (``0.5 * mse(x, (x - g).detach())``, as :func:`dm_loss`). ``x_t``, ``real_*`` and ``fake`` get no gradient.
    ``guidance_scale`` is applied in prediction space; ``P`` is affine, so guiding eps or x0 gives the same x0.
    A fused implementation reads the inputs twice: a per-sample reduction (``n_b``), then one elementwise pass.

    Args:
        x: generator output ``(B, ...)``, fp32 / bf16 / fp16.
        x_t: its noised version (only needed, and only read, for ``prediction="eps"``; else may be ``None``).
        real_cond, real_uncond: teacher predictions with / without the condition, like ``x``;
            ``real_uncond=None`` means no guidance (``guidance_scale`` must then be 1).
        fake: fake-score prediction, like ``x``.
        alpha, sigma: ``(B,)`` schedule coefficients at ``t`` (``prediction="eps"`` only; EDM: ``alpha = 1``).
        guidance_scale: the CFG scale ``s`` (Python float; SDXL recipe: 8).
        prediction: ``"x0"`` or ``"eps"``, what the three predictions are.
        eps: added to the normaliser.
        return_x0: also return the two x0 estimates (costs two extra writes in fused implementations).
    """
    check_fused_dm_inputs(x, x_t, real_cond, real_uncond, fake, alpha, sigma, guidance_scale, prediction)
    real = real_cond.detach().float()
    if real_uncond is not None:
        u = real_uncond.detach().float()
        real = u + guidance_scale * (real - u)
    fk = fake.detach().float()
    if prediction == "eps":
        xt, a, s = x_t.detach().float(), _per_sample(alpha, x), _per_sample(sigma, x)
        real = (xt - s * real) / a
        fk = (xt - s * fk) / a
    xd = x.detach().float()
    norm = (xd - real).abs().reshape(x.shape[0], -1).mean(dim=1) + eps
    g = (fk - real) / _per_sample(norm, x)
    xf = x.float()
    loss = 0.5 * torch.nn.functional.mse_loss(xf, (xf - g).detach(), reduction="mean")
    out_x0 = (real.to(x.dtype), fk.to(x.dtype)) if return_x0 else (None, None)
    return FusedDMOutput(loss, g.to(x.dtype), norm, *out_x0)


TARGETS = ("eps", "x0")


def check_denoise_loss_inputs(pred, weight, target, x0, seed, offset) -> None:
    """Raise ``ValueError`` on inputs :func:`denoise_loss` cannot take (metadata only, no host sync)."""
    check_batched("pred", pred)
    _check_per_sample("weight", weight, pred)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if target == "eps":
        if seed is None or offset is None:
            raise ValueError("target='eps' needs the noise stream's seed and offset (the eps is regenerated)")
        _check_seed_offset(seed, offset, pred.numel())
    else:
        if x0 is None:
            raise ValueError("target='x0' needs x0")
        _check_like("x0", x0, pred, "pred")


def denoise_loss(
    pred: torch.Tensor,
    weight: torch.Tensor,
    target: str = "eps",
    x0: torch.Tensor | None = None,
    seed: int | None = None,
    offset: int | None = None,
) -> torch.Tensor:
    r"""Per-sample weighted denoising score-matching loss of the critic (DMD2 Sec. 4.2; docs/design.md "Critic update" 2).

    .. math:: L_b = w_b \operatorname{mean}_j (\mathrm{pred}_{bj} - y_{bj})^2

    with target ``y = eps = philox_normal(seed, offset, pred.shape)`` (``target="eps"``: eps-MSE of VP / SDXL; the
    noise is the one :func:`noise_add` drew with the same ``(seed, offset)``, regenerated, never stored) or
    ``y = x0`` (``target="x0"``: EDM's x0-MSE, with ``w_b = lambda(sigma_b) = 1/sigma_b^2 + 1/sigma_data^2``,
    Karras et al. 2022 Eq. 8). For an x0-predicting denoiser, eps-MSE equals x0-MSE with ``w_b = alpha_b^2/sigma_b^2``.

    Args:
        pred: the fake score's prediction ``(B, ...)``; the only input that receives a gradient:
            ``dL_b / d pred_bj = 2 w_b (pred_bj - y_bj) / n`` with ``n = pred[0].numel()``.
        weight: ``(B,)`` per-sample weights (no gradient).
        target: ``"eps"`` or ``"x0"``.
        x0: clean samples like ``pred`` (``target="x0"`` only; no gradient).
        seed, offset: the noise stream (``target="eps"`` only).

    Returns:
        float32 ``(B,)`` per-sample losses (the caller reduces).
    """
    check_denoise_loss_inputs(pred, weight, target, x0, seed, offset)
    if target == "eps":
        y = philox_normal(seed, offset, pred.shape, device=pred.device)
    else:
        y = x0.detach().float()
    d = (pred.float() - y).reshape(pred.shape[0], -1)
    return weight.detach().float() * d.square().mean(dim=1)
