"""The pure-PyTorch Philox4x32-10 + Box-Muller stream (dmd2.kernels.reference.philox_normal).

Properties: Random123 known answers, bit-identity of the integer stream and the uniforms with Triton's own
``tl.randint4x`` / ``tl.rand`` (run by Triton's interpreter on CPU), agreement of the normals with ``tl.randn`` up to
the last ulps of ``log``/``cos``, counter arithmetic (a draw at ``offset`` is a slice of a longer draw), and the
moments / neighbour correlations of the normals within statistical bounds.
"""
import math

import pytest
import torch

from dmd2.kernels import reference as R

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@pytest.mark.parametrize(
    "counter, key, expected",
    [  # Random123 kat_vectors for philox4x32_10
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, expected):
    c = [torch.tensor([v], dtype=torch.int64) for v in counter]
    out = R._philox_rounds(*c, *key)
    assert tuple(int(v) for v in out) == expected


@triton.jit
def _triton_stream(out_int, out_uni, out_normal, n, seed, offset, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    c = offset + i  # int64 counter: Triton splits it into (lo, hi) words
    r0, r1, _, _ = tl.randint4x(seed, c)
    tl.store(out_int + 2 * i, r0.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_int + 2 * i + 1, r1.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_uni + i, tl.rand(seed, c), mask=mask)
    tl.store(out_normal + i, tl.randn(seed, c), mask=mask)


# Normals: same integers and uniforms, but log/sqrt/cos come from different math libraries (numpy in the
# interpreter, CUDA intrinsics on GPU, PyTorch here), so they may differ in the last ulps: |z| < 5.7 always
# (u1 >= 1e-7), and a few float32 ulps of that is < 2e-6.
NORMAL_ATOL = 2e-6


@pytest.mark.parametrize(
    "seed, offset, n, block",
    [
        (0, 0, 1, 16),
        (123, 5, 1000, 64),
        (2**40 + 7, 2**32 - 300, 777, 128),  # counters cross the 32-bit boundary: the hi word matters
        (2**62 + 11, 2**62, 4097, 1024),
        (7, 3, 100_003, 8192),
    ],
)
def test_reference_matches_triton_randn(seed, offset, n, block):
    out_int = torch.full((2 * n,), -1, dtype=torch.int32)
    out_uni = torch.full((n,), float("nan"))
    out_normal = torch.full((n,), float("nan"))
    _triton_stream[(triton.cdiv(n, block),)](out_int, out_uni, out_normal, n, seed, offset, BLOCK=block)

    counter = torch.arange(offset, offset + n, dtype=torch.int64)
    c0, c1, _, _ = R.philox4x32_10(seed, counter)
    assert torch.equal(out_int.to(torch.int64) & 0xFFFFFFFF, torch.stack([c0, c1], 1).reshape(-1))
    assert torch.equal(out_uni, R.uint32_to_uniform(c0))
    ref = R.philox_normal(seed, offset, (n,))
    assert ref.dtype == torch.float32
    torch.testing.assert_close(out_normal, ref, rtol=0, atol=NORMAL_ATOL)


def test_offset_is_a_counter():
    full = R.philox_normal(11, 100, (3, 50))
    part = R.philox_normal(11, 100 + 17, (20,))
    assert torch.equal(full.reshape(-1)[17:37], part)
    assert not torch.equal(R.philox_normal(12, 100, (3, 50)), full)  # the seed is the key


def test_uniforms_in_unit_interval():
    u = R.uint32_to_uniform(torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64))
    assert (u >= 0).all() and (u < 1).all()
    assert u[0] == 0 and u[4] == 0  # 0 and ~0 fold to the same int31


@pytest.mark.parametrize("seed", [0, 2024, 2**50 + 3])
def test_normal_moments_and_neighbour_correlation(seed):
    n = 1 << 20
    z = R.philox_normal(seed, 12345, (n,)).double()
    se = 1 / math.sqrt(n)
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2) * se
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96) * se  # kurtosis of a normal: 3, var(z^4) = 96
    for lag in (1, 2, 4):  # consecutive counters must be uncorrelated
        corr = torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1].item()
        assert abs(corr) < 5 * se
    # neighbouring seeds at the same counters must be uncorrelated too
    z2 = R.philox_normal(seed + 1, 12345, (n,)).double()
    assert abs(torch.corrcoef(torch.stack([z, z2]))[0, 1].item()) < 5 * se


def test_normal_distribution_ks():
    scipy_stats = pytest.importorskip("scipy.stats")
    z = R.philox_normal(99, 0, (200_000,)).double().numpy()
    assert scipy_stats.kstest(z, "norm").pvalue > 1e-3


@pytest.mark.parametrize(
    "seed, offset, shape",
    [(-1, 0, (2,)), (0, -5, (2,)), (2**63, 0, (2,)), (0, 2**63 - 1, (2,)), (1.5, 0, (2,)), (0, True, (2,))],
)
def test_bad_seed_or_offset_raises(seed, offset, shape):
    with pytest.raises(ValueError, match="seed|offset"):
        R.philox_normal(seed, offset, shape)
