"""The ImageNet-64 recipe: the paper preset's resolved values, the tiny preset end to end through the command line
(run folder, exact resume), the teacher initialisation, load_generator and the sample command."""
import io
import json
import zipfile

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dmd2.models.adm import build_edm_adm
from dmd2.recipes import imagenet64 as rec
from dmd2.train import load_generator, main
from dmd2.train.config import apply_overrides

FAST = ["train.progress=false", "train.sample_every=0"]


def run(out, *args):
    assert main(rec.RECIPE, ["--preset", "tiny", "--out", str(out), *FAST, *args]) == 0
    return out


def ckpt(out, step):
    return out / "checkpoints" / f"checkpoint-{step:08d}"


# --- configuration ------------------------------------------------------------------------------------------
PAPER_VALUES = {
    ("train", "lr_generator"): 2e-6, ("train", "lr_critic"): 2e-6, ("train", "betas"): [0.9, 0.999],
    ("train", "weight_decay"): 0.01, ("train", "batch_size"): 40, ("train", "grad_clip"): 10.0,
    ("train", "mixed_precision"): "bf16", ("train", "max_steps"): 200_000, ("train", "grad_accum"): 1,
    ("train", "warmup_steps"): 72, ("train", "ema_decay"): None, ("train", "seed"): 10,  # official: 500 scheduler steps = 500/7 iterations
    ("critic", "ratio"): 5, ("sampler", "steps"): 1,
    ("objective", "gan_generator_weight"): 3e-3, ("objective", "gan_discriminator_weight"): 1e-2,
    ("objective", "dm_weight"): 1.0, ("objective", "min_frac"): 0.02, ("objective", "max_frac"): 0.98,
    ("objective", "gan_min_frac"): 0.0, ("objective", "gan_max_frac"): 1.0,
    ("model", "img_resolution"): 64, ("model", "label_dim"): 1000, ("model", "model_channels"): 192,
    ("model", "channel_mult"): [1, 2, 3, 4], ("model", "num_blocks"): 3, ("model", "attn_resolutions"): [32, 16, 8],
    ("model", "sigma_data"): 0.5, ("teacher", "random"): False, ("data", "synthetic"): 0,
}


@pytest.mark.parametrize("preset", [["--preset", "paper"], []], ids=["paper", "default"])
def test_paper_preset_dry_run_has_every_paper_value(preset, capsys, tmp_path):
    argv = [*preset, "--dry-run", "teacher.path=/x/edm.pkl", "data.path=/x/imagenet-64x64.zip", "--out", str(tmp_path / "o")]
    assert main(rec.RECIPE, argv) == 0
    cfg = json.loads(capsys.readouterr().out)
    for (section, key), value in PAPER_VALUES.items():
        assert cfg[section][key] == value, f"{section}.{key}"
    assert cfg["teacher"]["path"] == "/x/edm.pkl" and cfg["data"]["path"] == "/x/imagenet-64x64.zip"
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_paper_networks_gan_head_reads_the_bottleneck_and_generator_starts_at_sigma_80():
    from dmd2.core import EDMSchedule
    from dmd2.models.adm import bottleneck_name

    net = build_edm_adm(rec.ModelConfig().adm(), device="meta")
    assert sum(v.numel() for v in net.state_dict().values()) == 295_899_315  # EDM's pickle: 553 tensors
    assert sum(p.numel() for p in net.parameters()) == 295_899_267  # + 12 resample filters of 4 = buffers
    assert bottleneck_name(net) == "model.enc.8x8_block2" and net.model.bottleneck_channels == 768
    s = EDMSchedule()
    assert rec.student_grid(1, s) == [80.0]
    g4 = rec.student_grid(4, s)
    assert g4[0] == 80.0 and all(a > b for a, b in zip(g4, g4[1:]))
    torch.testing.assert_close(torch.tensor(g4[1:], dtype=torch.float64), s.karras_sigmas(5)[1:4])


def test_bad_configs_are_refused(tmp_path):
    cfg = apply_overrides(rec.RECIPE.config, rec.TINY)
    with pytest.raises(ValueError, match="teacher.path is required"):
        rec.build(apply_overrides(cfg, {"teacher.random": False}))
    with pytest.raises(ValueError, match="data.path is required"):
        rec.build(apply_overrides(cfg, {"data.synthetic": 0}))
    with pytest.raises(ValueError, match="either data.path or data.synthetic"):
        rec.build(apply_overrides(cfg, {"data.path": str(tmp_path)}))
    with pytest.raises(ValueError, match="teacher.dtype"):
        apply_overrides(cfg, {"teacher.dtype": "float16"})
    with pytest.raises(FileNotFoundError):
        rec.build(apply_overrides(cfg, {"teacher.random": False, "teacher.path": str(tmp_path / "none.safetensors")}))


# --- tiny end to end ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An uninterrupted 6-iteration tiny run (generator updates at 0 and 5; checkpoints at 3 and 6)."""
    return run(tmp_path_factory.mktemp("full"))


