"""The GAN term's passes: features-only passes, the critic's real and fake logits in ONE pass of 2B (same losses as
one pass per batch), a critic update on given samples, and fp32 for the head and the DM fake query under bf16."""
import pytest
import torch

from dmd2.core import DMD2Config
from dmd2.core.objective import Samples
from dmd2.core.denoisers import cat_cond

from test_objective import make

B = 3


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 8, 8, generator=g), torch.randn(B, 3, 8, 8, generator=g) * 0.5


def _old_logits(dmd, x, cond, k, g):
    """The previous algorithm: a full fake-score pass per batch, features through the hooks."""
    c = dmd.config
    t = dmd.schedule.sample_t(x.shape[0], c.gan_min_frac, c.gan_max_frac, generator=g, device=x.device)
    x_t = dmd._add_noise(x, t, g)
    _, feats = dmd.features.run(dmd._fake, x_t, t, cond, k)
    return dmd.gan_head(feats)


def test_critic_logits_in_one_2B_pass_match_one_pass_per_batch():
    cfg = DMD2Config(gan_generator_weight=3e-3, gan_discriminator_weight=1e-2, critic_min_frac=0.02, critic_max_frac=0.98)
    dmd, _, fake, head = make(with_gan=True, cfg=cfg)
    passes = []
    fake.register_forward_pre_hook(lambda m, a: passes.append(a[0].shape[0]))
    noise, real = _inputs()
    loss, logs = dmd.critic_loss(noise, None, real, generator=torch.Generator().manual_seed(5))
    assert passes == [B, 2 * B]  # the denoising pass, then fake and real features in one pass
    grads = torch.autograd.grad(loss, list(head.parameters()) + list(fake.parameters()))

    # the old algorithm on the same random draws
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        x, sim = dmd.generate(noise, None, None, g)
    t = dmd.schedule.sample_t(B, cfg.critic_min_frac, cfg.critic_max_frac, generator=g)
    pred = dmd._fake(dmd._add_noise(x, t, g), t, None, sim.k)
    from dmd2.core.losses import denoising_loss, gan_discriminator_loss

    l_fake = denoising_loss(pred, x, t, dmd.schedule).mean()
    lf, lr = _old_logits(dmd, x, None, sim.k, g), _old_logits(dmd, real, None, sim.k, g)
    l_d = gan_discriminator_loss(lf, lr).mean()
    old = l_fake + cfg.gan_discriminator_weight * l_d
    torch.testing.assert_close(logs["logits_fake"], lf.detach().mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["logits_real"], lr.detach().mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, old, rtol=1e-5, atol=1e-7)
    old_grads = torch.autograd.grad(old, list(head.parameters()) + list(fake.parameters()))
    for a, b in zip(grads, old_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_the_feature_passes_stop_at_the_tap():
    cfg = DMD2Config(gan_generator_weight=3e-3, gan_discriminator_weight=1e-2)
    dmd, _, fake, _ = make(with_gan=True, cfg=cfg)
    out_calls = []
    fake.inner.model.out.register_forward_pre_hook(lambda m, a: out_calls.append(a[0].shape[0]))
    noise, real = _inputs()
    dmd.generator_loss(noise, generator=torch.Generator().manual_seed(1))
    dmd.critic_loss(noise, None, real, generator=torch.Generator().manual_seed(2))
    # the out layer ran only for the DM query and the denoising pass, never for the GAN passes
    assert out_calls == [B, B]


def test_cat_cond_joins_label_batches_for_the_2B_pass():
    assert torch.equal(cat_cond(torch.tensor([1, 2]), torch.tensor([3])), torch.tensor([1, 2, 3]))


def test_critic_on_given_samples_equals_fresh_samples_when_they_are_the_same():
    """A 1-step student's sample is a deterministic function of the noise: handing the critic that sample (what a
    generator turn does) gives the loss of the fresh path, bit for bit (the fresh path draws nothing extra)."""
    cfg = DMD2Config(gan_generator_weight=3e-3, gan_discriminator_weight=1e-2)
    dmd, _, _, _ = make(with_gan=True, cfg=cfg)
    noise, real = _inputs()
    fresh, _ = dmd.critic_loss(noise, None, real, k=1, generator=torch.Generator().manual_seed(3))
    dmd.generator_loss(noise, generator=torch.Generator().manual_seed(9))
    s = dmd.last_samples
    assert isinstance(s, Samples) and s.k == 1 and not s.x.requires_grad
    given, _ = dmd.critic_loss(None, None, real, generator=torch.Generator().manual_seed(3), samples=s)
    assert torch.equal(fresh, given)
    with pytest.raises(ValueError, match="noise"):
        dmd.critic_loss(None, None, real)


def test_head_and_dm_fake_query_run_in_fp32_under_bf16_autocast():
    cfg = DMD2Config(gan_generator_weight=3e-3, gan_discriminator_weight=1e-2)
    dmd, teacher_net, fake, head = make(with_gan=True, cfg=cfg)
    seen = []
    teacher_net.model.out.register_forward_hook(lambda m, a, o: seen.append(("teacher", o.dtype)))
    fake.inner.model.out.register_forward_hook(lambda m, a, o: seen.append(("fake", o.dtype)))
    head.out[0].register_forward_hook(lambda m, a, o: seen.append(("head", a[0].dtype, o.dtype)))
    noise, real = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dmd.generator_loss(noise, generator=torch.Generator().manual_seed(1))
        n_gen = len(seen)
        dmd.critic_loss(noise, None, real, generator=torch.Generator().manual_seed(2))
    gen, critic = seen[:n_gen], seen[n_gen:]
    assert ("teacher", torch.bfloat16) in gen              # the teacher under autocast
    assert ("fake", torch.float32) in gen                  # the DM term's fake query: fp32
    assert ("fake", torch.bfloat16) in critic              # the fake score's own denoising pass: autocast
    assert all(s[1:] == (torch.float32, torch.float32) for s in seen if s[0] == "head")
    assert sum(s[0] == "head" for s in seen) == 2


def test_critic_denoising_time_range_is_its_own_and_defaults_to_the_whole_schedule():
    assert (DMD2Config().critic_min_frac, DMD2Config().critic_max_frac) == (0.0, 1.0)
    assert (DMD2Config().min_frac, DMD2Config().max_frac) == (0.02, 0.98)
    cfg = DMD2Config(critic_min_frac=0.5, critic_max_frac=0.5, min_frac=0.9, max_frac=0.9)
    dmd, _, fake, _ = make(cfg=cfg)
    times = []
    fake.register_forward_pre_hook(lambda m, a: times.append(a[1].clone()))
    noise, _ = _inputs()
    dmd.critic_loss(noise, generator=torch.Generator().manual_seed(0))
    dmd.generator_loss(noise, generator=torch.Generator().manual_seed(0))
    critic_t, dm_t = times
    ref = dmd.schedule.sample_t(B, 0.5, 0.5)
    assert torch.equal(critic_t, ref) and not torch.equal(dm_t, ref)
    assert torch.equal(dm_t, dmd.schedule.sample_t(B, 0.9, 0.9))
    with pytest.raises(ValueError, match="noise ranges"):
        DMD2Config(critic_min_frac=0.6, critic_max_frac=0.5)


def test_gan_from_critic_pass_reads_fake_logits_from_the_denoising_pass():
    with pytest.raises(ValueError, match="gan_from_critic_pass"):
        DMD2Config(gan_from_critic_pass=True, critic_min_frac=0.02, critic_max_frac=0.98)
    cfg = DMD2Config(gan_generator_weight=3e-3, gan_discriminator_weight=1e-2, gan_from_critic_pass=True)
    dmd, _, fake, head = make(with_gan=True, cfg=cfg)
    passes, mid = [], []
    fake.register_forward_pre_hook(lambda m, a: passes.append((a[0].clone(), a[1].clone())))
    fake.inner.model.out.register_forward_pre_hook(lambda m, a: mid.append(a[0].shape[0]))
    noise, real = _inputs()
    _, logs = dmd.critic_loss(noise, None, real, generator=torch.Generator().manual_seed(4))
    assert [p[0].shape[0] for p in passes] == [B, B] and mid == [B]  # one full pass, one stopped pass of B (real)
    (x_t, t), (real_t, _) = passes
    with torch.no_grad():
        _, feats = dmd.features.run(dmd._fake, x_t, t, None, 1, features_only=True)
        # the denoising pass's own features (the head ran on fakes and reals in one call: fp rounding only)
        torch.testing.assert_close(logs["logits_fake"], head(feats).mean(), rtol=1e-6, atol=1e-7)
    assert not torch.equal(real_t, x_t)
