"""The SDXL recipe's components (tiny preset): CFG teacher wiring, step grids, GAN features, data errors."""
import pytest
import torch

from dmd2.core import FeatureHooks
from dmd2.recipes.sdxl import RECIPE, build
from dmd2.train import resolve_config


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory):
    return tmp_path_factory.mktemp("sdxl-build")


def _cfg(out, *overrides, steps=None):
    return resolve_config(RECIPE, "tiny", list(overrides), out=str(out), steps=steps)


@pytest.mark.parametrize("uncond", ["zeros", "empty"])
def test_teacher_is_cfg8_over_the_base_with_the_configured_uncond(tiny_out, uncond):
    c = build(_cfg(tiny_out, f"model.uncond={uncond}", "model.memory_mode=shared-base"))
    assert c.teacher.scale == 8.0
    u = c.teacher.uncond
    assert u["encoder_hidden_states"].shape[0] == 1
    assert (not u["encoder_hidden_states"].any()) == (uncond == "zeros")
    noise, cond = c.latents(2, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert noise.shape == (2, 4, 16, 16) and cond["encoder_hidden_states"].shape == (2, 77, 64)
    t = torch.tensor([300, 700])
    base = c.teacher.denoiser
    with torch.no_grad():
        got = c.teacher(noise, t, cond)
        uc = {k: v.expand(2, *v.shape[1:]) for k, v in u.items()}
        want = base(noise, t, uc) + 8.0 * (base(noise, t, cond) - base(noise, t, uc))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_step_grids(tiny_out):
    assert build(_cfg(tiny_out, steps=1)).sampler.timesteps == [399]
    assert build(_cfg(tiny_out, steps=4)).sampler.timesteps == [999, 749, 499, 249]


@pytest.mark.parametrize("mode", ["full", "shared-base"])
def test_gan_head_reads_the_fake_mid_block(tiny_out, mode):
    c = build(_cfg(tiny_out, f"model.memory_mode={mode}"))
    assert c.gan_layers == ["gan_tap"]
    hooks = FeatureHooks(c.fake_score, c.gan_layers)
    noise, cond = c.latents(2, torch.Generator().manual_seed(0), torch.device("cpu"))
    t = torch.tensor([300, 700])
    with torch.no_grad():
        _, feats = hooks.run(c.fake_score, noise, t, cond)
        logits = c.gan_head(feats)
    assert feats[0].shape == (2, 64, 8, 8) and logits.shape == (2,)
    # the generator and the teacher running do not feed the fake score's tap
    with pytest.raises(RuntimeError, match="did not run"), torch.no_grad():
        with hooks.capture():
            c.generator(noise, t, cond)
            c.teacher(noise, t, cond)
    real, real_cond = c.real_data(0, 0, 2, torch.device("cpu"))
    assert real.shape == (2, 4, 16, 16) and real_cond["text_embeds"].shape == (2, 32)


def test_real_latents_are_fresh_posterior_samples_keyed_by_step_and_shard(tiny_out):
    """The GAN's real latents: mean + std * eps of the VAE posterior, eps from (data.seed, step, shard) - the same
    read gives the same sample, another step or shard of the same images another one."""
    from dmd2.data.sdxl_images import sample_posterior, vae_moments
    from dmd2.train import derive_seed

    cfg = _cfg(tiny_out, "train.batch_size=8", "data.seed=3")  # one global batch = the 8 tiny images, every step
    c = build(cfg)
    cpu = torch.device("cpu")
    a, cond_a = c.real_data(0, 0, 8, cpu)
    b, _ = c.real_data(0, 0, 8, cpu)
    assert torch.equal(a, b)
    from dmd2.data.sdxl_images import open_image_source
    from dmd2.train import IndexedBatches

    ds = open_image_source("folder", tiny_out / "tiny-data" / "images", 32)
    idx = IndexedBatches(ds, shards=1, batch=8, seed=3).indices(0, 0)
    from dmd2.models.sdxl import load_sdxl

    vae = load_sdxl(tiny_out / "tiny-base", torch.float32, True, components=("vae",)).vae
    moments = vae_moments(vae, torch.stack([ds[int(i)][0] for i in idx]))
    want = sample_posterior(moments, torch.Generator().manual_seed(derive_seed(3, 0, 0)))
    torch.testing.assert_close(a, want)
    assert (moments[:, 1] > 0).all() and not torch.allclose(a, moments[:, 0])  # a sample, not the mean
    # step 1 reads the same 8 images (one global batch per epoch) in another order: image by image, another sample
    idx1 = IndexedBatches(ds, shards=1, batch=8, seed=3).indices(1, 0)
    c1, _ = c.real_data(1, 0, 8, cpu)
    c1 = c1[[idx1.tolist().index(i) for i in idx.tolist()]]  # aligned with step 0's order
    diff = (c1 - a).abs().flatten(1).amax(1)
    assert (diff > 0).all()


def test_prompts_real_are_the_captions_of_the_real_set(tiny_out):
    import json

    c = build(_cfg(tiny_out, "data.prompts=real"))
    captions = [json.loads(line)["caption"] for line in
                (tiny_out / "tiny-data" / "images" / "captions.jsonl").read_text().splitlines()]
    g = torch.Generator().manual_seed(0)
    _, cond = c.latents(3, g, torch.device("cpu"))
    idx = torch.randint(len(captions), (3,), generator=torch.Generator().manual_seed(0)).tolist()
    from dmd2.models.sdxl import PromptEncoder, load_sdxl

    parts = load_sdxl(tiny_out / "tiny-base", torch.float32, True)
    enc = PromptEncoder(parts.tokenizer, parts.text_encoder, parts.tokenizer_2, parts.text_encoder_2)
    want = enc.cond([captions[i] for i in idx], 32, 32)
    torch.testing.assert_close(cond["encoder_hidden_states"], want["encoder_hidden_states"])
    with pytest.raises(ValueError, match="data.real is empty"):
        build(_cfg(tiny_out, "data.prompts=real", "objective.gan_generator_weight=0",
                   "objective.gan_discriminator_weight=0", "data.real=", "model.tiny=false",
                   f"model.path={tiny_out / 'tiny-base'}"))


def test_no_gan_weights_no_head_no_real_data(tiny_out):
    c = build(_cfg(tiny_out, "objective.gan_generator_weight=0", "objective.gan_discriminator_weight=0"))
    assert c.gan_head is None and c.real_data is None and c.gan_layers == []


def test_missing_real_data_and_prompts(tiny_out, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build(_cfg(tiny_out, f"data.prompts={tmp_path / 'none.txt'}"))
    with pytest.raises(ValueError, match="captions.jsonl"):
        build(_cfg(tiny_out, f"data.real={tmp_path}"))
    with pytest.raises(ValueError, match="fsdp2"):
        build(_cfg(tiny_out, "model.memory_mode=lora", "train.distributed=fsdp2"))


def test_resolve_checkpoint_newest_of_a_run(sdxl_tiny_runs):
    from dmd2.train import resolve_checkpoint

    run = sdxl_tiny_runs("shared-base")
    assert resolve_checkpoint(run) == run / "checkpoints" / "checkpoint-00000004"
    assert resolve_checkpoint(run / "checkpoints" / "checkpoint-00000004").name == "checkpoint-00000004"


def test_sample_command_writes_a_grid(sdxl_tiny_runs, tmp_path):
    from PIL import Image

    from dmd2.train import main

    out = tmp_path / "grid.png"
    assert main(RECIPE, ["sample", str(sdxl_tiny_runs("lora")), str(out), "a red cube", "the cat"]) == 0
    img = Image.open(out)
    assert img.size[0] >= 2 * 32 and img.size[1] >= 32
    assert main(RECIPE, ["sample", str(sdxl_tiny_runs("lora"))]) == 2


@pytest.mark.parametrize("mode", ["full", "shared-base"])
def test_load_generator_reads_sdxl_runs(sdxl_tiny_runs, mode):
    from safetensors.torch import load_file

    from dmd2.recipes.sdxl import load_student_unet
    from dmd2.train import load_config, load_generator, resolve_checkpoint

    run = sdxl_tiny_runs(mode)
    last = resolve_checkpoint(run)
    G = load_generator(run)  # the recipe is named by the run's config.json
    assert G.weights == "ema" and G.checkpoint == last and G.timesteps == [999, 499]
    # ema.safetensors is a plain state dict of the trained generator module: strict loading works
    recipe, cfg = load_config(last)
    c = recipe.build(cfg)
    c.generator.load_state_dict(load_file(str(last / "ema.safetensors")), strict=True)
    noise, cond = c.latents(2, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert G.shape == tuple(noise.shape[1:])
    # the Student's UNet is the fused student UNet the export reads
    unet, _, _, which = load_student_unet(run, "ema", fuse=True)
    assert which == "ema"
    ref = unet.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in G.denoiser.unet.state_dict().items())
    with torch.no_grad():
        x = G(noise, cond, generator=torch.Generator().manual_seed(1))
    assert x.shape == noise.shape and torch.isfinite(x).all()
