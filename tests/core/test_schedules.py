import math
import re

import pytest
import torch
from hypothesis import given, strategies as st

from dmd2.core import EDMSchedule, VPSchedule


def test_scaled_linear_matches_definition_and_diffusers():
    s = VPSchedule.scaled_linear()
    b = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(s.betas, b)
    assert abs(float(s.betas[0]) - 0.00085) < 1e-12 and abs(float(s.betas[-1]) - 0.012) < 1e-12
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    torch.testing.assert_close(s.alphas_cumprod.float(), ref.alphas_cumprod.float(), rtol=1e-6, atol=1e-7)


@given(t=st.lists(st.integers(0, 999), min_size=1, max_size=8))
def test_vp_alpha2_plus_sigma2_is_one(t):
    s = VPSchedule.scaled_linear()
    t = torch.tensor(t)
    torch.testing.assert_close(s.alpha(t) ** 2 + s.sigma(t) ** 2, torch.ones(len(t)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sched", [VPSchedule.scaled_linear(), EDMSchedule()])
def test_round_trips(sched):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, 4, generator=g, dtype=torch.float64).float(), torch.randn(5, 3, 4, generator=g)
    t = sched.sample_t(5, 0.05, 0.95, generator=g)
    x_t = sched.add_noise(x0, eps, t)
    a, s = sched.alpha(t)[:, None, None], sched.sigma(t)[:, None, None]
    torch.testing.assert_close(x_t, a * x0 + s * eps)
    torch.testing.assert_close(sched.x0_from_eps(x_t, eps, t), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sched.eps_from_x0(x_t, x0, t), eps, rtol=1e-4, atol=1e-4)
    v = a * eps - s * x0
    torch.testing.assert_close(sched.x0_from_v(x_t, v, t), x0, rtol=1e-4, atol=1e-4)


def test_vp_denoising_weight_is_eps_mse():
    from dmd2.core import denoising_loss

    s = VPSchedule.scaled_linear()
    g = torch.Generator().manual_seed(1)
    x0, eps, pred = (torch.randn(4, 2, 3, generator=g) for _ in range(3))
    t = torch.tensor([0, 10, 500, 999])
    x_t = s.add_noise(x0, eps, t)
    eps_hat = s.eps_from_x0(x_t, pred, t)
    torch.testing.assert_close(denoising_loss(pred, x0, t, s), ((eps_hat - eps) ** 2).flatten(1).mean(1),
                               rtol=1e-4, atol=1e-5)


def test_edm_weight_and_karras_grid():
    s = EDMSchedule()
    sig = torch.tensor([0.002, 0.5, 80.0])
    torch.testing.assert_close(s.denoising_weight(sig), 1 / sig**2 + 1 / 0.25)
    grid = s.karras_sigmas(18)
    i = torch.arange(18, dtype=torch.float64)
    ref = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # EDM Eq. 5
    torch.testing.assert_close(grid, ref)
    assert abs(float(grid[0]) - 80) < 1e-9 and abs(float(grid[-1]) - 0.002) < 1e-12


@given(lo=st.floats(0, 1), hi=st.floats(0, 1), seed=st.integers(0, 1000))
def test_sample_t_stays_in_its_fraction(lo, hi, seed):
    lo, hi = min(lo, hi), max(lo, hi)
    g = torch.Generator().manual_seed(seed)
    vp, edm = VPSchedule.scaled_linear(), EDMSchedule()
    t = vp.sample_t(64, lo, hi, generator=g)
    assert t.dtype == torch.long and int(t.min()) >= round(lo * 999) and int(t.max()) <= round(hi * 999)
    s = edm.sample_t(64, lo, hi, generator=g)
    # EDM times lie on the 1000-point Karras grid, between the grid points nearest to the two fractions
    lo_s, hi_s = (float(edm.karras(torch.tensor(round(f * 999) / 999))) for f in (lo, hi))
    assert lo_s * (1 - 1e-5) <= float(s.min()) and float(s.max()) <= hi_s * (1 + 1e-5)


def test_out_of_range_and_wrong_types_are_value_errors():
    vp, edm = VPSchedule.scaled_linear(), EDMSchedule()
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        vp.add_noise(x, x, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        vp.alpha(torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="integer"):
        vp.sigma(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="> 0"):
        edm.add_noise(x, x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="batch"):
        vp.add_noise(x, x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="min_frac"):
        vp.sample_t(4, 0.9, 0.1)


@pytest.mark.parametrize("sched", [VPSchedule.scaled_linear(), EDMSchedule()])
@pytest.mark.parametrize("fn", ["x0_from_eps", "eps_from_x0", "x0_from_v"])
@pytest.mark.parametrize("bad", [(2, 1, 4, 4), (3, 4, 4), (1, 3, 4, 4)])
def test_conversions_refuse_broadcasting(sched, fn, bad):
    """The prediction must have x_t's shape exactly: (2,1,4,4) / (3,4,4) / (1,3,4,4) would broadcast silently."""
    x = torch.randn(2, 3, 4, 4)
    t = sched.time_tensor(sched.timesteps([500 if sched.kind == "vp" else 1.0])[0], 2, "cpu")
    getattr(sched, fn)(x, torch.randn(2, 3, 4, 4), t)  # the matching shape is accepted
    with pytest.raises(ValueError, match=rf"{fn}: .* must have the shape of x_t \(2, 3, 4, 4\), got {re.escape(str(bad))}"):
        getattr(sched, fn)(x, torch.randn(bad), t)


def test_add_noise_refuses_integer_x0():
    vp = VPSchedule.scaled_linear()
    x0 = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="add_noise: x0 must be a floating-point tensor, got torch.int64"):
        vp.add_noise(x0, torch.randn(2, 3), torch.tensor([1, 2]))


@pytest.mark.parametrize("kw", [dict(sigma_max=math.inf), dict(rho=math.nan), dict(sigma_min=math.nan),
                                dict(sigma_data=math.inf)])
def test_edm_schedule_refuses_non_finite(kw):
    with pytest.raises(ValueError, match="must be finite"):
        EDMSchedule(**kw)


def test_vp_refuses_non_integer_timesteps():
    vp = VPSchedule.scaled_linear()
    with pytest.raises(ValueError, match=r"VPSchedule timestep must be an integer, got 999.9"):
        vp.timesteps([999.9, 499])
    with pytest.raises(ValueError, match="must be an integer"):
        vp.time_tensor(249.5, 2, "cpu")
    assert vp.timesteps([999.0, 749, torch.tensor(499)]) == [999, 749, 499]  # integral values of any type are fine
