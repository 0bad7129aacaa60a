import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

from dmd2.core import EMA, BackwardSimulationSampler, CriticScheduler, EDMSchedule, VPSchedule


@given(ratio=st.integers(1, 9), start=st.integers(0, 50), cut=st.integers(0, 40))
def test_exactly_one_generator_update_per_ratio_window_across_restore(ratio, start, cut):
    s = CriticScheduler(ratio, step=start)
    plan = [s.next() for _ in range(cut)]
    restored = CriticScheduler(ratio)
    restored.load_state_dict(s.state_dict())
    plan += [restored.next() for _ in range(60)]
    assert [p.step for p in plan] == list(range(start, start + cut + 60))
    gens = [p.generator for p in plan]
    for i in range(len(gens) - ratio + 1):
        assert sum(gens[i:i + ratio]) == 1


def test_critic_scheduler_bad_input():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="ratio"):
            CriticScheduler(bad)
    with pytest.raises(ValueError, match="ratio 3"):
        CriticScheduler(5).load_state_dict(CriticScheduler(3).state_dict())


class CountingG(nn.Module):
    """G(x, t, cond) = x * 0.5 + c; records grad mode and inputs of every call."""

    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(0.25))
        self.calls = []

    def forward(self, x, t, cond=None):
        self.calls.append((torch.is_grad_enabled(), x.detach().clone(), t.clone()))
        return 0.5 * x + self.c


def test_one_step_sampling_is_one_generator_call():
    sch = EDMSchedule()
    G = CountingG()
    noise = torch.randn(4, 3)
    out = BackwardSimulationSampler(sch, [80.0]).sample(G, noise)
    assert len(G.calls) == 1
    torch.testing.assert_close(G.calls[0][1], 80.0 * noise)  # EDM prior: sigma_max * N(0, I)
    torch.testing.assert_close(out, 0.5 * 80.0 * noise + 0.25)
    vp = BackwardSimulationSampler(VPSchedule.scaled_linear(), [999])
    G2 = CountingG()
    vp.sample(G2, noise)
    assert len(G2.calls) == 1 and torch.equal(G2.calls[0][1], noise) and G2.calls[0][2].tolist() == [999] * 4


def test_simulated_steps_have_no_grad_and_fresh_independent_noise():
    vp = VPSchedule.scaled_linear()
    smp = BackwardSimulationSampler(vp, [999, 749, 499, 249])
    G = CountingG()
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(42)
    sim = smp.simulate(G, noise, k=3, generator=gen)
    assert sim.k == 3 and sim.t.tolist() == [499] * 2000 and not sim.x_t.requires_grad
    assert [c[0] for c in G.calls] == [False, False]  # steps 1..k-1 run without grad
    # the re-noise to t_2 used fresh noise: recover it and compare with the noise stream and the first noise
    x0_1 = 0.5 * noise + 0.25
    t2 = torch.full((2000,), 749)
    eps1 = (G.calls[1][1] - vp.alpha(t2)[:, None] * x0_1) / vp.sigma(t2)[:, None]
    ref = torch.Generator().manual_seed(42)
    torch.testing.assert_close(eps1, torch.randn(2000, 2, generator=ref), rtol=1e-3, atol=1e-3)
    corr = torch.corrcoef(torch.stack([eps1.flatten(), noise.flatten()]))[0, 1]
    assert abs(float(corr)) < 0.05  # independent of the first noise (4000 draws: |corr| ~ 0.016)
    # the caller's last call gets gradients
    out = G(sim.x_t, sim.t)
    out.sum().backward()
    assert G.c.grad is not None


def test_k1_is_the_prior_and_k_is_uniform():
    smp = BackwardSimulationSampler(EDMSchedule(), [80.0, 20.0, 2.0, 0.2])
    G = CountingG()
    noise = torch.randn(3, 2)
    sim = smp.simulate(G, noise, k=1)
    assert not G.calls and torch.equal(sim.x_t, 80.0 * noise)
    g = torch.Generator().manual_seed(0)
    ks = torch.tensor([smp.draw_k(g) for _ in range(4000)])
    counts = torch.bincount(ks, minlength=5)[1:].float()
    assert counts.min() > 900 and counts.max() < 1100  # 1000 +- 3.5 sd
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        smp.simulate(G, noise, k=5)


