"""Reading trained generators back (dmd2.train.loading) for every recipe, old-format EMA files included, and
Recipe.after_train running only after a completed run. (SDXL: tests/recipes/test_sdxl_build.py, with its fixtures.)"""
import json
import os
import shutil
import signal
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from dmd2.core import EMA
from dmd2.train import Student, load_generator, main, resolve_checkpoint
from dmd2.train import checkpoint as ckpt

from train_helpers import run_inprocess


def _run(recipe, out, *argv, rc=0):
    assert main(recipe, ["--preset", "tiny", "--out", str(out), "train.progress=false", "train.sample_every=0", *argv]) == rc
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``recipe module -> (RECIPE, run folder)`` of the tiny preset of every recipe trained by the shared loop."""
    from dmd2.recipes import imagenet64, mnist, tiny

    root = tmp_path_factory.mktemp("loading")
    return {m.__name__: (m.RECIPE, _run(m.RECIPE, root / m.RECIPE.name)) for m in (tiny, mnist, imagenet64)}


def _to_old_format(src, dst):
    """A copy of checkpoint ``src`` as written before this layout: EMA buffers under ``buffer::``, no recipe key, no
    manifest (checkpoints carry one since the same release)."""
    shutil.copytree(src, dst)
    (dst / "manifest.json").unlink()
    net_buffers = set(load_file(str(src / "generator.safetensors"))) - set(_param_names(src))
    ema = load_file(str(src / "ema.safetensors"))
    save_file({(f"buffer::{k}" if k in net_buffers else k): v for k, v in ema.items()}, str(dst / "ema.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    config.pop("recipe")
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _param_names(ckpt_dir):
    from dmd2.train import load_config

    recipe, cfg = load_config(ckpt_dir)
    torch.manual_seed(0)
    return [n for n, _ in recipe.build(cfg).generator.named_parameters()]


@pytest.mark.parametrize("name", ["dmd2.recipes.tiny", "dmd2.recipes.mnist", "dmd2.recipes.imagenet64"])
def test_load_generator_reads_every_recipe(runs, name):
    recipe, run = runs[name]
    last = ckpt.latest_checkpoint(run)
    assert json.loads((last / "config.json").read_text())["recipe"] == name == recipe.module
    G = load_generator(run)  # a run folder: its newest checkpoint, the EMA weights
    assert isinstance(G, Student) and G.checkpoint == last and G.weights == "ema"
    assert not G.training and not any(p.requires_grad for p in G.parameters())
    # the EMA file is a plain state dict of the generator network: strict loading works on the recipe's own network
    ema = load_file(str(last / "ema.safetensors"))
    assert not any("::" in k for k in ema)
    from dmd2.train import load_config

    _, cfg = load_config(last)
    torch.manual_seed(1)
    net = recipe.build(cfg).generator
    net.load_state_dict(ema, strict=True)
    assert all(torch.equal(v, ema[k].to(v.dtype)) for k, v in G.denoiser.state_dict().items())
    # a checkpoint folder works the same; weights="generator" reads the trained weights
    raw = load_generator(last, weights="generator")
    saved = load_file(str(last / "generator.safetensors"))
    assert raw.weights == "generator" and all(torch.equal(v, saved[k]) for k, v in raw.denoiser.state_dict().items())
    assert any(not torch.equal(saved[k], ema[k]) for k in saved)
    # the module samples: G(noise, labels) is the sampler over the loaded denoiser
    noise = torch.randn((3, *G.shape), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(3) % max(G.num_classes, 1) if G.num_classes else None
    with torch.no_grad():
        x = G(noise, labels, generator=torch.Generator().manual_seed(5))
        direct = G.sampler.sample(G.denoiser, noise, labels, generator=torch.Generator().manual_seed(5))
    assert x.shape == noise.shape and torch.equal(x, direct)


@pytest.mark.parametrize("name", ["dmd2.recipes.tiny", "dmd2.recipes.mnist", "dmd2.recipes.imagenet64"])
def test_old_format_checkpoints_still_load(runs, name, tmp_path):
    recipe, run = runs[name]
    last = ckpt.latest_checkpoint(run)
    old = _to_old_format(last, tmp_path / last.name)
    # the ADM networks carry buffers (resample filters): their old files differ in more than the recipe key
    assert any(k.startswith("buffer::") for k in load_file(str(old / "ema.safetensors"))) == (name != "dmd2.recipes.tiny")
    with pytest.raises(ValueError, match="names no recipe"):
        load_generator(old)
    a, b = load_generator(old, recipe=recipe), load_generator(last)
    assert a.weights == "ema"
    sa, sb = a.denoiser.state_dict(), b.denoiser.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert load_generator(old, recipe=name).weights == "ema"  # a module name is a recipe too


def test_ema_reads_old_files_into_the_plain_layout():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    ema = EMA(net, 0.5)
    net[1].running_mean.fill_(2.0)
    ema.update(net)
    plain = ema.state_dict()
    assert set(plain) == set(net.state_dict())
    old = {**ema.shadow, **{f"buffer::{k}": v for k, v in ema.buffers.items()}}
    assert EMA.module_state_dict(old).keys() == plain.keys()
    again = EMA(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)), 0.5)
    again.load_state_dict(old)
    assert all(torch.equal(again.state_dict()[k], plain[k]) for k in plain)
    with pytest.raises(ValueError, match="names differ"):
        again.load_state_dict({k: v for k, v in plain.items() if k != "1.running_mean"})


def test_resolve_checkpoint(tmp_path):
    out = run_inprocess(tmp_path / "run", "train.max_steps=8")
    assert resolve_checkpoint(out) == ckpt.checkpoint_path(out, 8)
    assert resolve_checkpoint(ckpt.checkpoint_path(out, 4)) == ckpt.checkpoint_path(out, 4)
    # a write in progress is never chosen from a run folder
    tmp = ckpt.checkpoint_path(out, 12).with_name("checkpoint-00000012.tmp")
    shutil.copytree(ckpt.checkpoint_path(out, 8), tmp)
    assert resolve_checkpoint(out) == ckpt.checkpoint_path(out, 8)
    for bad in (out / "checkpoints", tmp_path):
        with pytest.raises(ValueError, match="neither a complete checkpoint folder"):
            resolve_checkpoint(bad)


def test_tiny_sample_takes_a_run_or_a_checkpoint_folder(runs, tmp_path):
    recipe, run = runs["dmd2.recipes.tiny"]
    for src, png in ((run, tmp_path / "a.png"), (ckpt.latest_checkpoint(run), tmp_path / "b.png")):
        assert main(recipe, ["sample", str(src), str(png)]) == 0
    assert png.read_bytes() == (tmp_path / "a.png").read_bytes()


def _recording_recipe(calls, sigterm_at=None):
    from dmd2.recipes import tiny

    def build(cfg, info=None):
        c = tiny.build(cfg, info)
        latents, seen = c.latents, []

        def stopping_latents(batch, g, device):  # the first draw of iteration `sigterm_at` raises SIGTERM
            seen.append(1)
            if sigterm_at is not None and len(seen) == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return latents(batch, g, device)

        return replace(c, latents=stopping_latents)

    return replace(tiny.RECIPE, build=build, module="", after_train=lambda cfg, result: calls.append(result))


def test_after_train_runs_only_when_the_run_completed(tmp_path):
    calls = []
    _run(_recording_recipe(calls), tmp_path / "done", "train.max_steps=4", "train.checkpoint_every=2")
    assert len(calls) == 1 and calls[0].completed and calls[0].step == 4
    assert calls[0].checkpoint == ckpt.checkpoint_path(tmp_path / "done", 4)
    calls.clear()
    _run(_recording_recipe(calls, sigterm_at=3), tmp_path / "stopped", "train.max_steps=20", rc=128 + signal.SIGTERM)
    stopped = ckpt.latest_checkpoint(tmp_path / "stopped")
    assert stopped is not None and stopped.name < "checkpoint-00000020"  # SIGTERM: a checkpoint, then an early return
    assert calls == []
