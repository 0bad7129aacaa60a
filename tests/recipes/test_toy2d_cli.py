"""toy2d on the shared command line: presets (incl. tiny), --out, --steps and overrides reach its own loop; shared
keys the loop does not read are refused rather than ignored."""
import json

import pytest
from safetensors.torch import load_file

from dmd2.recipes import toy2d
from dmd2.train import main, resolve_config


def test_resolved_config_is_the_loops_config():
    cfg = resolve_config(toy2d.RECIPE, "four-step", ["train.max_steps=300", "toy.hidden=16", "mixture.modes=4",
                                                     "critic.ratio=3", "train.ema_decay=none"])
    tc = toy2d.toy_config(cfg)
    assert (tc.steps, tc.iters, tc.hidden, tc.ratio, tc.init, tc.fake_step_conditioning, tc.ema_decay) == \
        (4, 300, 16, 3, "teacher", True, 0.0)
    assert cfg.mixture == toy2d.Mixture(modes=4)
    # the defaults are ToyConfig's (what the tests of test_toy2d.py train)
    assert toy2d.toy_config(resolve_config(toy2d.RECIPE)) == toy2d.ToyConfig()


@pytest.mark.parametrize("override", ["train.grad_clip=1", "objective.gan_generator_weight=0.1", "train.resume=auto",
                                      "sampler.timesteps=80", "train.device=cuda"])
def test_unread_shared_keys_are_refused(override, capsys):
    assert main(toy2d.RECIPE, ["--preset", "tiny", "--out", "never", override]) == 2
    key = override.split("=")[0]
    assert f"error: toy2d's own loop does not read {key}" in capsys.readouterr().err


def test_tiny_preset_trains_into_out(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(toy2d.RECIPE, ["--preset", "tiny", "--out", str(out), "--steps", "2", "toy.hidden=8"]) == 0
    res = json.loads((out / "toy2d.json").read_text())
    assert res["config"]["iters"] == 50 and res["config"]["steps"] == 2 and res["config"]["hidden"] == 8
    assert sum(res["k_histogram"]) == 10 and len(res["coverage"]) == 8  # 50 iterations / ratio 5 generator updates
    assert json.loads((out / "config.json").read_text())["toy"]["hidden"] == 8
    sd = load_file(str(out / "generator.safetensors"))
    assert sd["model.inp.weight"].shape[0] == 8
    # the weights are the ones evaluated: re-evaluating them gives the recorded numbers
    cfg = resolve_config(toy2d.RECIPE, "tiny", ["toy.hidden=8"], steps=2)
    _, gen, _, _, sampler = toy2d.build(toy2d.toy_config(cfg), cfg.mixture)
    gen.load_state_dict(sd)
    ev = toy2d.evaluate(gen, sampler, cfg.mixture)
    assert ev["sliced_w2"] == pytest.approx(res["sliced_w2"]) and ev["coverage"] == pytest.approx(res["coverage"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-3] == f"toy2d: done. Run folder {out} (config.json, toy2d.json, toy2d.png, generator.safetensors)"
    assert (out / "toy2d.png").read_bytes()[:4] == b"\x89PNG"
