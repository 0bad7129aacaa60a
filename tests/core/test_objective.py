"""The DMD2 objective: gradient routing, teacher isolation, batched CFG, and the GAN-off gradient identity."""
import pytest
import torch
from torch import nn

from dmd2.core import (DMD2, BackwardSimulationSampler, CFGDenoiser, DMD2Config, EDMPrecond, EDMSchedule, GANHead,
                       VPSchedule, dm_grad)


class ConvNet(nn.Module):
    """A tiny conv net F(x, c_noise, labels) with a named middle block for GAN features."""

    def __init__(self, c=3):
        super().__init__()
        self.inp = nn.Conv2d(c, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.Conv2d(8, c, 3, padding=1)

    def forward(self, x, c_noise, labels=None, step_index=None):
        h = torch.nn.functional.silu(self.inp(x) + c_noise[:, None, None, None])
        return self.out(torch.nn.functional.silu(self.mid(h)))


class Spy(nn.Module):
    """Wraps a denoiser; records batch sizes, grad mode and outputs of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, x, t, cond=None, **kw):
        out = self.inner(x, t, cond, **kw)
        self.calls.append({"batch": x.shape[0], "grad": torch.is_grad_enabled(), "out": out.detach().clone(), **kw})
        return out


class Param(nn.Module):
    """A 'generator' whose output IS a parameter tensor P (B, C, H, W), so d loss / dP = d loss / dx."""

    def __init__(self, shape):
        super().__init__()
        self.P = nn.Parameter(torch.randn(shape))

    def forward(self, x, t, cond=None):
        return self.P * 1.0


def make(with_gan=False, gen=None, cfg=None, steps=(80.0,)):
    torch.manual_seed(0)
    sch = EDMSchedule()
    teacher_net = EDMPrecond(ConvNet())
    teacher = Spy(teacher_net)
    fake = Spy(EDMPrecond(ConvNet()))
    gen = gen or EDMPrecond(ConvNet())
    head = GANHead([8], hidden=16) if with_gan else None
    layers = ["inner.model.mid"] if with_gan else None
    dmd = DMD2(gen, fake, teacher, sch, BackwardSimulationSampler(sch, list(steps)), gan_head=head,
               gan_layers=layers, config=cfg or DMD2Config())
    return dmd, teacher_net, fake, head


def test_teacher_gets_no_gradient_and_stays_bit_identical():
    dmd, teacher_net, fake, head = make(with_gan=True, cfg=DMD2Config(gan_generator_weight=0.5, gan_discriminator_weight=0.5))
    before = {k: v.clone() for k, v in teacher_net.state_dict().items()}
    params = list(dmd.generator.parameters()) + list(fake.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    for i in range(3):
        loss, _ = dmd.generator_loss(torch.randn(2, 3, 8, 8))
        loss.backward()
        closs, _ = dmd.critic_loss(torch.randn(2, 3, 8, 8), real=torch.randn(2, 3, 8, 8))
        closs.backward()
        opt.step()
        opt.zero_grad()
    assert all(p.grad is None for p in teacher_net.parameters())
    for k, v in teacher_net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cfg_teacher_called_once_per_generator_step_with_2B():
    sch = VPSchedule.scaled_linear()
    inner = Spy(lambda x, t, c: x * 0.5 + c[:, None, None, None])
    teacher = CFGDenoiser(inner, scale=8.0, uncond=torch.zeros(1))
    gen = lambda x, t, c: x * 0.9  # noqa: E731
    fake = lambda x, t, c: x * 0.4  # noqa: E731
    dmd = DMD2(gen, fake, teacher, sch, BackwardSimulationSampler(sch, [999]))
    dmd.generator_loss(torch.randn(3, 2, 4, 4), cond=torch.ones(3))
    assert [c["batch"] for c in inner.calls] == [6]
    assert inner.calls[0]["grad"] is False


def test_critic_loss_gives_generator_no_gradient():
    dmd, _, fake, head = make(with_gan=True, cfg=DMD2Config(gan_discriminator_weight=1.0))
    loss, logs = dmd.critic_loss(torch.randn(2, 3, 8, 8), real=torch.randn(2, 3, 8, 8))
    loss.backward()
    assert all(p.grad is None for p in dmd.generator.parameters())
    assert all(p.grad is not None for p in fake.parameters())
    assert all(p.grad is not None for p in head.parameters())
    assert set(logs) >= {"loss_fake", "loss_gan_d", "loss_critic"}
    with pytest.raises(ValueError, match="real images"):
        dmd.critic_loss(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("with_gan", [False, True])
def test_gan_weight_zero_generator_gradient_is_w_dm_dm_grad_over_numel(with_gan):
    gen = Param((2, 3, 8, 8))
    w = 2.5
    dmd, _, fake, _ = make(with_gan=with_gan, gen=gen, cfg=DMD2Config(dm_weight=w))
    teacher = dmd.teacher
    loss, _ = dmd.generator_loss(torch.randn(2, 3, 8, 8))
    loss.backward()
    real_x0, fake_x0 = teacher.calls[-1]["out"], fake.calls[0]["out"]
    expected = w * dm_grad(gen.P.detach(), real_x0, fake_x0) / gen.P.numel()
    # the surrogate forms x - (x - g) in fp32: its rounding error is ~ulp(|x|) / numel, hence the atol
    atol = 4 * torch.finfo(torch.float32).eps * float(gen.P.detach().abs().max()) * w / gen.P.numel()
    torch.testing.assert_close(gen.P.grad, expected, rtol=1e-5, atol=atol)


def test_gan_term_reaches_the_generator_when_weighted():
    gen = Param((2, 3, 8, 8))
    dmd, _, fake, _ = make(with_gan=True, gen=gen, cfg=DMD2Config(dm_weight=0.0, gan_generator_weight=1.0))
    loss, logs = dmd.generator_loss(torch.randn(2, 3, 8, 8))
    loss.backward()
    assert gen.P.grad.abs().sum() > 0 and "loss_gan_g" in logs


def test_fake_step_conditioning_passes_the_step_index():
    gen = EDMPrecond(ConvNet())
    dmd, _, fake, _ = make(gen=gen, cfg=DMD2Config(fake_step_conditioning=True), steps=(80.0, 10.0, 1.0))
    dmd.generator_loss(torch.randn(2, 3, 8, 8), k=3)
    assert fake.calls[-1]["step_index"].tolist() == [2, 2]
    dmd.critic_loss(torch.randn(2, 3, 8, 8), k=2)
    assert fake.calls[-1]["step_index"].tolist() == [1, 1]


def test_gan_weights_need_a_head():
    sch = EDMSchedule()
    with pytest.raises(ValueError, match="gan_head"):
        DMD2(None, None, None, sch, BackwardSimulationSampler(sch, [80.0]), config=DMD2Config(gan_generator_weight=1e-3))
    with pytest.raises(ValueError, match="gan_layers"):
        DMD2(None, EDMPrecond(ConvNet()), None, sch, BackwardSimulationSampler(sch, [80.0]), gan_head=GANHead([8]))


@pytest.mark.parametrize("kw,match", [(dict(impl="bogus"), "impl must be one of"),
                                      (dict(dm_weight=float("nan")), "dm_weight must be finite"),
                                      (dict(gan_generator_weight=float("inf")), "gan_generator_weight must be finite"),
                                      (dict(dm_eps=-1.0), "dm_eps must be finite and > 0"),
                                      (dict(dm_eps=float("nan")), "dm_eps must be finite and > 0")])
def test_config_refuses_bad_values(kw, match):
    from dmd2.core import DMD2Config

    with pytest.raises(ValueError, match=match):
        DMD2Config(**kw)
