"""The compiled extension (impl="ext", csrc/) against the reference on CPU tensors.

Properties: dm_grad / dm_loss / noise_add agree with dmd2.kernels.reference over shapes, dtypes and memory layouts
(flash-attention's rule: error against a float64 oracle at most 2x the error of the same-dtype reference, plus a
dtype-sized slack); backward passes with random upstream gradients match autograd of the reference; the noise stream
is Philox-exact across the 32-bit counter boundary; every bad input raises ValueError naming the problem;
torch.library.opcheck passes; torch.compile(fullgraph=True) traces a step through the ops; and the C++ kernels are what
ran (profiler).
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dmd2.kernels as K
from dmd2.kernels import cuda as ext
from dmd2.kernels import reference as R


@pytest.fixture(scope="module", autouse=True)
def _built():
    ext.ensure_loaded()  # impl="ext" must build here: a failure is a test failure, not a skip


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# slack relative to max|oracle|: a few ulps of the output dtype
SLACK = {torch.float32: 4e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _dm_grad64(x, r, f, eps):
    xd, rd, fd = x.double(), r.double(), f.double()
    dims = tuple(range(1, x.dim()))
    norm = (xd - rd).abs().mean(dim=dims, keepdim=True) if dims else (xd - rd).abs()
    return (fd - rd) / (norm + eps)


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """Same values as ``t`` in another memory layout."""
    if kind == "contiguous":
        return t
    if kind == "batch_strided":  # every other sample of a twice-as-large batch
        big = torch.empty((2 * t.shape[0],) + t.shape[1:], dtype=t.dtype)
        big[::2] = t
        return big[::2]
    if kind == "inner_strided":  # samples not contiguous inside (last dims transposed)
        if t.dim() < 3:
            return t.t().contiguous().t() if t.dim() == 2 else t
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise AssertionError(kind)


shapes = st.one_of(
    st.tuples(st.integers(1, 5)),
    st.tuples(st.integers(1, 4), st.integers(1, 70)),
    st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 17), st.integers(1, 19)),
)


def _inputs(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * scale).to(dtype) for _ in range(3)]


@settings(max_examples=40, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1),
       layout=st.sampled_from(["contiguous", "batch_strided", "inner_strided"]),
       scale=st.sampled_from([1e-3, 1.0, 30.0]), eps=st.sampled_from([1e-6, 0.0, 0.5]))
def test_dm_grad_matches_reference(shape, dtype, seed, layout, scale, eps):
    x, r, f = (_layout(t, layout) for t in _inputs(shape, dtype, seed, scale))
    got = K.dm_grad(x, r, f, eps, impl="ext")
    ref = R.dm_grad(x, r, f, eps)
    oracle = _dm_grad64(x, r, f, eps)
    assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous()
    err_got = (got.double() - oracle).abs().max()
    err_ref = (ref.double() - oracle).abs().max()
    assert err_got <= 2 * err_ref + SLACK[dtype] * oracle.abs().max(), (err_got, err_ref)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1),
       layout=st.sampled_from(["contiguous", "batch_strided", "inner_strided"]))
def test_dm_grad_backward_random_upstream(shape, dtype, seed, layout):
    x, r, f = (_layout(t, layout).requires_grad_() for t in _inputs(shape, dtype, seed))
    up = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    got = torch.autograd.grad(K.dm_grad(x, r, f, impl="ext"), (x, r, f), up)
    # oracle: autograd of the float64 formula
    xd, rd, fd = (t.detach().double().requires_grad_() for t in (x, r, f))
    want = torch.autograd.grad(_dm_grad64(xd, rd, fd, 1e-6), (xd, rd, fd), up.double())
    ref = torch.autograd.grad(R.dm_grad(x, r, f), (x, r, f), up)
    for a, o, b in zip(got, want, ref):
        assert a.dtype == dtype
        err_got = (a.double() - o).abs().max()
        err_ref = (b.double() - o).abs().max()
        assert err_got <= 2 * err_ref + SLACK[dtype] * o.abs().max(), (err_got, err_ref)


@settings(max_examples=20, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1), up=st.floats(-3, 3))
def test_dm_loss_value_and_gradient(shape, dtype, seed, up):
    x, r, f = _inputs(shape, dtype, seed)
    xe = x.clone().requires_grad_()
    loss = K.dm_loss(xe, r, f, impl="ext")
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, R.dm_loss(x, r, f), rtol=2e-5 if dtype == torch.float32 else 1e-2, atol=1e-7)
    (gx,) = torch.autograd.grad(loss * up, xe)
    # d loss / dx == dm_grad / numel (the DMD2 surrogate), times the upstream scalar
    g = R.dm_grad(x, r, f).float()
    want = (up * g / x.numel()).to(dtype)
    torch.testing.assert_close(gx, want, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-6 / x.numel())
    xr = x.clone().requires_grad_()
    (gr,) = torch.autograd.grad(R.dm_loss(xr, r, f) * up, xr)
    torch.testing.assert_close(gx.float(), gr.float(), rtol=2e-2, atol=1e-6 / x.numel())


def test_dm_loss_gives_no_gradient_to_the_targets():
    x, r, f = (t.requires_grad_() for t in _inputs((2, 3, 4), torch.float32, 0))
    gx, gr, gf = torch.autograd.grad(K.dm_loss(x, r, f, impl="ext"), (x, r, f), allow_unused=True)
    assert gr is None and gf is None and gx.abs().sum() > 0


def test_dm_grad_nan_propagates():
    x, r, f = _inputs((2, 8), torch.float32, 1)
    x[1, 3] = float("nan")
    g = K.dm_grad(x, r, f, impl="ext")
    assert torch.isnan(g[1]).all() and torch.isfinite(g[0]).all()  # nothing scrubbed; sample 0 untouched


# --------------------------------------------------------------------------------------------------------------------
# noise_add: x_t = alpha_b * x0 + sigma_b * philox_normal(seed, offset)
# --------------------------------------------------------------------------------------------------------------------

def _noise_add_spec(x0, alpha, sigma, seed, offset):
    if hasattr(R, "noise_add"):
        return R.noise_add(x0, alpha, sigma, seed, offset)
    z = R.philox_normal(seed, offset, x0.shape)
    shape = (x0.shape[0],) + (1,) * (x0.dim() - 1)
    return (alpha.float().reshape(shape) * x0.float() + sigma.float().reshape(shape) * z).to(x0.dtype)


def test_noise_stream_is_philox_exact_across_the_hi_word():
    # alpha = 0, sigma = 1 returns the normals themselves; a wrong integer bit would move a normal by O(1),
    # libm differences in log/cos move it by a few float32 ulps (|z| < 5.7).
    for seed, offset in [(0, 0), (2**40 + 7, 2**32 - 300), (2**63 - 1, 2**63 - 2000)]:
        x0 = torch.zeros(3, 5, 7)
        z = K.resolve("noise_add", "ext", x0)(x0, torch.zeros(3), torch.ones(3), seed, offset)
        torch.testing.assert_close(z, R.philox_normal(seed, offset, x0.shape), rtol=0, atol=2e-6)


def test_noise_counter_arithmetic():
    """A draw at offset + k equals elements k.. of a longer draw at offset (no dependence on chunking)."""
    x0 = torch.zeros(1, 40000)
    full = ext.noise_add(x0, torch.zeros(1), torch.ones(1), 9, 100)
    tail = ext.noise_add(torch.zeros(1, 39000), torch.zeros(1), torch.ones(1), 9, 1100)
    assert torch.equal(full[:, 1000:], tail)
    b2 = ext.noise_add(torch.zeros(2, 20000), torch.zeros(2), torch.ones(2), 9, 100)
    assert torch.equal(b2.reshape(1, -1), full)  # sample b starts at counter offset + b * n


@settings(max_examples=30, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**63 - 1), offset=st.integers(0, 2**40),
       layout=st.sampled_from(["contiguous", "batch_strided", "inner_strided"]),
       coef_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_noise_add_matches_reference(shape, dtype, seed, offset, layout, coef_dtype):
    g = torch.Generator().manual_seed(seed % 2**31)
    x0 = _layout(torch.randn(shape, generator=g).to(dtype), layout)
    alpha = torch.rand(shape[0], generator=g).to(coef_dtype)
    sigma = torch.rand(shape[0], generator=g).to(coef_dtype)
    got = K.resolve("noise_add", "ext", x0)(x0, alpha, sigma, seed, offset)
    want = _noise_add_spec(x0, alpha, sigma, seed, offset)
    assert got.dtype == dtype and got.shape == x0.shape
    ulp = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=ulp, atol=ulp * 6)


def test_noise_add_backward_random_upstream():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 4, 5, generator=g, dtype=torch.float64).float().requires_grad_()
    alpha = torch.rand(3, generator=g).requires_grad_()
    sigma = torch.rand(3, generator=g).requires_grad_()
    up = torch.randn(3, 4, 5, generator=g)
    seed, offset = 77, 2**32 - 10
    got = torch.autograd.grad(ext.noise_add(x0, alpha, sigma, seed, offset), (x0, alpha, sigma), up)
    z = R.philox_normal(seed, offset, x0.shape)
    want_x0 = up * alpha[:, None, None].detach()
    want_alpha = (up * x0.detach()).sum(dim=(1, 2))
    want_sigma = (up * z).sum(dim=(1, 2))
    torch.testing.assert_close(got[0], want_x0)
    torch.testing.assert_close(got[1], want_alpha, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], want_sigma, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Input checks (the C++ binding): ValueError naming the problem, before any kernel runs
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda: (torch.zeros(2, 3, dtype=torch.float64),) * 3, "float32, bfloat16 or float16, got Double"),
    (lambda: (torch.zeros(2, 3, dtype=torch.int32),) * 3, "float32, bfloat16 or float16, got Int"),
    (lambda: (torch.zeros(2, 3), torch.zeros(3, 3), torch.zeros(2, 3)), "batch size mismatch: x has B=2 but real_x0 has B=3"),
    (lambda: (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4)), r"expected fake_x0 of shape \(2, 3\)"),
    (lambda: (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(2, 3)), "dtype mismatch"),
    (lambda: (torch.tensor(1.0),) * 3, r"non-empty \(B, \.\.\.\) tensor with B >= 1, got shape \(\)"),
    (lambda: (torch.empty(0, 3),) * 3, r"non-empty \(B, \.\.\.\) tensor with B >= 1, got shape \(0, 3\)"),
    (lambda: (torch.empty(2, 0),) * 3, r"non-empty \(B, \.\.\.\) tensor with B >= 1, got shape \(2, 0\)"),
])
def test_dm_grad_rejects_bad_inputs(make, match):
    x, r, f = make()
    with pytest.raises(ValueError, match=match):
        torch.ops.dmd2.dm_grad_ext(x, r, f, 1e-6)


def test_dm_grad_rejects_bad_eps():
    x = torch.zeros(2, 3)
    for eps in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite eps >= 0"):
            torch.ops.dmd2.dm_grad_ext(x, x, x, eps)


@pytest.mark.parametrize("args, match", [
    ((torch.zeros(2, 3), torch.zeros(3), torch.zeros(2), 0, 0), r"expected alpha of shape \(2,\)"),
    ((torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 1), 0, 0), r"expected sigma of shape \(2,\)"),
    ((torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), torch.zeros(2), 0, 0), "floating-point alpha"),
    ((torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2), torch.zeros(2), 0, 0), "x0 of dtype"),
    ((torch.zeros(0, 3), torch.zeros(0), torch.zeros(0), 0, 0), "x0 to be a non-empty"),
    ((torch.zeros(2, 3), torch.zeros(2), torch.zeros(2), -1, 0), r"seed must lie in \[0, 2\*\*63\)"),
    ((torch.zeros(2, 3), torch.zeros(2), torch.zeros(2), 0, -5), r"offset must lie in \[0, 2\*\*63\)"),
    ((torch.zeros(2, 3), torch.zeros(2), torch.zeros(2), 0, 2**63 - 3), "offset \\+ numel must not exceed"),
])
def test_noise_add_rejects_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.dmd2.noise_add_ext(*args)


def test_noise_add_rejects_non_int_seed():
    with pytest.raises(ValueError, match="seed must be a Python int"):
        ext.noise_add(torch.zeros(2, 3), torch.zeros(2), torch.zeros(2), 1.5, 0)


# --------------------------------------------------------------------------------------------------------------------
# torch.library: registration, opcheck, torch.compile, proof that the C++ kernel ran
# --------------------------------------------------------------------------------------------------------------------

def test_the_cpp_kernels_ran():
    assert K.resolve("dm_grad", "ext", torch.zeros(1)) is ext.dm_grad
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dmd2::dm_grad_ext", "CPU")
    x, r, f = _inputs((2, 4, 8, 8), torch.float32, 5)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        K.dm_grad(x, r, f, impl="ext")
        ext.noise_add(x, torch.ones(2), torch.ones(2), 1, 2)
    names = {e.name for e in prof.events()}
    assert {"dmd2::dm_grad_ext", "dmd2::noise_add_ext"} <= names
    # fused: no eager elementwise/reduction ops were dispatched for dm_grad
    assert not names & {"aten::abs", "aten::mean", "aten::div", "aten::sub"}


def _opcheck_samples():
    g = torch.Generator().manual_seed(0)
    out = []
    for shape, dtype in [((3, 4, 5), torch.float32), ((2, 7), torch.bfloat16), ((4,), torch.float16)]:
        x, r, f = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
        out.append((x, r, f))
        out.append((x.clone().requires_grad_(), r.clone().requires_grad_(), f.clone().requires_grad_()))
    return out


def test_opcheck_dm_ops():
    for x, r, f in _opcheck_samples():
        torch.library.opcheck(torch.ops.dmd2.dm_grad_ext.default, (x, r, f, 1e-6))
        torch.library.opcheck(torch.ops.dmd2.dm_loss_ext.default, (x, r, f, 1e-6))


def test_opcheck_noise_add():
    g = torch.Generator().manual_seed(1)
    for shape, dtype, grad in [((3, 4, 5), torch.float32, True), ((2, 9), torch.bfloat16, False), ((5,), torch.float32, True)]:
        x0 = torch.randn(shape, generator=g).to(dtype).requires_grad_(grad)
        a = torch.rand(shape[0], generator=g).requires_grad_(grad)
        s = torch.rand(shape[0], generator=g).requires_grad_(grad)
        torch.library.opcheck(torch.ops.dmd2.noise_add_ext.default, (x0, a, s, 11, 2**32 - 3))


def test_torch_compile_fullgraph_traces_a_step():
    """A generator step: re-noise with fused Philox noise, distribution-matching loss, backward — one graph."""
    torch._dynamo.reset()

    def step(x, alpha, sigma, real_x0, fake_x0):
        x_t = K.resolve("noise_add", "ext", x)(x, alpha, sigma, 123, 4096)
        return K.dm_loss(x, real_x0 + 0.1 * x_t.detach(), fake_x0, impl="ext")

    x, r, f = _inputs((2, 3, 8, 8), torch.float32, 7)
    alpha, sigma = torch.rand(2), torch.rand(2)
    xe = x.clone().requires_grad_()
    want = step(xe, alpha, sigma, r, f)
    (gwant,) = torch.autograd.grad(want, xe)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=False)
    xc = x.clone().requires_grad_()
    got = compiled(xc, alpha, sigma, r, f)
    (ggot,) = torch.autograd.grad(got, xc)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ggot, gwant)
