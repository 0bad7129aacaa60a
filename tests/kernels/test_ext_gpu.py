"""The CUDA kernels of the extension against the reference on a GPU (skipped where none is present).

Covers the 16-byte vector path (aligned rows) and the scalar path (rows misaligned by one element, odd sizes),
every dtype, the Philox stream (integer-exact: normals within a few float32 ulps of the reference), and backward.
"""
import pytest
import torch

from dmd2.kernels import cuda as ext
from dmd2.kernels import reference as R

pytestmark = pytest.mark.gpu

SLACK = {torch.float32: 4e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@pytest.fixture(scope="module", autouse=True)
def _built():
    ext.ensure_loaded()


def _oracle(x, r, f, eps=1e-6):
    xd, rd, fd = x.double(), r.double(), f.double()
    dims = tuple(range(1, x.dim()))
    return (fd - rd) / ((xd - rd).abs().mean(dim=dims, keepdim=True) + eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, misalign", [((4, 4, 128, 128), False), ((3, 3, 17, 19), False),
                                             ((2, 5000), True), ((1, 1), False), ((70000, 3), False)])
def test_dm_grad_cuda_matches_reference(dtype, shape, misalign):
    g = torch.Generator(device="cuda").manual_seed(0)
    def make():
        n = shape[0] * torch.Size(shape[1:]).numel()
        buf = torch.randn(n + 1, generator=g, device="cuda").to(dtype)
        return (buf[1:] if misalign else buf[:n]).view(shape)  # +1 element: rows lose 16-byte alignment
    x, r, f = make(), make(), make()
    got = ext.dm_grad(x, r, f)
    ref = R.dm_grad(x, r, f)
    o = _oracle(x, r, f)
    err_got, err_ref = (got.double() - o).abs().max(), (ref.double() - o).abs().max()
    assert err_got <= 2 * err_ref + SLACK[dtype] * o.abs().max()


def test_dm_grad_cuda_is_deterministic_and_batch_strided():
    x, r, f = (torch.randn(8, 4, 64, 64, device="cuda") for _ in range(3))
    a = ext.dm_grad(x[::2], r[::2], f[::2])
    assert torch.equal(a, ext.dm_grad(x[::2].contiguous(), r[::2].contiguous(), f[::2].contiguous()))
    assert torch.equal(a, ext.dm_grad(x[::2], r[::2], f[::2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 4, 128, 128), (3, 7, 11), (5,)])
def test_noise_add_cuda_matches_reference(dtype, shape):
    seed, offset = 2**40 + 3, 2**32 - 1000
    x0 = torch.randn(shape, device="cuda").to(dtype)
    alpha, sigma = torch.rand(shape[0], device="cuda"), torch.rand(shape[0], device="cuda")
    z = R.philox_normal(seed, offset, shape, device="cuda")
    bshape = (shape[0],) + (1,) * (len(shape) - 1)
    want = (alpha.view(bshape) * x0.float() + sigma.view(bshape) * z).to(dtype)
    got = ext.noise_add(x0, alpha, sigma, seed, offset)
    ulp = {torch.float32: 4e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=ulp, atol=6 * ulp)
    zz = ext.noise_add(torch.zeros(shape, device="cuda"), torch.zeros(shape[0], device="cuda"),
                       torch.ones(shape[0], device="cuda"), seed, offset)
    torch.testing.assert_close(zz, z, rtol=0, atol=4e-6)  # a wrong integer bit would be O(1) off


def test_dm_loss_cuda_backward():
    x = torch.randn(2, 3, 32, 32, device="cuda", requires_grad=True)
    r, f = torch.randn_like(x), torch.randn_like(x)
    (gx,) = torch.autograd.grad(ext.dm_loss(x, r, f), x)
    torch.testing.assert_close(gx, R.dm_grad(x.detach(), r, f) / x.numel(), rtol=1e-5, atol=1e-9)


def test_opcheck_cuda():
    x, r, f = (torch.randn(2, 3, 8, device="cuda", requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.dmd2.dm_grad_ext.default, (x, r, f, 1e-6))
    a, s = torch.rand(2, device="cuda"), torch.rand(2, device="cuda")
    torch.library.opcheck(torch.ops.dmd2.noise_add_ext.default, (x, a, s, 1, 2))
