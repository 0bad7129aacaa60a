"""Shared launch helpers of the Triton kernels: block-size heuristic, output allocation, input layout."""
from __future__ import annotations

import torch
import triton

# Decided once: @triton.jit turns functions into interpreted ones when TRITON_INTERPRET=1 at definition time.
INTERPRETED = bool(triton.knobs.runtime.interpret)


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
