"""DMD2 with ``fused_ops``: a short training run through the Triton kernels gives the reference's losses.

On CPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1 from tests/conftest.py).
"""
import pytest
import torch
from torch import nn

from dmd2.core import DMD2, BackwardSimulationSampler, EDMSchedule, VPSchedule
from dmd2.core.objective import DMD2Config

pytest.importorskip("triton")


class TinyDenoiser(nn.Module):
    """``D(x_t, t, cond) -> x0``: a small conv net, time fed as a scaled channel."""

    def __init__(self, t_scale: float):
        super().__init__()
        self.t_scale = t_scale
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 2, 3, padding=1))

    def forward(self, x_t, t, cond=None):
        tt = (t.float() * self.t_scale).reshape(-1, 1, 1, 1).expand(-1, 1, *x_t.shape[2:])
        return self.net(torch.cat([x_t / (1 + tt.abs()), tt], dim=1))


def _run(impl: str, schedule, timesteps, t_scale, lr, iterations=3):
    torch.manual_seed(0)
    gen_net, fake, teacher = TinyDenoiser(t_scale), TinyDenoiser(t_scale), TinyDenoiser(t_scale)
    teacher.requires_grad_(False)
    objective = DMD2(gen_net, fake, teacher, schedule, BackwardSimulationSampler(schedule, timesteps),
                     config=DMD2Config(impl=impl, fused_ops=True, noise_seed=1234))
    opt_g = torch.optim.SGD(gen_net.parameters(), lr=lr)
    opt_f = torch.optim.SGD(fake.parameters(), lr=lr / 10)
    rng = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(iterations):
        loss_f, _ = objective.critic_loss(torch.randn(3, 2, 9, 7, generator=rng), generator=rng)
        opt_f.zero_grad()
        loss_f.backward()
        opt_f.step()
        loss_g, _ = objective.generator_loss(torch.randn(3, 2, 9, 7, generator=rng), generator=rng)
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        losses += [loss_f.detach(), loss_g.detach()]
    return torch.stack(losses), torch.cat([p.detach().flatten() for p in gen_net.parameters()]), objective.noise_offset


@pytest.mark.parametrize(
    "schedule, timesteps, t_scale, lr",
    [(VPSchedule.scaled_linear(), [999, 499], 1e-3, 0.5), (EDMSchedule(sigma_min=0.1, sigma_max=5.0), [5.0], 0.2, 1e-3)],
    ids=["vp-2step", "edm-1step"],
)
def test_short_run_triton_matches_reference(schedule, timesteps, t_scale, lr):
    ref_losses, ref_params, ref_offset = _run("torch", schedule, timesteps, t_scale, lr)
    tri_losses, tri_params, tri_offset = _run("triton", schedule, timesteps, t_scale, lr)
    assert torch.isfinite(ref_losses).all() and (ref_losses > 0).all()
    assert tri_offset == ref_offset == 3 * 2 * 3 * 2 * 9 * 7  # two noise draws per iteration, counters advance
    torch.testing.assert_close(tri_losses, ref_losses, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(tri_params, ref_params, rtol=1e-4, atol=1e-6)


def test_fused_ops_noise_is_the_philox_stream():
    """The first noised sample of a run is noise_add of the generator output with counters [0, numel)."""
    from dmd2.kernels import reference as R

    schedule = VPSchedule.scaled_linear()
    torch.manual_seed(0)
    g, f, te = TinyDenoiser(1e-3), TinyDenoiser(1e-3), TinyDenoiser(1e-3)
    seen = {}

    def fake(x_t, t, cond=None):
        seen["x_t"], seen["t"] = x_t.detach(), t
        return f(x_t, t, cond)

    obj = DMD2(g, fake, te, schedule, BackwardSimulationSampler(schedule, [999]),
               config=DMD2Config(fused_ops=True, noise_seed=99))
    rng = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 2, 5, 5, generator=rng)
    obj.critic_loss(noise, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        x = g(noise, torch.full((2,), 999), None)
    t = seen["t"]
    expected = R.noise_add(x, schedule.alpha(t), schedule.sigma(t), 99, 0)
    torch.testing.assert_close(seen["x_t"], expected)
    assert obj.noise_offset == x.numel()
