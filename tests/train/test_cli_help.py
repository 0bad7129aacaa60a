"""The self-describing command line: --help lists commands, presets and every config key (type, default in this
recipe, its docstring line) by section; --help-config SECTION; --config FILE with overrides on top, round trip."""
import dataclasses
import importlib
import json
import re

import pytest

from dmd2.train import main, resolve_config, valid_keys
from dmd2.train.config import _hints, _type_name, _value_text, config_to_json, field_docs

RECIPES = ["mnist", "imagenet64", "sdxl", "tiny", "toy2d"]


def _recipe(name):
    return importlib.import_module(f"dmd2.recipes.{name}").RECIPE


def _leaves(cfg):
    """(section, key, value, type, doc) of every config key, from the dataclasses themselves."""
    for f in dataclasses.fields(cfg):
        sub = getattr(cfg, f.name)
        docs, hints = field_docs(type(sub)), _hints(type(sub))
        for g in dataclasses.fields(sub):
            yield f.name, f"{f.name}.{g.name}", getattr(sub, g.name), hints[g.name], docs[g.name]


@pytest.mark.parametrize("name", RECIPES)
def test_help_lists_every_key_with_type_default_and_doc(name, capsys):
    recipe = _recipe(name)
    assert main(recipe, ["--help"]) == 0
    text = capsys.readouterr().out
    # every command with its one line, every preset
    for cmd in ["train", *recipe.commands]:
        assert re.search(rf"^  {re.escape(cmd)} +\S", text, re.M), cmd
    for preset in recipe.presets:
        assert re.search(rf"^  {re.escape(preset)} +\S", text, re.M), preset
    lines = text.splitlines()
    resolved = resolve_config(recipe)  # what --help shows: the defaults as the command line resolves them
    keys = [k for _, k, *_ in _leaves(resolved)]
    assert sorted(keys) == sorted(valid_keys(recipe.config))
    section_of_line = {}
    current = None
    for i, line in enumerate(lines):
        m = re.match(r"^\[(\w+)\]", line)
        if m:
            current = m.group(1)
        section_of_line[i] = current
    for section, key, value, tp, doc in _leaves(resolved):
        assert doc, f"{key} has no line in its dataclass's Attributes: block"
        row = [i for i, line in enumerate(lines) if line.split()[:1] == [key]]
        assert len(row) == 1, key
        line = lines[row[0]]
        # grouped: the key sits under its own section's header
        assert section_of_line[row[0]] == section, key
        assert f"{_type_name(tp)} = {_value_text(value)}" in line, (key, line)
        assert line.rstrip().endswith(doc), (key, doc)


def test_help_shows_the_defaults_a_preset_gives(capsys):
    recipe = _recipe("mnist")
    assert main(recipe, ["--help"]) == 0
    assert re.search(r"^  train.max_steps +int = 1200 ", capsys.readouterr().out, re.M)
    assert main(recipe, ["--preset", "tiny", "--help-config", "train"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^  train.max_steps +int = 4 +iterations to run in total", text, re.M)
    assert "[objective]" not in text and text.startswith("[train] The training loop")


def test_docstring_lines_are_the_attributes_entries():
    from dmd2.train.config import TrainConfig

    docs = field_docs(TrainConfig)
    assert docs["max_steps"] == "iterations to run in total (a checkpoint is always written here)."
    assert docs["lr_generator"] == docs["lr_critic"]  # "lr_generator, lr_critic: ..." documents both
    # continuation lines are joined, markup removed
    assert docs["resume"] == '"" (a fresh run), "auto" (the newest complete checkpoint in out) or a checkpoint folder (--resume).'


def test_help_config_unknown_section(capsys):
    assert main(_recipe("tiny"), ["--help-config", "nope"]) == 2
    assert "unknown config section 'nope'; valid sections: train, objective, critic, sampler, gan, model, data" in capsys.readouterr().err


def _without_origin(cfg):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, origin=""))


def test_config_round_trip_gives_the_same_resolved_config(tmp_path):
    recipe = _recipe("mnist")
    first = resolve_config(recipe, "tiny", ["critic.ratio=3", "train.betas=0.5,0.9", "sampler.timesteps=80,2"],
                           out=str(tmp_path / "a"), steps=2)
    saved = tmp_path / "config.json"
    saved.write_text(config_to_json(first))
    again = resolve_config(recipe, config=str(saved))
    assert _without_origin(again) == _without_origin(first)
    assert first.train.origin == (f"recipe mnist, preset tiny, overrides train.out={tmp_path / 'a'} sampler.steps=2 "
                                  "critic.ratio=3 train.betas=0.5,0.9 sampler.timesteps=80,2")
    assert again.train.origin == f"recipe mnist, config {saved}"
    # the saved config differs from the defaults (so the round trip is not trivially the default)
    assert _without_origin(resolve_config(recipe)) != _without_origin(first)


def test_config_file_of_overrides_then_command_line_on_top(tmp_path, capsys):
    recipe = _recipe("tiny")
    y = tmp_path / "over.yaml"
    y.write_text("train:\n  max_steps: 7\n  lr_generator: 1.0e-3\ncritic.ratio: 4\nmodel:\n  hidden: 12\n")
    assert main(recipe, ["--config", str(y), "--preset", "tiny", "--dry-run", "model.hidden=8", "--out", "x"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["max_steps"] == 7 and cfg["train"]["lr_generator"] == 1e-3 and cfg["critic"]["ratio"] == 4
    assert cfg["model"]["hidden"] == 8  # the command line wins over the file
    assert cfg["train"]["origin"] == f"recipe tiny, preset tiny, config {y}, overrides train.out=x model.hidden=8"
    j = tmp_path / "over.json"
    j.write_text(json.dumps({"train.max_steps": 9}))
    assert main(recipe, ["--config", str(j), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["max_steps"] == 9


@pytest.mark.parametrize("content,fragment", [
    (None, "no such file"), ("[1, 2]", "expected a mapping of config keys, got list"), ("{", "cannot parse"),
    ('{"train": {"nope": 1}}', "unknown config key 'train.nope'"),
])
def test_bad_config_files_are_refused(tmp_path, capsys, content, fragment):
    f = tmp_path / "c.json"
    if content is not None:
        f.write_text(content)
    assert main(_recipe("tiny"), ["--config", str(f), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and len(err.strip().splitlines()) == 1
