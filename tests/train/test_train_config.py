"""Config grammar and CLI: typed overrides, unknown keys refused with the valid list, presets, --dry-run."""
import dataclasses
import json

import pytest
import torch

from dmd2.recipes.tiny import PRESETS, RECIPE, TinyConfig
from dmd2.train import RecipeConfig, apply_overrides, config_from_dict, config_to_dict, main, resolve_config, valid_keys


def test_typed_overrides():
    cfg = apply_overrides(RecipeConfig(), [
        "train.max_steps=12", "train.lr_generator=2e-6", "train.grad_checkpointing=true", "train.betas=(0.5, 0.9)",
        "train.ema_decay=none", "sampler.steps=2", "sampler.timesteps=999,499", "objective.impl=torch",
    ])
    assert cfg.train.max_steps == 12 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.lr_generator == 2e-6
    assert cfg.train.grad_checkpointing is True
    assert cfg.train.betas == (0.5, 0.9)
    assert cfg.train.ema_decay is None
    assert cfg.sampler.timesteps == (999.0, 499.0)
    assert cfg.objective.impl == "torch"
    # the input is untouched (frozen dataclasses, copies)
    assert RecipeConfig().train.max_steps == 1000
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.max_steps = 3


@pytest.mark.parametrize("override, fragment", [
    ("train.max_steps=ten", "cannot parse 'ten' as int"),
    ("train.max_steps=1.5", "cannot parse"),
    ("train.grad_checkpointing=maybe", "as bool"),
    ("train.betas=0.9", "cannot parse"),
    ("train.max_steps=none", "cannot parse 'none' as int"),
    ("train.mixed_precision=fp16", "must be one of ('no', 'bf16')"),
    ("critic.ratio=0", "critic.ratio must be >= 1"),
])
def test_bad_values_raise(override, fragment):
    with pytest.raises(ValueError) as e:
        apply_overrides(RecipeConfig(), [override])
    assert fragment in str(e.value)


def test_sampler_grid_checked_after_all_overrides():
    cfg = apply_overrides(RecipeConfig(), ["sampler.timesteps=999,499", "sampler.steps=2"])
    assert cfg.sampler.grid(lambda n: [0] * n) == [999.0, 499.0]
    assert apply_overrides(RecipeConfig(), ["sampler.steps=3"]).sampler.grid(lambda n: list(range(n, 0, -1))) == [3, 2, 1]
    with pytest.raises(ValueError, match="sampler.timesteps has 2 entries but sampler.steps is 4"):
        apply_overrides(cfg, ["sampler.steps=4"]).sampler.grid(lambda n: [])


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError) as e:
        apply_overrides(TinyConfig(), ["train.max_stpes=3"])
    msg = str(e.value)
    assert "train.max_stpes" in msg
    for key in valid_keys(TinyConfig()):
        assert key in msg
    assert "model.hidden" in msg and "critic.ratio" in msg and "objective.gan_generator_weight" in msg
    with pytest.raises(ValueError, match="is a section"):
        apply_overrides(TinyConfig(), ["train=3"])
    with pytest.raises(ValueError, match="unknown config key 'nosuch.key'"):
        apply_overrides(TinyConfig(), {"nosuch.key": 1})


def test_dict_roundtrip_and_preset_order():
    cfg = resolve_config(RECIPE, "tiny", ["sampler.steps=3", "train.max_steps=7"], out="/x", resume="auto", steps=4)
    assert cfg.sampler.steps == 3  # key=value overrides come after --steps
    assert cfg.train.max_steps == 7 and cfg.train.out == "/x" and cfg.train.resume == "auto"
    assert cfg.train.batch_size == PRESETS["tiny"]["train.batch_size"]
    assert resolve_config(RECIPE, "tiny", steps=4).sampler.steps == 4
    assert resolve_config(RECIPE, None).train.out == "runs/tiny"
    back = config_from_dict(TinyConfig, json.loads(json.dumps(config_to_dict(cfg))))
    assert back == cfg
    with pytest.raises(ValueError, match="unknown preset 'huge'; valid presets: tiny"):
        resolve_config(RECIPE, "huge")


def test_cli_dry_run_prints_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    rc = main(RECIPE, ["--preset", "tiny", "--out", str(out), "--dry-run", "--steps", "3", "critic.ratio=4", "model.hidden=8"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["critic"]["ratio"] == 4 and printed["model"]["hidden"] == 8 and printed["sampler"]["steps"] == 3
    assert printed["train"]["out"] == str(out)
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_bad_input(tmp_path, capsys):
    assert main(RECIPE, ["--out", str(tmp_path / "r"), "train.nope=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.nope'" in err and "train.max_steps" in err and "data.classes" in err
    assert main(RECIPE, ["fly", "--dry-run"]) == 2
    assert "unknown command 'fly'; valid commands: train, sample" in capsys.readouterr().err
    assert main(RECIPE, ["--preset", "tiny", "--bogus", "--dry-run"]) == 2
    assert "unknown option" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_train_applies_overrides_and_saves_config(tmp_path):
    import train_helpers as helpers

    out = helpers.run_inprocess(tmp_path / "run", "train.max_steps=2", "model.hidden=8", "train.log_every=1", "--steps", "1")
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["hidden"] == 8 and saved["train"]["max_steps"] == 2 and saved["sampler"]["steps"] == 1
    ck = json.loads((out / "checkpoints" / "checkpoint-00000002" / "config.json").read_text())
    assert ck == saved
    w, _ = helpers.weights(out, 2)
    assert w["generator"]["inp.weight"].shape[0] == 8
    assert [r["step"] for r in helpers.log_records(out)] == [1, 2]
    assert (out / "tb").is_dir() and any((out / "tb").iterdir())
    # the recipe's own sub-command reads the checkpoint
    png = tmp_path / "grid.png"
    assert main(RECIPE, ["sample", str(out / "checkpoints" / "checkpoint-00000002"), str(png), "model.hidden=8"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_indexed_batches_shards_are_disjoint_and_cover_each_epoch():
    from dmd2.train import IndexedBatches

    data = [(torch.full((1, 2, 2), float(i)), i % 3) for i in range(50)]
    src = IndexedBatches(data, shards=4, batch=3, seed=7)
    assert src.steps_per_epoch == 4  # 50 // 12
    epoch = torch.cat([src.indices(s, r) for s in range(4) for r in range(4)])
    assert len(set(epoch.tolist())) == 48  # every index at most once per epoch (2 dropped)
    assert not torch.equal(src.indices(0, 0), src.indices(4, 0))  # a new permutation next epoch
    assert torch.equal(src.indices(5, 2), IndexedBatches(data, 4, 3, seed=7).indices(5, 2))  # stateless
    imgs, cond = src(1, 2, 3, torch.device("cpu"))
    assert imgs.shape == (3, 1, 2, 2) and torch.equal(imgs[:, 0, 0, 0].long(), src.indices(1, 2))
    assert torch.equal(cond, src.indices(1, 2) % 3)
    with pytest.raises(ValueError, match="shard must lie in"):
        src.indices(0, 4)