def test_tiny_run_folder(tiny):
    assert json.loads((tiny / "config.json").read_text())["model"]["img_resolution"] == 16
    for step in (3, 6):
        files = sorted(p.name for p in ckpt(tiny, step).iterdir())
        assert files == ["config.json", "ema.safetensors", "fake_score.safetensors", "gan_head.safetensors",
                         "generator.safetensors", "manifest.json", "state.pt"]
    logs = [json.loads(l) for l in (tiny / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [2, 4, 6]
    for key in ("loss_fake", "loss_gan_d", "loss_critic"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in logs)
    assert "loss_dm" in logs[0] and "loss_gan_g" in logs[0]
    # both trained networks moved away from the teacher they started as
    g3, g6 = load_file(str(ckpt(tiny, 3) / "generator.safetensors")), load_file(str(ckpt(tiny, 6) / "generator.safetensors"))
    assert any(not torch.equal(g3[k], g6[k]) for k in g3)


def test_tiny_resume_is_exact(tiny, tmp_path):
    out = run(tmp_path / "r", "train.max_steps=3")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-00000003"]
    run(out, "--resume", "auto")
    for name in ("generator", "fake_score", "gan_head", "ema"):
        a = load_file(str(ckpt(tiny, 6) / f"{name}.safetensors"))
        b = load_file(str(ckpt(out, 6) / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=f"{name}:{k}")


def test_generator_and_fake_score_start_from_the_teacher_file(tmp_path):
    """teacher.path (a converted EDM safetensors) + data.path (an EDM dataset zip) instead of the tiny stand-ins."""
    cfg = apply_overrides(rec.RECIPE.config, rec.TINY)
    torch.manual_seed(3)
    teacher = build_edm_adm(cfg.model.adm())
    tpath = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tpath))
    zpath = tmp_path / "data.zip"
    g = torch.Generator().manual_seed(0)
    with zipfile.ZipFile(zpath, "w") as z:
        for i in range(8):
            buf = io.BytesIO()
            arr = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(arr).save(buf, format="PNG")
            z.writestr(f"img{i:03d}.png", buf.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": [[f"img{i:03d}.png", i % 10] for i in range(8)]}))
    over = {"teacher.random": False, "teacher.path": str(tpath), "data.synthetic": 0, "data.path": str(zpath)}
    c = rec.build(apply_overrides(cfg, over))
    ref = teacher.state_dict()
    for net in (c.teacher, c.generator, c.fake_score):
        sd = net.state_dict()
        assert sd.keys() == ref.keys()
        assert all(torch.equal(sd[k], ref[k]) for k in ref)
    assert not c.teacher.training and not any(p.requires_grad for p in c.teacher.parameters())
    assert c.generator.training and all(p.requires_grad for p in c.generator.parameters())
    assert c.gan_layers == ["model.enc.8x8_block0"] and c.gan_head.in_channels == [32]
    imgs, labels = c.real_data(0, 0, 4, torch.device("cpu"))
    assert imgs.shape == (4, 3, 16, 16) and labels.dtype == torch.long and set(labels.tolist()) <= set(range(8))
    # and the whole tiny run goes through these files
    out = run(tmp_path / "run", *[f"{k}={v}" for k, v in over.items()], "train.max_steps=1")
    assert (ckpt(out, 1) / "generator.safetensors").is_file()
    # a dataset with more classes than the network has labels is refused
    with pytest.raises(ValueError, match="classes but model.label_dim"):
        rec.build(apply_overrides(cfg, {**over, "model.label_dim": 5}))


def test_init_from_checkpoint(tiny):
    cfg = apply_overrides(rec.RECIPE.config, {**rec.TINY, "init.checkpoint": str(ckpt(tiny, 6))})
    c = rec.build(cfg)
    for name, net in (("generator", c.generator), ("fake_score", c.fake_score), ("gan_head", c.gan_head)):
        saved = load_file(str(ckpt(tiny, 6) / f"{name}.safetensors"))
        sd = net.state_dict()
        assert all(torch.equal(sd[k], saved[k]) for k in saved), name
    assert not torch.equal(c.generator.state_dict()["model.out_conv.weight"], c.teacher.state_dict()["model.out_conv.weight"])


# --- users: load_generator and sample -------------------------------------------------------------------------
def test_load_generator_is_one_generator_call_at_sigma_80(tiny):
    gen = load_generator(tiny, weights="generator")  # a run folder -> its newest checkpoint
    saved = load_file(str(ckpt(tiny, 6) / "generator.safetensors"))
    sd = gen.denoiser.state_dict()
    assert all(torch.equal(sd[k], saved[k]) for k in saved)
    assert (gen.num_steps, gen.timesteps, gen.num_classes, gen.shape) == (1, [80.0], 10, (3, 16, 16))
    z = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 9, 3, 1])
    with torch.no_grad():
        x = gen(z, labels)
        direct = gen.denoiser(80.0 * z, torch.full((5,), 80.0), labels)
    torch.testing.assert_close(x, direct, rtol=0, atol=0)
    ema = load_generator(ckpt(tiny, 6), weights="ema")
    ema_saved = load_file(str(ckpt(tiny, 6) / "ema.safetensors"))
    esd = ema.denoiser.state_dict()
    assert ema.weights == "ema" and set(esd) == set(ema_saved)  # the EMA file is a plain state dict of the network
    assert all(torch.equal(esd[k], ema_saved[k]) for k in ema_saved)
    assert not torch.equal(esd["model.out_conv.weight"], sd["model.out_conv.weight"])
    two = load_generator(tiny, steps=2)
    assert two.num_steps == 2 and two.timesteps[0] == 80.0
    with pytest.raises(ValueError, match=r"noise must be \(B, 3, 16, 16\)"):
        gen(torch.zeros(2, 3, 8, 8), labels[:2])
    with pytest.raises(ValueError, match="neither a complete checkpoint folder"):
        load_generator(tiny / "checkpoints")


def test_sample_command_writes_a_grid(tiny, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(rec.RECIPE, ["sample", str(ckpt(tiny, 3)), str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as im:
        assert im.size == (8 * 17 + 1, 8 * 17 + 1)  # 64 images of 16 px, 1 px gaps
    assert main(rec.RECIPE, ["sample"]) == 2
    assert "usage" in capsys.readouterr().err