def test_simulate_draws_k_from_its_generator_only():
    smp = BackwardSimulationSampler(EDMSchedule(), [80.0, 20.0, 2.0, 0.2])
    noise = torch.randn(3, 2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    ks = [smp.simulate(CountingG(), noise, generator=torch.Generator().manual_seed(s)).k for s in range(40)]
    assert torch.equal(torch.get_rng_state(), before)  # k and the re-noises came from the generator, not the global RNG
    assert ks == [smp.draw_k(torch.Generator().manual_seed(s)) for s in range(40)]
    assert set(ks) == {1, 2, 3, 4}
    with pytest.raises(ValueError, match="descending"):
        BackwardSimulationSampler(EDMSchedule(), [2.0, 80.0])


def test_simulate_hands_a_cuda_generator_to_draw_k_and_refuses_one_on_another_device(monkeypatch):
    """Only its device is read before a draw, so a stand-in shows what ``simulate`` does with a CUDA generator
    without a GPU: it draws ``k`` from it (not from the global RNG, as it once did), and a re-noise on CPU ``noise``
    is refused with one line naming both devices."""
    smp = BackwardSimulationSampler(EDMSchedule(), [80.0, 20.0, 2.0, 0.2])

    class OnCuda:
        device = torch.device("cuda")

    gen, seen = OnCuda(), []
    monkeypatch.setattr(smp, "draw_k", lambda g: seen.append(g) or 1)
    assert smp.simulate(CountingG(), torch.randn(3, 2), generator=gen).k == 1
    assert seen == [gen]
    G = CountingG()
    with pytest.raises(ValueError, match=r"noise's device cpu, but the generator is on cuda"):
        smp.simulate(G, torch.randn(3, 2), k=2, generator=gen)
    assert not G.calls  # refused before the generator runs


@pytest.mark.gpu
def test_simulate_on_cuda_draws_only_from_its_cuda_generator():
    smp = BackwardSimulationSampler(EDMSchedule(), [80.0, 20.0, 2.0, 0.2])
    G = CountingG().cuda()
    noise = torch.randn(3, 2, device="cuda")
    cpu_state, cuda_state = torch.get_rng_state(), torch.cuda.get_rng_state()
    sims = [smp.simulate(G, noise, generator=torch.Generator("cuda").manual_seed(s)) for s in range(40)]
    assert torch.equal(torch.get_rng_state(), cpu_state) and torch.equal(torch.cuda.get_rng_state(), cuda_state)
    assert [s.k for s in sims] == [smp.draw_k(torch.Generator("cuda").manual_seed(s)) for s in range(40)]
    assert {s.k for s in sims} == {1, 2, 3, 4} and all(s.x_t.is_cuda for s in sims)


def test_sample_equals_manual_loop_with_given_noises():
    vp = VPSchedule.scaled_linear()
    ts = [999, 749, 499, 249]
    G = CountingG()
    noise = torch.randn(3, 2)
    renoise = [torch.randn(3, 2) for _ in range(3)]
    out = BackwardSimulationSampler(vp, ts).sample(G, noise, noises=renoise)
    x = noise
    for i, t in enumerate(ts):
        tt = torch.full((3,), t)
        x0 = 0.5 * x + 0.25
        if i < 3:
            tn = torch.full((3,), ts[i + 1])
            x = vp.alpha(tn)[:, None] * x0 + vp.sigma(tn)[:, None] * renoise[i]
    torch.testing.assert_close(out, x0)


def test_ema():
    m = nn.Linear(2, 2)
    ema = EMA(m, decay=0.9)
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    torch.testing.assert_close(ema.shadow["weight"], w0 + 0.1)
    m2 = nn.Linear(2, 2)
    ema.copy_to(m2)
    torch.testing.assert_close(m2.weight, w0 + 0.1)
    e2 = EMA(m, 0.9)
    e2.load_state_dict(ema.state_dict())
    torch.testing.assert_close(e2.shadow["weight"], ema.shadow["weight"])
    with pytest.raises(ValueError, match="decay"):
        EMA(m, 1.0)
