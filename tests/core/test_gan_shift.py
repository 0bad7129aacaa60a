"""``DMD2Config.gan_shift``: random integer translations of every image the diffusion GAN sees (reals and fakes, both
GAN terms), differentiable, drawn from the objective's generator; off (and drawing nothing) at 0."""
import pytest
import torch

from dmd2.core import DMD2Config, shift_images
from dmd2.core.losses import denoising_loss, gan_discriminator_loss, gan_generator_loss

from test_objective import make

B = 3


def _by_loop(x, dy, dx):
    """The definition, one pixel at a time: out[b, :, i, j] = x[b, :, clamp(i - dy), clamp(j - dx)]."""
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    for b in range(x.shape[0]):
        for i in range(h):
            for j in range(w):
                out[b, :, i, j] = x[b, :, min(max(i - int(dy[b]), 0), h - 1), min(max(j - int(dx[b]), 0), w - 1)]
    return out


@pytest.mark.parametrize("max_shift", [1, 2, 5])
def test_shift_images_is_the_clamped_translation_per_image(max_shift):
    x = torch.randn(6, 2, 5, 7, generator=torch.Generator().manual_seed(0))
    out = shift_images(x, max_shift, torch.Generator().manual_seed(3))
    d = torch.randint(-max_shift, max_shift + 1, (2, 6), generator=torch.Generator().manual_seed(3))
    assert d.abs().max() <= max_shift
    torch.testing.assert_close(out, _by_loop(x, d[0], d[1]), rtol=0, atol=0)


def test_shift_images_covers_every_offset_and_zero_is_identity():
    x = torch.arange(9.0).reshape(1, 1, 3, 3).expand(400, 1, 3, 3).contiguous()
    out = shift_images(x, 1, torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten().tolist()) for o in out}) == 9  # all (dy, dx) in {-1, 0, 1}^2 occur
    assert torch.equal(shift_images(x, 0, torch.Generator()), x)


def test_shift_images_is_differentiable():
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: shift_images(v, 2, torch.Generator().manual_seed(1)), (x,))


def test_shift_images_refuses_other_shapes_and_negative_shifts():
    with pytest.raises(ValueError, match=r"expected \(B, C, H, W\) images, got shape \(2, 8\)"):
        shift_images(torch.zeros(2, 8), 1)
    with pytest.raises(ValueError, match="max_shift must be >= 0, got -1"):
        shift_images(torch.zeros(2, 1, 4, 4), -1)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_config_refuses_a_shift_that_is_not_a_non_negative_int(bad):
    with pytest.raises(ValueError, match="gan_shift must be an int >= 0"):
        DMD2Config(gan_shift=bad)


def test_config_refuses_shift_with_gan_from_critic_pass():
    with pytest.raises(ValueError, match="gan_shift shifts the GAN's images, but gan_from_critic_pass"):
        DMD2Config(gan_shift=2, gan_from_critic_pass=True)


def _cfg(shift):
    return DMD2Config(gan_generator_weight=3e-3, gan_discriminator_weight=1e-2, gan_shift=shift)


def _logits(dmd, x, cond, k, g, shift):
    """One image batch through the GAN path by hand: shift, t', noise, the full fake-score pass, the head."""
    c = dmd.config
    x = shift_images(x, shift, g)
    t = dmd.schedule.sample_t(x.shape[0], c.gan_min_frac, c.gan_max_frac, generator=g, device=x.device)
    _, feats = dmd.features.run(dmd._fake, dmd._add_noise(x, t, g), t, cond, k)
    return dmd.gan_head(feats)


def test_critic_loss_shifts_reals_and_fakes_before_noising():
    dmd, _, fake, head = make(with_gan=True, cfg=_cfg(2))
    g0 = torch.Generator().manual_seed(0)
    noise, real = torch.randn(B, 3, 8, 8, generator=g0), torch.randn(B, 3, 8, 8, generator=g0)
    loss, logs = dmd.critic_loss(noise, None, real, generator=torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        x, sim = dmd.generate(noise, None, None, g)
    t = dmd.schedule.sample_t(B, 0.0, 1.0, generator=g)
    l_fake = denoising_loss(dmd._fake(dmd._add_noise(x, t, g), t, None, sim.k), x, t, dmd.schedule).mean()
    lf, lr = _logits(dmd, x, None, sim.k, g, 2), _logits(dmd, real, None, sim.k, g, 2)
    expected = l_fake + 1e-2 * gan_discriminator_loss(lf, lr).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logs["logits_real"], lr.detach().mean(), rtol=1e-5, atol=1e-6)

    # and the shift changes the result: the same draws without it give other logits
    _, logs0 = make(with_gan=True, cfg=_cfg(0))[0].critic_loss(noise, None, real, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(logs0["logits_real"], logs["logits_real"])


def test_generator_gan_gradient_passes_through_the_shift():
    cfg = DMD2Config(dm_weight=0.0, gan_generator_weight=3e-3, gan_discriminator_weight=1e-2, gan_shift=1)
    dmd, _, _, _ = make(with_gan=True, cfg=cfg)
    noise = torch.randn(B, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    loss, logs = dmd.generator_loss(noise, generator=torch.Generator().manual_seed(7))
    params = list(dmd.generator.parameters())
    got = torch.autograd.grad(loss, params)

    g = torch.Generator().manual_seed(7)
    x, sim = dmd.generate(noise, None, None, g)
    t = dmd.schedule.sample_t(B, cfg.min_frac, cfg.max_frac, generator=g)  # the DM term's draws
    dmd._add_noise(x.detach(), t, g)
    l_gan = gan_generator_loss(_logits(dmd, x, None, sim.k, g, 1)).mean()
    torch.testing.assert_close(logs["loss_gan_g"], l_gan.detach(), rtol=1e-5, atol=1e-6)
    want = torch.autograd.grad(3e-3 * l_gan, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)
    assert any(a.abs().sum() > 0 for a in got)
