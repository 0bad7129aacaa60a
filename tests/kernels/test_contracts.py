"""Every registered kernel implementation against its declaration in dmd2/kernels/contracts.py.

For each op and each implementation of it (``implementations(op)``) on each device: it runs on the devices it
declares, for every dtype it declares, with outputs (values, dtypes, shapes) equal to dmd2/kernels/reference.py's;
exactly the inputs it declares receive a gradient, equal to the reference's autograd gradient for a random upstream;
and it refuses, with ``ValueError``, what no backend accepts (float64 or integer data tensors, an empty batch, a
zero-sized sample). Beside it: the declarations themselves (every op declared or declared lacking, one dtype rule for
all backends), and ``impl="auto"`` following them.
"""
import pytest
import torch

import dmd2.kernels as K
from dmd2.kernels import contracts as C
from dmd2.kernels import reference as R

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]
SHAPE = (3, 2, 5, 7)
# both sides compute in float32 and round once to the output dtype: fp32 differs by re-association and a few ulps of
# log / cos in the noise, the half types by one or two rounding steps
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2**-7, atol=2e-2),
       torch.float16: dict(rtol=2**-9, atol=2e-3)}
GRAD_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
            torch.float16: dict(rtol=4e-3, atol=4e-3)}


def _inputs(op, shape, dtype, device, seed=0):
    """Keyword arguments of ``dmd2.kernels.<op>``: data tensors of ``shape`` / ``dtype``, float32 ``(B,)`` coefficients."""
    g = torch.Generator().manual_seed(seed)

    def data():
        return torch.randn(shape, generator=g).to(device, dtype)

    def coef():
        return (0.2 + torch.rand(shape[0], generator=g)).to(device)

    if op == "philox_normal":
        return dict(seed=2**40 + 3, offset=2**32 - 50, shape=shape, device=device)
    if op == "noise_add":
        return dict(x0=data(), alpha=coef(), sigma=coef(), seed=2**40 + 3, offset=2**32 - 50)
    if op == "fused_dm":
        return dict(x=data(), x_t=data(), real_cond=data(), real_uncond=data(), fake=data(), alpha=coef(),
                    sigma=coef(), guidance_scale=2.5, prediction="eps", return_x0=True)
    if op == "denoise_loss":
        return dict(pred=data(), weight=coef(), target="eps", seed=11, offset=2**32 - 7)
    return dict(x=data(), real_x0=data(), fake_x0=data())  # dm_grad, dm_loss


def _outputs(out):
    return [t for t in (out if isinstance(out, tuple) else (out,)) if t is not None]


def _run(op, impl, kwargs, upstream_seed=1):
    """Outputs, and the gradients of ``sum(output * random upstream)`` for every floating tensor input."""
    kw = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    out = getattr(K, op)(**kw, impl=impl)
    diff = out.loss if op == "fused_dm" else out
    leaves = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}
    grads = {}
    if diff.requires_grad:
        g = torch.Generator().manual_seed(upstream_seed)
        up = torch.randn(diff.shape, generator=g).to(diff.device, diff.dtype)
        got = torch.autograd.grad((diff * up).sum(), list(leaves.values()), allow_unused=True)
        grads = {k: v for k, v in zip(leaves, got) if v is not None}
    return [t.detach() for t in _outputs(out)], grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op, impl", [(op, impl) for op in C.OPS for impl in K.implementations(op)])
def test_implementation_meets_its_contract(op, impl, device):
    contract = C.contract(op, impl)
    assert contract is not None, f"{impl} registers {op} without declaring it"
    if device not in contract.devices or K.availability(impl, torch.device(device)) is not None:
        with pytest.raises(RuntimeError, match=impl):  # an explicit implementation never falls back
            getattr(K, op)(**_inputs(op, SHAPE, contract.dtypes[0], device), impl=impl)
        return
    for dtype in contract.dtypes:
        kwargs = _inputs(op, SHAPE, dtype, device)
        got, got_grads = _run(op, impl, kwargs)
        want, want_grads = _run(op, "torch", kwargs)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
            torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])
        assert set(got_grads) == set(contract.grads) == set(want_grads), (op, impl, dtype)
        for name in contract.grads:
            assert got_grads[name].dtype == kwargs[name].dtype
            torch.testing.assert_close(got_grads[name].float(), want_grads[name].float(), **GRAD_TOL[dtype])
    if op == "philox_normal":  # no data tensor to refuse
        return
    refused = [(SHAPE, torch.float64), (SHAPE, torch.int32), ((0,) + SHAPE[1:], contract.dtypes[0]),
               (SHAPE[:1] + (0,) + SHAPE[2:], contract.dtypes[0])]
    for shape, dtype in refused:
        kwargs = _inputs(op, shape, torch.float32, device)
        kwargs = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.shape == shape else v) for k, v in kwargs.items()}
        with pytest.raises(ValueError, match="non-empty|float32, bfloat16 or float16"):
            getattr(K, op)(**kwargs, impl=impl)


def test_every_op_is_declared_or_declared_lacking_with_one_dtype_rule():
    for impl, ops in C.CONTRACTS.items():
        assert set(ops) | set(C.LACKS[impl]) == set(C.OPS) and not set(ops) & set(C.LACKS[impl]), impl
        assert all(reason for reason in C.LACKS[impl].values())
    for op in C.OPS:
        declared = {impl for impl in C.CONTRACTS if C.contract(op, impl) is not None}
        assert set(K.implementations(op)) == declared  # every declared backend registered (they import here)
        assert len({(C.contract(op, i).dtypes, C.contract(op, i).grads) for i in declared}) == 1, op


def test_an_undeclared_op_cannot_be_registered_and_a_lacking_one_says_why():
    with pytest.raises(ValueError, match="declares no op 'fused_dm' for impl 'ext'"):
        K.register("fused_dm", "ext", R.fused_dm)
    x = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="not written in csrc"):
        K.fused_dm(x, None, x, None, x, impl="ext")


@pytest.mark.parametrize("op", C.OPS)
def test_auto_follows_the_declarations(op, monkeypatch):
    """CPU: the reference. CUDA: Triton; where it cannot run, the extension's policy for the ops it declares; else
    the reference. Devices stand in for tensors, so the order is checked without a GPU."""
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    impls = K._REGISTRY[op]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert K.resolve(op, "auto", cpu) is impls["torch"]
    assert K.resolve(op, "auto", cuda) is impls["triton"]
    monkeypatch.setitem(K._AVAILABILITY, "triton", lambda *t: "no Triton here")
    asked = []
    monkeypatch.setitem(K._AUTO_POLICY, "ext", lambda *t: asked.append(t) or True)
    want = impls["ext"] if C.contract(op, "ext") else impls["torch"]
    assert K.resolve(op, "auto", cuda) is want
    assert bool(asked) == (C.contract(op, "ext") is not None)
    monkeypatch.setitem(K._AUTO_POLICY, "ext", lambda *t: False)  # the extension cannot run: the reference
    assert K.resolve(op, "auto", cuda) is impls["torch"]
