"""Shared helpers of the Triton kernels: block-size heuristic, output allocation, input layout, rounded stores."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Decided once: @triton.jit turns functions into interpreted ones when TRITON_INTERPRET=1 at definition time.
INTERPRETED = bool(triton.knobs.runtime.interpret)
_SOFT_BF16: tl.constexpr = tl.constexpr(INTERPRETED)


@triton.jit
def _store_bf16_soft(ptr, v, mask):
    """float32 ``v`` to bfloat16 rounded to nearest, ties to even, in integer arithmetic (``torch``'s rule; NaN ->
    ``0x7FC0``): keep the upper 16 bits of ``bits + 0x7FFF + (bit 16 of bits)``."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    rounded = tl.where(v == v, rounded, 0x7FC0)
    tl.store(ptr, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)


@triton.jit
def store(ptr, v, mask):
    """``tl.store(ptr, v, mask)`` of float32 ``v`` in ``ptr``'s element type, rounded to nearest (even): what compiled
    kernels' casts do. Triton's CPU interpreter truncates float32 -> bfloat16 (and mangles subnormals), which would
    put a second rounding error on every bf16 output there; under it bf16 goes through :func:`_store_bf16_soft`."""
    if _SOFT_BF16:
        if ptr.dtype.element_ty == tl.bfloat16:
            _store_bf16_soft(ptr, v, mask)
        else:
            tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)


def alloc(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every output and scratch buffer comes from here (tests replace it to NaN-poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def block_size(n: int) -> int:
    """Elements per program along a row of ``n`` elements.

    A heuristic instead of ``@triton.autotune`` (more than one config fails in the interpreter): 1024 elements
    (4 warps x 8 per thread) keeps enough bytes in flight per SM for these bandwidth-bound kernels on H100-class
    GPUs; the interpreter prefers few, large programs (its cost is per program, numpy does the rest).
    """
    cap = 16384 if INTERPRETED else 1024
    return max(16, min(cap, triton.next_power_of_2(n)))


def rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Contiguous ``(B, n)`` view of ``t`` (copies only a non-contiguous input); the kernels index it row-major."""
    return t.detach().contiguous().view(batch, -1)


def per_sample(t: torch.Tensor) -> torch.Tensor:
    """``(B,)`` coefficients as contiguous float32 (a few bytes)."""
    return t.detach().to(torch.float32).contiguous()
