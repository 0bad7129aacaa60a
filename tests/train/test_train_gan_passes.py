"""The training iteration's network passes: how many full and stopped (features-only) passes each iteration kind runs,
and that stopping the GAN feature passes at the tap changes no training result (bitwise, N iterations), alone, with
gradient checkpointing, and under 2-rank DDP and FSDP2 (torchrun, gloo)."""
import re

import pytest
import torch

from dmd2.core.gan import FeatureHooks
from dmd2.recipes import imagenet64, sdxl
from dmd2.train import Trainer, resolve_config

from train_helpers import ROOT, assert_tree_equal, torchrun

# the tiny ImageNet configuration of the issue / benchmarks/step.py (ADM 32 ch, (1, 2), 8x8 bottleneck, head 64)
TINY_IMAGENET = ["model.model_channels=32", "model.channel_mult=1,2", "model.channel_mult_emb=4", "model.num_blocks=1",
                 "model.attn_resolutions=8", "model.label_dim=10", "model.img_resolution=16", "train.batch_size=8",
                 "gan.hidden=64", "gan.depth=2", "objective.gan_generator_weight=3e-3",
                 "objective.gan_discriminator_weight=1e-2", "critic.ratio=5", "train.sample_every=0",
                 "train.progress=false", "train.max_steps=5"]


def _full_passes_only(monkeypatch):
    """The previous algorithm: every feature pass runs the whole network (the stop is ignored)."""
    run = FeatureHooks.run

    def full(self, fn, *args, features_only=False, **kwargs):
        return run(self, fn, *args, **kwargs)

    monkeypatch.setattr(FeatureHooks, "run", full)


def _count(trainer):
    """Per network: entries and completed forwards (a stopped pass enters and never completes)."""
    nets = {"generator": trainer.gen, "fake_score": trainer.fake, "teacher": trainer.teacher}
    counts = {n: [0, 0] for n in nets}
    for name, net in nets.items():
        net.register_forward_pre_hook(lambda *a, name=name: counts[name].__setitem__(0, counts[name][0] + 1))
        net.register_forward_hook(lambda *a, name=name: counts[name].__setitem__(1, counts[name][1] + 1))

    def take():
        full = sum(done for _, done in counts.values())
        stopped = sum(entered - done for entered, done in counts.values())
        for c in counts.values():
            c[:] = [0, 0]
        return full, stopped

    return take


def _iteration_passes(recipe, preset, overrides, tmp_path):
    cfg = resolve_config(recipe, preset, overrides, out=str(tmp_path))
    torch.manual_seed(0)
    tr = Trainer(cfg, recipe.build(cfg), out=tmp_path)
    take = _count(tr)
    tr.train_step()
    gen_turn = take()
    tr.train_step()
    return gen_turn, take()


@pytest.mark.parametrize("gan", [True, False])
def test_pass_counts_tiny_imagenet(tmp_path, gan):
    extra = [] if gan else ["objective.gan_generator_weight=0", "objective.gan_discriminator_weight=0"]
    (gf, gs), (cf, cs) = _iteration_passes(imagenet64.RECIPE, "tiny", TINY_IMAGENET + extra, tmp_path)
    if gan:  # the official step: generator turn 4 full + 3 encoder-only, critic-only 2 full + 2 encoder-only
        assert gf <= 4 and gs <= 3 and (gf, gs) == (4, 2)
        assert cf <= 2 and cs <= 1 and (cf, cs) == (2, 1)  # the critic's stopped pass is one 2B pass
    else:
        assert (gf, gs) == (4, 0) and (cf, cs) == (2, 0)


def test_pass_counts_fresh_samples_run_the_generator_again(tmp_path):
    (gf, gs), _ = _iteration_passes(imagenet64.RECIPE, "tiny", TINY_IMAGENET + ["objective.critic_fresh_samples=true"],
                                    tmp_path)
    assert (gf, gs) == (5, 2)


@pytest.mark.slow
@pytest.mark.parametrize("gan", [True, False])
def test_pass_counts_sdxl_tiny(tmp_path, gan):
    """The SDXL tiny preset (mid-block tap), with a 1-step grid so that backward simulation adds no passes."""
    pytest.importorskip("diffusers")
    extra = ["sampler.steps=1", "critic.ratio=5"]
    if not gan:
        extra += ["objective.gan_generator_weight=0", "objective.gan_discriminator_weight=0"]
    (gf, gs), (cf, cs) = _iteration_passes(sdxl.RECIPE, "tiny", extra, tmp_path)
    assert ((gf, gs), (cf, cs)) == (((4, 2), (2, 1)) if gan else ((4, 0), (2, 0)))


