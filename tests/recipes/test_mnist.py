"""The MNIST recipe: the shipped teacher, the student grid, the CLI presets, a short distillation that must improve
the student, and the metrics file of a run."""
import json

import pytest
import torch

from dmd2.core import EDMSchedule
from dmd2.eval.fid_mnist import evaluate_sampler
from dmd2.eval.mnist_classifier import mnist_features
from dmd2.eval.samplers import heun_sampler
from dmd2.recipes import mnist
from dmd2.recipes.mnist_teacher import DEFAULT_TEACHER, TeacherConfig, build_teacher, load_teacher, train_teacher
from dmd2.train import Trainer, apply_overrides, main, resolve_config


@pytest.fixture(scope="module")
def teacher():
    return load_teacher()


def test_shipped_teacher_loads_with_its_record(teacher):
    sd, ref = teacher.state_dict(), build_teacher().state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ref.items()}
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    record = json.loads(DEFAULT_TEACHER.with_suffix(".json").read_text())
    assert record["params"] == sum(p.numel() for p in teacher.parameters())
    for key, nfe in (("teacher_ode", 35), ("teacher_1step", 1)):
        row = record["metrics"][key]
        assert row["nfe"] == nfe and row["n_samples"] == 1000 and len(row["per_seed"]["fid"]) == 3
    # the target of the issue, as shipped: the 18-step teacher agrees with the requested class >= 95% of the time
    assert record["metrics"]["teacher_ode"]["label_accuracy"] >= 0.95


@pytest.mark.slow
def test_teacher_heun18_label_accuracy(teacher):
    """EDM Heun, 18 steps (35 NFE), N = 256 samples of classes 0..9 in turn: the classifier agrees >= 92% of the time
    (the shipped record says >= 95% on N = 1,000; 92% leaves ~3 binomial std for N = 256)."""
    labels = torch.arange(256) % 10
    images = heun_sampler(teacher, (1, 32, 32), 18)(labels, 0)
    assert images.shape == (256, 1, 32, 32) and bool(torch.isfinite(images).all())
    _, logits = mnist_features(images)
    assert float((logits.argmax(1) == labels).double().mean()) >= 0.92


def test_load_teacher_rejects_a_foreign_checkpoint(tmp_path):
    from safetensors.torch import save_file

    save_file({"model.map_layer0.weight": torch.zeros(3, 3)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="do not match"):
        load_teacher(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="teacher"):
        load_teacher(tmp_path / "missing.safetensors")


def test_teacher_training_resumes_exactly(tmp_path):
    cfg = TeacherConfig(iters=4, batch=4, checkpoint_every=2, log_every=2)
    train_teacher(replace_iters(cfg, 2), tmp_path / "a", progress=False)
    train_teacher(cfg, tmp_path / "a", resume=True, progress=False)
    train_teacher(cfg, tmp_path / "b", progress=False)
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "a" / "teacher.safetensors")), load_file(str(tmp_path / "b" / "teacher.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    curve = [[(p["iter"], p["loss"]) for p in json.loads((tmp_path / d / "teacher.json").read_text())["loss_curve"]]
             for d in ("a", "b")]
    assert curve[0] == curve[1] and len(curve[0]) == 2


def replace_iters(cfg, n):
    from dataclasses import replace

    return replace(cfg, iters=n)


def test_student_sigmas_are_the_karras_grid_head():
    s = EDMSchedule()
    assert mnist.student_sigmas(1, s) == [80.0]
    four = mnist.student_sigmas(4, s)
    hi, lo = 80.0 ** (1 / 7), 0.002 ** (1 / 7)  # EDM Eq. 5 with N = 5 points, the last (0.002) dropped
    assert four == pytest.approx([(hi + i / 4 * (lo - hi)) ** 7 for i in range(4)], rel=1e-9)
    assert four == pytest.approx([80.0, 17.53, 2.515, 0.1698], rel=1e-3)
    assert all(a > b for a, b in zip(four, four[1:]))


def test_presets_resolve():
    tiny = resolve_config(mnist.RECIPE, "tiny")
    assert tiny.train.max_steps <= 10 and tiny.critic.ratio == 5
    default = resolve_config(mnist.RECIPE, None)
    assert default.critic.ratio == 5 and default.objective.gan_generator_weight == 3e-3
    assert default.objective.gan_discriminator_weight == 1e-2 and default.sampler.steps == 1
    long = resolve_config(mnist.RECIPE, "long")
    assert long.train.max_steps > default.train.max_steps
    assert resolve_config(mnist.RECIPE, None, steps=4).sampler.steps == 4


def test_build_wires_the_gan_head_to_the_fake_bottleneck():
    cfg = resolve_config(mnist.RECIPE, "tiny")
    c = mnist.build(cfg)
    assert c.gan_layers == ["model.enc.8x8_block0"]
    feats = {}
    h = c.fake_score.get_submodule(c.gan_layers[0]).register_forward_hook(lambda m, a, o: feats.setdefault("f", o))
    c.fake_score(torch.randn(2, 1, 32, 32), torch.full((2,), 1.0), torch.tensor([1, 2]))
    h.remove()
    assert feats["f"].shape == (2, 32, 8, 8) and c.gan_head(feats["f"][None].unbind(0)).shape == (2,)
    # generator and fake score start as the teacher
    t = c.teacher.state_dict()
    assert all(torch.equal(t[k], v) for k, v in c.generator.state_dict().items())
    assert all(torch.equal(t[k], v) for k, v in c.fake_score.state_dict().items())
    images, labels = c.real_data(0, 0, cfg.train.batch_size, torch.device("cpu"))
    assert images.shape == (cfg.train.batch_size, 1, 32, 32) and labels.dtype == torch.int64


@pytest.mark.slow
def test_short_distillation_improves_the_student_fid(tmp_path):
    """60 iterations (12 generator updates) of the default recipe (TTUR 5, GAN head) move the raw 1-step
    student's FID (N = 200, 20 per class, one seed) below half that of its initialisation (the teacher in one step)."""
    cfg = apply_overrides(resolve_config(mnist.RECIPE, None, out=str(tmp_path)),
                          {"train.max_steps": 60, "train.batch_size": 16, "train.checkpoint_every": 60,
                           "train.progress": False})
    torch.manual_seed(cfg.train.seed)
    c = mnist.build(cfg)

    def fid(gen):
        gen.eval()
        ev = evaluate_sampler(mnist.student_sampler(gen, c.sampler), seeds=(0,), n_per_class=20)
        gen.train()
        return ev.fid_mean

    before = fid(c.generator)
    Trainer(cfg, c, out=tmp_path).train()
    after = fid(c.generator)
    assert after < 0.5 * before, (before, after)


@pytest.mark.slow
def test_tiny_cli_run_writes_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(mnist.RECIPE, ["--preset", "tiny", "--out", str(out), "eval.enabled=true"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("real_train", "teacher_ode", "teacher_1step", "student_1step"):
        assert {"fid", "fid_std", "kid", "label_accuracy", "nfe", "seconds", "weights"} <= set(m[key])
    assert (m["teacher_ode"]["nfe"], m["teacher_1step"]["nfe"], m["student_1step"]["nfe"]) == (35, 1, 1)
    assert m["student_1step"]["weights"].startswith("student EMA")
    # the train split is the floor: far below a 4-iteration student
    assert m["real_train"]["fid"] < 0.2 < m["student_1step"]["fid"]
    assert (out / "samples_side_by_side.png").is_file()
    assert "student_1step" in capsys.readouterr().out
