"""dm_grad / dm_loss / cfg: the formula, its properties, and bad input."""
import pytest
import torch
from hypothesis import given, strategies as st

from dmd2 import kernels
from dmd2.core import cfg, dm_grad, dm_loss

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def formula(x, r, f, eps=1e-6):
    """The formula written out, in float64, sample by sample."""
    out = torch.empty(x.shape, dtype=torch.float64)
    for i in range(x.shape[0]):
        xi, ri, fi = x[i].double(), r[i].double(), f[i].double()
        out[i] = (fi - ri) / ((xi - ri).abs().mean() + eps)
    return out


shapes = st.lists(st.integers(1, 7), min_size=0, max_size=3).flatmap(
    lambda rest: st.integers(1, 5).map(lambda b: (b, *rest)))


def _make(shape, dtype, seed, noncontig):
    g = torch.Generator().manual_seed(seed)
    ts = []
    for _ in range(3):
        if noncontig:
            big = torch.randn(*shape, 2, generator=g).to(dtype)
            ts.append(big[..., 0])  # stride 2 in the last dim
        else:
            ts.append(torch.randn(*shape, generator=g).to(dtype))
    return ts


@given(shape=shapes, seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       noncontig=st.booleans())
def test_dm_grad_equals_formula(shape, seed, dtype, noncontig):
    x, r, f = _make(shape, dtype, seed, noncontig)
    if noncontig and x.numel() > 1:
        assert not x.is_contiguous()
    g = dm_grad(x, r, f)
    assert g.shape == x.shape and g.dtype == dtype
    torch.testing.assert_close(g.double(), formula(x, r, f).to(dtype).double(), **TOL[dtype])


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_zero_when_real_equals_fake(shape, seed):
    x, r, _ = _make(shape, torch.float32, seed, False)
    assert torch.equal(dm_grad(x, r, r.clone()), torch.zeros_like(x))


@given(shape=shapes, seed=st.integers(0, 2**16), a=st.floats(-4, 4))
def test_linear_in_fake_minus_real(shape, seed, a):
    x, r, f = _make(shape, torch.float32, seed, False)
    d = f - r
    torch.testing.assert_close(dm_grad(x, r, r + a * d), a * dm_grad(x, r, r + d), rtol=1e-4, atol=1e-5)


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_dm_loss_gradient_is_dm_grad_over_numel(shape, seed):
    x, r, f = _make(shape, torch.float32, seed, False)
    x = x.clone().requires_grad_(True)
    loss = dm_loss(x, r, f)
    assert loss.dim() == 0
    (gx,) = torch.autograd.grad(loss, x)
    # the surrogate forms x - (x - g) in fp32: rounding of ~ulp(max(|x|, |g|)) / numel, hence the atol
    g = dm_grad(x.detach(), r, f)
    scale = max(float(x.detach().abs().max()), float(g.abs().max()))
    atol = 4 * torch.finfo(torch.float32).eps * scale / x.numel()
    torch.testing.assert_close(gx, g / x.numel(), rtol=1e-5, atol=atol)


def test_dm_loss_bf16_gradient():
    x, r, f = _make((3, 4, 5), torch.bfloat16, 1, False)
    x = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(dm_loss(x, r, f), x)
    assert gx.dtype == torch.bfloat16
    torch.testing.assert_close(gx.float(), (dm_grad(x.detach(), r, f).float() / x.numel()), rtol=2e-2, atol=1e-6)


def test_no_nan_scrubbing():
    x, r, f = _make((2, 3), torch.float32, 0, False)
    f[0, 1] = float("nan")
    g = dm_grad(x, r, f)
    assert torch.isnan(g[0, 1]) and torch.isfinite(g[1]).all()
    # x == real everywhere: the normaliser is eps only, no clamping of the result
    g = dm_grad(r.clone(), r, r + 1.0, eps=1e-6)
    torch.testing.assert_close(g, torch.full_like(r, 1e6))


@pytest.mark.parametrize("bad,match", [
    (lambda x: (x, x[:1], x), "batch size"),
    (lambda x: (x, x[:, :2], x), "shape"),
    (lambda x: (x, x.double(), x), "dtype"),
    (lambda x: (x, x, x.to("meta")), "device"),
    (lambda x: (x.long(), x.long(), x.long()), "floating"),
    (lambda x: (x, x, x.long()), "dtype"),
])
def test_bad_input_is_a_clear_value_error(bad, match):
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=match):
        dm_grad(*bad(x))
    with pytest.raises(ValueError, match=match):
        dm_loss(*bad(x))


def test_cfg_standard_form():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    torch.testing.assert_close(cfg(u, c, 1.0), c, rtol=0, atol=1e-6)  # u + (c - u) == c up to rounding
    assert torch.equal(cfg(u, c, 0.0), u)
    torch.testing.assert_close(cfg(u, c, 8.0), u + 8.0 * (c - u))
    with pytest.raises(ValueError, match="same shape"):
        cfg(u, c[:1], 2.0)


def test_dispatch_names_and_errors(monkeypatch):
    x, r, f = _make((2, 3), torch.float32, 0, False)
    assert torch.equal(kernels.dm_grad(x, r, f, impl="torch"), dm_grad(x, r, f))
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.dm_grad(x, r, f, impl="cuda-magic")
    # an explicit implementation that cannot run raises RuntimeError with its reason; it never falls back
    monkeypatch.setitem(kernels._REGISTRY["dm_grad"], "ext", lambda *a: 1 / 0)
    monkeypatch.setitem(kernels._AVAILABILITY, "ext", lambda *tensors: "built without a compiler")
    with pytest.raises(RuntimeError, match="built without a compiler"):
        kernels.dm_grad(x, r, f, impl="ext")
    # the environment variable overrides impl="auto"
    calls = []
    monkeypatch.setitem(kernels._REGISTRY["dm_grad"], "ext", lambda *a: calls.append(1) or a[0])
    monkeypatch.setitem(kernels._AVAILABILITY, "ext", lambda *tensors: None)
    monkeypatch.setenv(kernels.ENV_VAR, "ext")
    kernels.dm_grad(x, r, f)
    assert calls == [1]
    monkeypatch.setenv(kernels.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=kernels.ENV_VAR):
        kernels.dm_grad(x, r, f)
