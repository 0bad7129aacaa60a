"""SDXL loading, prompt embeddings, LoRA adapter switching and the memory modes, on tiny SDXL-shaped components."""
import copy

import pytest
import torch

from dmd2.models.sdxl import (AdapterSwitch, DiffusersVPSchedule, PromptEncoder, SDXLDenoiser, add_lora,
                              build_networks, load_sdxl, time_ids)
from dmd2.models.sdxl_tiny import TINY_PROMPTS, TINY_TEXT_DIM, tiny_fixtures, write_tiny_fixtures


@pytest.fixture(scope="module")
def parts(sdxl_tiny_base):
    return load_sdxl(sdxl_tiny_base, local_files_only=True)


@pytest.fixture(scope="module")
def encoder(parts):
    return PromptEncoder(parts.tokenizer, parts.text_encoder, parts.tokenizer_2, parts.text_encoder_2)


def _cond(encoder, n=2):
    return encoder.cond(["a red cube", "the cat on a mat"][:n], 32, 32)


# ------------------------------------------------------------------------------------------------ loading
def test_tiny_fixtures_are_written_once_where_their_paths_say(tmp_path):
    from dmd2.data.prompts import read_prompts
    from dmd2.data.sdxl_images import ImageCaptionFolder

    f = write_tiny_fixtures(tmp_path / "run", 16, seed=0)
    assert f == tiny_fixtures(tmp_path / "run") and f.base == tmp_path / "run" / "tiny-base"
    assert read_prompts(f.prompts) == list(TINY_PROMPTS)
    images = ImageCaptionFolder(f.images, 16)
    assert images.captions() == list(TINY_PROMPTS) and images[0][0].shape == (3, 16, 16)
    weights = (f.base / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    f.prompts.write_text("kept\n")
    write_tiny_fixtures(tmp_path / "run", 16, seed=1)  # every part present: nothing is written again
    assert f.prompts.read_text() == "kept\n"
    assert (f.base / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights


def test_latent_shape_is_the_vae_factor_and_refuses_other_resolutions(parts):
    assert parts.latent_shape(32) == (4, 16, 16) and parts.latent_shape(48) == (4, 24, 24)  # tiny VAE: factor 2
    with pytest.raises(ValueError, match="model.resolution 33 must be a multiple of the VAE's downsampling factor 2"):
        parts.latent_shape(33)


def test_place_casts_text_encoders_and_vae_and_leaves_the_unet(sdxl_tiny_base):
    p = load_sdxl(sdxl_tiny_base, local_files_only=True)
    assert p.place("cpu", torch.bfloat16, None) is p
    dtypes = {name: {q.dtype for q in getattr(p, name).parameters()}
              for name in ("text_encoder", "text_encoder_2", "vae", "unet")}
    assert dtypes == {"text_encoder": {torch.bfloat16}, "text_encoder_2": {torch.bfloat16}, "vae": {torch.float32},
                      "unet": {torch.float32}}
    p.place("cpu", None, torch.float16)
    assert {q.dtype for q in p.vae.parameters()} == {torch.float16}
    assert {q.dtype for q in p.text_encoder.parameters()} == {torch.bfloat16}


def test_offline_hub_id_error_names_the_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"nonexistent-org/no-such-sdxl.*(HF_HUB_OFFLINE|Downloads are off)"):
        load_sdxl("nonexistent-org/no-such-sdxl", components=("unet",))


def test_local_folder_missing_subfolder_names_it(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match=str(tmp_path / "vae")):
        load_sdxl(tmp_path)


def test_loaded_components_are_frozen_and_sdxl_shaped(parts):
    assert not any(p.requires_grad for p in parts.unet.parameters())
    assert parts.unet.config.addition_embed_type == "text_time"
    assert parts.unet.config.cross_attention_dim == parts.text_encoder.config.hidden_size + parts.text_encoder_2.config.hidden_size
    assert isinstance(parts.schedule, DiffusersVPSchedule) and parts.prediction_type == "epsilon"


def test_schedule_tables_are_diffusers_float32(parts):
    from diffusers import LCMScheduler

    ref = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    t = torch.arange(1000)
    assert torch.equal(parts.schedule.alpha(t), ref.sqrt())
    assert torch.equal(parts.schedule.sigma(t), (1 - ref).sqrt())


# ------------------------------------------------------------------------------------------------ prompts
def test_prompt_embeddings_shapes_and_equal_to_diffusers(sdxl_tiny_base, encoder):
    from diffusers import StableDiffusionXLPipeline

    c = _cond(encoder)
    assert c["encoder_hidden_states"].shape == (2, 77, 2 * TINY_TEXT_DIM)
    assert c["text_embeds"].shape == (2, TINY_TEXT_DIM)
    assert torch.equal(c["time_ids"], torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2))
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_tiny_base)
    emb, _, pooled, _ = pipe.encode_prompt(["a red cube", "the cat on a mat"], do_classifier_free_guidance=False)
    assert torch.equal(c["encoder_hidden_states"], emb)
    assert torch.equal(c["text_embeds"], pooled)