def _final_weights(recipe, overrides, tmp_path, steps):
    cfg = resolve_config(recipe, "tiny", overrides, out=str(tmp_path))
    torch.manual_seed(0)
    tr = Trainer(cfg, recipe.build(cfg), out=tmp_path)
    for _ in range(steps):
        tr.train_step()
    return tr.state_dict()[0]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_stopped_feature_passes_change_no_training_result(tmp_path, monkeypatch, checkpointing):
    """N = 6 iterations (generator turns at 0 and 5) at the tiny ImageNet config: weights of the generator, fake
    score, GAN head and EMA equal bit for bit those of the same run with full feature passes."""
    # the critic's denoising range pinned to the DM term's (this comparison predates the separate critic range)
    over = TINY_IMAGENET + [f"train.grad_checkpointing={checkpointing}", "train.batch_size=4",
                            "objective.critic_min_frac=0.02", "objective.critic_max_frac=0.98"]
    stopped = _final_weights(imagenet64.RECIPE, over, tmp_path / "stopped", 6)
    with monkeypatch.context() as m:
        _full_passes_only(m)
        full = _final_weights(imagenet64.RECIPE, over, tmp_path / "full", 6)
    assert_tree_equal(stopped, full)
    w0 = _final_weights(imagenet64.RECIPE, over, tmp_path / "zero", 0)
    assert any(not torch.equal(w0["gan_head"][k], v) for k, v in stopped["gan_head"].items())  # it trained


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_stopped_feature_passes_under_torchrun(mode):
    """2 ranks: N iterations with stopped feature passes give the weights of N iterations with full ones (bitwise);
    a lone stopped pass gets the gradients (all-reduced / reduce-scattered) of a lone full pass, and the wrappers'
    state after a stopped pass is that after a full one (see tests/train/stop_worker.py)."""
    proc = torchrun(None, script=ROOT / "tests" / "train" / "stop_worker.py", env={"DMD2_TEST_MODE": mode})
    found = re.findall(r"RESULT rank=(\d) equal=(\w+) moved=(\w+) lone=(\w+) state=(\w+)", proc.stdout)
    assert sorted(found) == [(r, "True", "True", "True", "True") for r in "01"], proc.stdout + proc.stderr[-3000:]


def test_pass_counts_gan_from_critic_pass(tmp_path):
    """objective.gan_from_critic_pass: the critic's stopped pass holds the real batch only (B, not 2B)."""
    cfg = resolve_config(imagenet64.RECIPE, "tiny", TINY_IMAGENET + ["objective.gan_from_critic_pass=true"],
                         out=str(tmp_path))
    tr = Trainer(cfg, imagenet64.RECIPE.build(cfg), out=tmp_path)
    batches = []
    tr.fake.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    take = _count(tr)
    tr.train_step()
    assert take() == (4, 2)
    batches.clear()
    tr.train_step()
    assert take() == (2, 1) and batches == [8, 8]


def test_exact_resume_with_fresh_critic_samples(tmp_path):
    """objective.critic_fresh_samples=true (the former behaviour) resumes bit-exactly as the default does."""
    from train_helpers import run_inprocess, weights

    fresh = "objective.critic_fresh_samples=true"
    straight = run_inprocess(tmp_path / "straight", "train.max_steps=8", fresh)
    out = run_inprocess(tmp_path / "run", "train.max_steps=4", fresh)
    run_inprocess(out, "train.max_steps=8", fresh, "--resume", "auto")
    assert_tree_equal(weights(straight, 8)[0], weights(out, 8)[0])
    default = run_inprocess(tmp_path / "default", "train.max_steps=8")
    g_f, g_d = weights(straight, 8)[0]["generator"], weights(default, 8)[0]["generator"]
    assert any(not torch.equal(g_f[k], g_d[k]) for k in g_f)  # the option changes the run


@pytest.mark.slow
def test_ddp_matches_grad_accum_with_fresh_critic_samples(tmp_path):
    """2-rank DDP == one process with grad_accum=2, with objective.critic_fresh_samples=true (the default's twin is
    tests/train/test_train_distributed.py)."""
    from train_helpers import log_records, losses, weights

    fresh = "objective.critic_fresh_samples=true"
    torchrun(tmp_path / "one", "train.max_steps=4", "train.grad_accum=2", fresh, nproc=1)
    torchrun(tmp_path / "ddp", "train.max_steps=4", "train.distributed=ddp", fresh)
    assert_tree_equal(weights(tmp_path / "one", 4)[0], weights(tmp_path / "ddp", 4)[0], atol=1e-5)
    for a, b in zip(losses(log_records(tmp_path / "one")), losses(log_records(tmp_path / "ddp"))):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-5) for k in a)
