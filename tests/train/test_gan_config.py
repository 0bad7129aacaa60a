"""The one ``gan`` config section and the one rule for whether a run has a GAN head, in every recipe."""
import pytest

from dmd2.train import apply_overrides, main, resolve_config
from dmd2.train.config import GANConfig, config_from_dict, gan_enabled, gan_head

OFF = ["objective.gan_generator_weight=0", "objective.gan_discriminator_weight=0"]


def _recipe(name):
    import importlib

    return importlib.import_module(f"dmd2.recipes.{name}")


@pytest.mark.parametrize("name", ["mnist", "tiny", "imagenet64", "sdxl"])
def test_every_recipe_has_the_same_gan_section(name):
    cfg = _recipe(name).RECIPE.config
    assert isinstance(cfg.gan, GANConfig)
    for legacy in ("model.gan_hidden", "model.gan_depth", "model.gan"):
        with pytest.raises(ValueError, match="unknown config key"):
            apply_overrides(cfg, [f"{legacy}=1"])


def test_the_rule_is_a_positive_gan_weight():
    cfg = _recipe("tiny").RECIPE.config
    assert not gan_enabled(cfg) and gan_head(cfg, [8]) is None
    for key in ("objective.gan_generator_weight", "objective.gan_discriminator_weight"):
        on = apply_overrides(cfg, {key: 1e-3})
        assert gan_enabled(on)
        head = gan_head(on, [8])
        assert head.in_channels == [8] and not head.final_conv
    with pytest.raises(ValueError, match="gan.depth >= 1"):
        GANConfig(depth=0)
    assert GANConfig(depth=0, final_conv=True).depth == 0


@pytest.mark.parametrize("name, preset", [("mnist", "tiny"), ("tiny", "tiny"), ("imagenet64", "tiny")])
def test_without_gan_weights_no_head_is_built_and_no_real_data_read(name, preset, tmp_path):
    mod = _recipe(name)
    on = mod.build(resolve_config(mod.RECIPE, preset, out=str(tmp_path)))
    assert on.gan_head is not None and on.real_data is not None and on.gan_layers
    off = mod.build(resolve_config(mod.RECIPE, preset, OFF, out=str(tmp_path)))
    assert off.gan_head is None and off.real_data is None and list(off.gan_layers) == []


def test_mnist_without_gan_trains_and_saves_no_head(tmp_path):
    """MNIST's "w/o GAN" ablation: no gan_head in the checkpoint (the head was never built)."""
    from dmd2.recipes import mnist

    assert main(mnist.RECIPE, ["--preset", "tiny", "--out", str(tmp_path), "train.progress=false", *OFF]) == 0
    ck = sorted((tmp_path / "checkpoints").iterdir())[-1]
    names = sorted(p.name for p in ck.iterdir())
    assert "gan_head.safetensors" not in names and "generator.safetensors" in names


def test_configs_written_before_the_gan_section_still_load():
    sdxl, tiny = _recipe("sdxl"), _recipe("tiny")
    old = {"model": {"gan_hidden": 256, "gan_depth": 2, "lora_alpha": 64.0}}
    cfg = config_from_dict(sdxl.SDXLConfig(), old)
    assert (cfg.gan.hidden, cfg.gan.depth, cfg.gan.final_conv, cfg.model.lora_alpha) == (256, 2, False, 64.0)
    cfg = config_from_dict(tiny.TinyConfig(), {"model": {"gan": True, "gan_hidden": 16, "hidden": 16}})
    assert cfg.gan.hidden == 16 and cfg.model.hidden == 16
    with pytest.raises(ValueError, match="unknown config key 'model.nope'"):
        config_from_dict(tiny.TinyConfig(), {"model": {"nope": 1}})


def test_mnist_gan_layers_picks_the_tapped_features(tmp_path):
    """``gan.layers``: one head branch per named fake-score module (channels from that module); empty = the
    recipe's bottleneck; a name that is not a module, a repeat, or any name in a fixed-tap recipe: one-line error."""
    mod = _recipe("mnist")
    default = mod.build(resolve_config(mod.RECIPE, "tiny", out=str(tmp_path)))
    assert list(default.gan_layers) == ["model.enc.8x8_block0"] and default.gan_head.in_channels == [32]
    two = ["model.enc.8x8_block0", "model.enc.16x16_block0"]
    c = mod.build(resolve_config(mod.RECIPE, "tiny", [f"gan.layers={','.join(two)}"], out=str(tmp_path)))
    assert list(c.gan_layers) == two
    assert c.gan_head.in_channels == [c.fake_score.get_submodule(n).out_channels for n in two]
    assert len(c.gan_head.branches) == 2
    for bad, msg in (("model.enc.nope", "not a submodule of the fake score"),
                     ("model.enc.8x8_block0,model.enc.8x8_block0", "each layer once")):
        with pytest.raises(ValueError, match=msg):
            mod.build(resolve_config(mod.RECIPE, "tiny", [f"gan.layers={bad}"], out=str(tmp_path)))
    tiny = _recipe("tiny")
    with pytest.raises(ValueError, match="reads \\['mid'\\] only"):
        tiny.build(resolve_config(tiny.RECIPE, "tiny", ["gan.layers=mid", "objective.gan_generator_weight=1e-3"],
                                  out=str(tmp_path)))


def test_mnist_two_tapped_layers_train(tmp_path):
    from dmd2.recipes import mnist

    assert main(mnist.RECIPE, ["--preset", "tiny", "--out", str(tmp_path), "train.progress=false",
                               "gan.layers=model.enc.8x8_block0,model.enc.16x16_block0"]) == 0