def test_penultimate_layer_of_both_encoders(encoder, parts):
    ids1 = parts.tokenizer(["a red cube"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids2 = parts.tokenizer_2(["a red cube"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    h1 = parts.text_encoder(ids1, output_hidden_states=True).hidden_states
    h2 = parts.text_encoder_2(ids2, output_hidden_states=True).hidden_states
    c = encoder.encode(["a red cube"])
    assert torch.equal(c["encoder_hidden_states"], torch.cat([h1[-2], h2[-2]], -1))
    assert not torch.equal(c["encoder_hidden_states"], torch.cat([h1[-1], h2[-1]], -1))


def test_uncond_zeros_and_empty(encoder):
    z = encoder.uncond(32, 32, "zeros")
    e = encoder.uncond(32, 32, "empty")
    assert z["encoder_hidden_states"].shape == (1, 77, 2 * TINY_TEXT_DIM)
    assert not z["encoder_hidden_states"].any() and not z["text_embeds"].any()
    ref = encoder.encode([""])
    assert torch.equal(e["encoder_hidden_states"], ref["encoder_hidden_states"])
    assert e["encoder_hidden_states"].abs().sum() > 0
    assert torch.equal(z["time_ids"], time_ids(32, 32)) and torch.equal(e["time_ids"], time_ids(32, 32))
    with pytest.raises(ValueError, match="zeros"):
        encoder.uncond(32, 32, "null")


# ------------------------------------------------------------------------------------------------ LoRA
def test_adapter_switch_matches_peft_and_keeps_requires_grad(parts, encoder):
    unet = copy.deepcopy(parts.unet)
    add_lora(unet, "a", rank=4)
    add_lora(unet, "b", rank=4)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 700])
    c = _cond(encoder)
    kw = dict(encoder_hidden_states=c["encoder_hidden_states"], added_cond_kwargs={"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]})
    sw = AdapterSwitch(unet)
    outs = {}
    with torch.no_grad():
        for state in ("a", "b", None):
            sw.set(state)
            outs[state] = unet(x, t, **kw).sample
        assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
        unet.set_adapter("b")
        unet.enable_adapters()
        assert torch.equal(unet(x, t, **kw).sample, outs["b"])
        unet.disable_adapters()
        assert torch.equal(unet(x, t, **kw).sample, outs[None])
    assert not torch.equal(outs["a"], outs["b"]) and not torch.equal(outs["a"], outs[None])


def test_shared_base_exposes_only_adapter_parameters(parts):
    nets = build_networks(copy.deepcopy(parts.unet), parts.schedule, mode="shared-base", lora_rank=4, lora_alpha=4)
    gen = dict(nets.generator.named_parameters())
    fake = dict(nets.fake_score.named_parameters())
    assert gen and fake and not list(nets.teacher.parameters())
    assert all(".generator." in k.replace("~", ".") for k in gen) and all(".fake_score." in k.replace("~", ".") for k in fake)
    assert set(map(id, gen.values())).isdisjoint(map(id, fake.values()))
    base = nets.hidden_unets[0]
    assert sum(p.requires_grad for p in base.parameters()) == len(gen) + len(fake)


def _train_adapters(nets, encoder, steps=3, checkpointing=False):
    """A few AdamW steps of the generator and fake-score adapters on arbitrary losses."""
    c = _cond(encoder)
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW([*nets.generator.parameters(), *nets.fake_score.parameters()], lr=1e-2)
    for _ in range(steps):
        x = torch.randn(2, 4, 16, 16, generator=g)
        t = torch.tensor([300, 800])
        loss = nets.generator(x, t, c).square().mean() + nets.fake_score(x, t, c).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_shared_base_teacher_unchanged_after_training_adapters(parts, encoder):
    nets = build_networks(copy.deepcopy(parts.unet), parts.schedule, mode="shared-base", lora_rank=4, lora_alpha=4)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([250, 750])
    c = _cond(encoder)
    with torch.no_grad():
        before = nets.teacher(x, t, c)
        gen_before = nets.generator(x, t, c)
        assert torch.equal(gen_before, before)  # adapters start at B = 0: generator == teacher
        ref = SDXLDenoiser(parts.unet, parts.schedule, gan_layer=None)(x, t, c)
        assert torch.equal(before, ref)
    base_before = {n: p.clone() for n, p in nets.hidden_unets[0].named_parameters() if "lora_" not in n}
    _train_adapters(nets, encoder)
    with torch.no_grad():
        after = nets.teacher(x, t, c)
        gen_after = nets.generator(x, t, c)
        fake_after = nets.fake_score(x, t, c)
    assert torch.equal(after, before)
    assert (gen_after - before).abs().max() > 1e-3 and (fake_after - before).abs().max() > 1e-3
    assert not torch.equal(gen_after, fake_after)
    for n, p in nets.hidden_unets[0].named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n


def test_gradient_checkpointing_recomputes_with_the_right_adapter(parts, encoder):
    """Generator forward, then a fake-score forward, then one backward through both: with checkpointing, the
    generator's blocks are recomputed after the fake score ran; the gradients must equal the non-checkpointed ones."""
    torch.manual_seed(0)
    unet = copy.deepcopy(parts.unet)
    nets = build_networks(unet, parts.schedule, mode="shared-base", lora_rank=4, lora_alpha=4)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    c = _cond(encoder)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([400, 900])

    def grads():
        for p in unet.parameters():
            p.grad = None
        y = nets.generator(x, t, c)
        loss = (nets.fake_score(y, t, c) * y).mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    plain = grads()
    nets.generator.enable_gradient_checkpointing()
    ckpt = grads()
    assert unet.down_blocks[1].gradient_checkpointing and unet.mid_block.gradient_checkpointing
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)


def test_lora_mode_generator_hides_its_base_and_fake_is_full(parts):
    nets = build_networks(copy.deepcopy(parts.unet), parts.schedule, mode="lora", lora_rank=4, lora_alpha=4)
    n_unet = sum(p.numel() for p in parts.unet.parameters())
    assert sum(p.numel() for p in nets.fake_score.parameters()) == n_unet
    assert 0 < sum(p.numel() for p in nets.generator.parameters()) < n_unet // 5
    assert all(p.dtype == torch.float32 and p.requires_grad for p in nets.generator.parameters())


def test_full_mode_copies_are_independent(parts):
    nets = build_networks(copy.deepcopy(parts.unet), parts.schedule, mode="full")
    g = {id(p) for p in nets.generator.parameters()}
    f = {id(p) for p in nets.fake_score.parameters()}
    te = {id(p) for p in nets.teacher.parameters()}
    assert g.isdisjoint(f) and g.isdisjoint(te) and f.isdisjoint(te)
    assert not any(p.requires_grad for p in nets.teacher.parameters())
    assert all(p.requires_grad for p in nets.generator.parameters())


def test_bad_mode_and_missing_adapter(parts):
    with pytest.raises(ValueError, match="memory_mode"):
        build_networks(torch.nn.Linear(2, 2), DiffusersVPSchedule(), mode="half")
    with pytest.raises(ValueError, match="no LoRA adapter named 'g'"):
        SDXLDenoiser(parts.unet, parts.schedule, adapter="g", shared=True)


@pytest.mark.parametrize("mode", ["full", "lora", "shared-base"])
def test_bf16_frozen_weights_fp32_trained_weights_from_the_loaded_ones(parts, mode):
    loaded = {n: p.clone() for n, p in parts.unet.named_parameters()}
    nets = build_networks(copy.deepcopy(parts.unet), parts.schedule, mode=mode, lora_rank=4, lora_alpha=4,
                          frozen_dtype=torch.bfloat16)
    frozen = nets.hidden_unets[0] if mode == "shared-base" else nets.teacher.unet
    assert frozen.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in nets.generator.parameters())
    assert all(p.dtype == torch.float32 for p in nets.fake_score.parameters())
    if mode != "shared-base":  # full trained copies start from the loaded fp32 weights, not their bf16 rounding
        trained = nets.generator.unet_module if mode == "full" else nets.fake_score.unet_module
        for n, p in trained.named_parameters():
            assert torch.equal(p, loaded[n]), n
