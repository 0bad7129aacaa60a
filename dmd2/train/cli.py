"""The command line every recipe shares (docs/training.md, "Command line")::

    python -m dmd2.recipes.NAME [COMMAND] [--preset P] [--config FILE] [--out DIR] [--resume auto|PATH] [--dry-run]
                                [--steps N] [key.sub=value ...]

COMMAND defaults to ``train``; a recipe registers more in :attr:`Recipe.commands`. The config is resolved as:
the recipe's defaults, then the preset's overrides, then the ``--config`` file (a saved ``OUT/config.json`` or a
JSON / YAML file of overrides), then ``--out`` (``train.out``), ``--resume`` (``train.resume``), ``--steps``
(``sampler.steps``), then the recipe's own flags (:attr:`Recipe.flags`, e.g. ``--num``), then the ``key.sub=value``
overrides in order; ``train.origin`` records that chain. ``--dry-run`` prints the resolved config as JSON and writes nothing. ``--help`` lists the commands, presets and every
config key (type, default, description; generated from the config dataclasses), ``--help-config SECTION`` one
section. Bad input (unknown key, preset, section or command, a missing or unreadable file, a checkpoint that does not
verify or fit, a config changed at resume without ``--allow-config-change``, a run folder in use, a full disk) prints
one line ``error: ...`` and returns 2; a run stopped by SIGTERM / SIGINT returns ``128 + signal`` after its checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .config import (RecipeConfig, _plain, _value_text, apply_overrides, config_help, config_to_json,
                     read_config_file)

__all__ = ["Recipe", "main", "resolve_config", "run_training", "run_summary", "help_text", "check_resume_config",
           "config_diff", "RESUME_FREE_KEYS"]
__all__ = ["Recipe", "TrainResult", "main", "resolve_config", "run_training", "run_summary", "help_text"]


@dataclass(frozen=True)
class TrainResult:
    """What ``train`` did: ``checkpoint`` (the last one written, on rank 0), ``step`` (iterations done) and
    ``completed`` (``train.max_steps`` reached; False when a signal stopped the run early)."""

    checkpoint: Path | None
    step: int
    completed: bool


@dataclass
class Recipe:
    """A recipe: its name, default config, presets and builder (no loop of its own).

    Attributes:
        name: used for the default run folder ``runs/NAME[-PRESET]``.
        config: the default :class:`RecipeConfig` (or subclass) instance.
        build: ``build(cfg, info) -> Components`` (:class:`~dmd2.train.trainer.Components`); called after
            ``torch.manual_seed(cfg.train.seed)`` on every rank, so random initialisations agree across ranks.
            ``None`` for a recipe with its own loop: it registers ``train`` in ``commands`` (toy2d).
        presets: name -> overrides (a ``{"a.b": value}`` dict or a list of ``"a.b=value"`` strings); every recipe
            has ``tiny``.
        commands: extra sub-commands, name -> ``fn(cfg, args) -> exit code`` (``args``: the positional arguments).
        flags: extra options that set one config key each, e.g. ``{"--num": "ode.num"}`` (applied like ``--steps``).
        command_flags: switches a sub-command takes, passed to it among its ``args``, e.g. ``{"memory": ("--json",)}``
            (any other ``--option`` is refused before the command runs).
        next_steps: ``next_steps(cfg, checkpoint) -> [command line, ...]``: what to run on a finished run (sample,
            export, evaluate), printed in the summary after ``train``.
        generator: ``generator(cfg, state_dict) -> Student`` (:class:`~dmd2.train.loading.Student`): the run's
            generator network with ``state_dict`` (its plain weights) loaded, wrapped with the run's sampler; what
            :func:`~dmd2.train.loading.load_generator` calls.
        after_train: ``after_train(cfg, result: TrainResult)``, run on rank 0 after ``train`` returns, only when
            the run completed (``result.completed``: not stopped by SIGTERM or SIGINT).
        module: the recipe's module name, recorded in the run's ``config.json`` (default: where ``build`` lives).
    """

    name: str
    config: RecipeConfig
    build: Callable | None
    presets: Mapping[str, Any] = field(default_factory=dict)
    commands: Mapping[str, Callable[[RecipeConfig, list[str]], int]] = field(default_factory=dict)
    flags: Mapping[str, str] = field(default_factory=dict)
    command_flags: Mapping[str, Sequence[str]] = field(default_factory=dict)
    next_steps: Callable[[RecipeConfig, Path], Sequence[str]] | None = None
    generator: Callable | None = None
    after_train: Callable[[RecipeConfig, TrainResult], None] | None = None
    module: str = ""

    def __post_init__(self):
        if not self.module and self.build is not None:
            self.module = _module_name(self.build)


def _module_name(fn: Callable) -> str:
    """The importable module of ``fn`` (``python -m pkg.mod`` runs it as ``__main__``: then ``pkg.mod``)."""
    name = getattr(fn, "__module__", "") or ""
    if name == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        name = spec.name if spec is not None else ""
    return name


def _parser(recipe: Recipe) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m dmd2.recipes.{recipe.name}", add_help=False,
                                formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=26, width=118))
    p.add_argument("-h", "--help", action="store_true", help="show this help (commands, presets, every config key)")
    p.add_argument("--help-config", metavar="SECTION", default=None,
                   help="list only the config keys of SECTION (with the values --preset / --config / overrides give)")
    p.add_argument("--preset", default=None, help=f"one of: {', '.join(recipe.presets) or '(none)'}")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="a saved OUT/config.json, or a JSON / YAML file of overrides ({\"train\": {\"max_steps\": 10}} "
                        "or {\"train.max_steps\": 10}); applied after --preset, before the other options")
    p.add_argument("--out", default=None, help="run folder (train.out)")
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in OUT) or a checkpoint folder")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit, writing nothing")
    p.add_argument("--steps", type=int, default=None, help="student sampling steps (sampler.steps)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume although the config differs from the checkpoint's (the differences are printed)")
    for flag, key in recipe.flags.items():
        p.add_argument(flag, dest="flag:" + key, metavar=key.rsplit(".", 1)[-1].upper(), default=None, help=f"sets {key}")
    return p


def _first_line(doc: str | None) -> str:
    return _plain((doc or "").strip().split("\n\n")[0])


def help_text(recipe: Recipe, cfg: RecipeConfig | None = None) -> str:
    """``--help``: usage, the recipe's summary, commands (one line each), presets, options and every config key of
    ``cfg`` (default: the recipe's defaults) by section (:func:`~dmd2.train.config.config_help`)."""
    parser = _parser(recipe)
    fn = recipe.build or next(iter(recipe.commands.values()), None)
    module = sys.modules.get(getattr(fn, "__module__", ""), None)
    wrap = lambda text, indent: textwrap.fill(text, 118, initial_indent=indent,  # noqa: E731
                                              subsequent_indent=indent + " " * 16)
    lines = [parser.format_usage().rstrip() + " [COMMAND ARGS ...] [key.sub=value ...]", ""]
    if module is not None and module.__doc__:
        lines += [textwrap.fill(_first_line(module.__doc__), 118), ""]
    lines.append("commands:")
    cmds = {"train": "(default) train with the shared loop into OUT (train.out); resumes with --resume auto"}
    cmds.update({name: _first_line(f.__doc__) for name, f in recipe.commands.items()})
    lines += [wrap(f"{name:<15} {text}", "  ") for name, text in cmds.items()]
    lines += ["", "presets (overrides applied over the defaults):"]
    for name, ov in recipe.presets.items():
        items = ov.items() if isinstance(ov, Mapping) else [o.split("=", 1) for o in ov]
        text = " ".join(f"{k}={_value_text(v)}" for k, v in items) or "(the defaults)"
        lines.append(wrap(f"{name:<15} {text}", "  "))
    opts = parser.format_help().split("\n\n", 1)[-1].strip()
    lines += ["", opts, "", "config keys (override as key.sub=value; type = default, description):",
              config_help(cfg if cfg is not None else recipe.config)]
    return "\n".join(lines)


def resolve_config(recipe: Recipe, preset: str | None = None, overrides: Sequence[str] = (), out: str | None = None,
                   resume: str | None = None, steps: int | None = None, config: str | None = None) -> RecipeConfig:
    """The config a command line describes (see the module docstring for the order); ``config``: a config file."""
    cfg = recipe.config
    origin = [f"recipe {recipe.name}"]
    if preset is not None:
        if preset not in recipe.presets:
            raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(recipe.presets) or '(none)'}")
        cfg = apply_overrides(cfg, recipe.presets[preset])
        origin.append(f"preset {preset}")
    if config is not None:
        cfg = apply_overrides(cfg, read_config_file(config))
        origin.append(f"config {config}")
    flags = []
    if out is not None:
        flags.append(("train.out", out))
    if resume is not None:
        flags.append(("train.resume", resume))
    if steps is not None:
        flags.append(("sampler.steps", steps))
    cfg = apply_overrides(cfg, dict(flags))
    cfg = apply_overrides(cfg, list(overrides))
    given = [f"{k}={v}" for k, v in flags] + list(overrides)
    if given:
        origin.append("overrides " + " ".join(given))
    if not cfg.train.out:
        cfg = apply_overrides(cfg, {"train.out": f"runs/{recipe.name}" + (f"-{preset}" if preset else "")})
    return apply_overrides(cfg, {"train.origin": ", ".join(origin)})


#: keys a resume may change without ``--allow-config-change``: how long the run goes, where it writes, how often it
#: reports, how it is launched (a checkpoint resumes on any number of ranks); every other key changes the run itself
RESUME_FREE_KEYS = ("train.max_steps", "train.out", "train.resume", "train.progress", "train.checkpoint_every",
                    "train.keep_last", "train.log_every", "train.sample_every", "train.device", "train.distributed",
                    "train.grad_checkpointing", "train.loggers", "train.checkpoint_format", "train.origin", "eval.",
                    "recipe")  # config.json's recipe module name (not a config key)


_ABSENT = object()


def config_diff(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """``["key: old -> new", ...]`` between two nested config dicts (keys in either), skipping
    :data:`RESUME_FREE_KEYS` (an entry ending in ``.`` is a whole section)."""
    out = []
    for k in [*old, *(k for k in new if k not in old)]:
        key = prefix + str(k)
        if key in RESUME_FREE_KEYS or any(f.endswith(".") and key.startswith(f) for f in RESUME_FREE_KEYS):
            continue
        a, b = old.get(k, _ABSENT), new.get(k, _ABSENT)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_diff(a, b, key + ".")
        elif (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            show = [("(absent)" if v is _ABSENT else json.dumps(list(v) if isinstance(v, tuple) else v)) for v in (a, b)]
            out.append(f"{key}: {show[0]} -> {show[1]}")
    return out


def check_resume_config(cfg: RecipeConfig, checkpoint: Path, world_size: int = 1, allow_change: bool = False,
                        recipe: str = "") -> list[str]:
    """Compare the run's config (and ``recipe``, the module that records itself in ``config.json``) with the one saved
    in ``checkpoint``: ``ValueError`` listing the changed keys unless ``allow_change`` (then the differences are
    returned, for the log). ``train.grad_accum`` may change with the number of ranks when the global batch
    (``grad_accum * world_size``) stays the same."""
    from .checkpoint import MANIFEST

    saved = checkpoint / "config.json"
    try:
        old = json.loads(saved.read_text())
        old_world = int(json.loads((checkpoint / MANIFEST).read_text()).get("world_size", 1))
    except (OSError, ValueError) as e:
        raise ValueError(f"{saved}: cannot read the checkpoint's config ({e})") from None
    new = json.loads(config_to_json(cfg, recipe))
    if old.get("train", {}).get("grad_accum", 1) * old_world == cfg.train.grad_accum * world_size:
        new = {**new, "train": {**new["train"], "grad_accum": old["train"]["grad_accum"]}}
    diff = config_diff(old, new)
    if diff and not allow_change:
        raise ValueError(f"resuming from {checkpoint} with a different config ({'; '.join(diff)}); resume with the "
                         f"same settings, or pass --allow-config-change to continue with the new ones")
    return diff


def choose_resume(out: Path, resume: str) -> Path | None:
    """The checkpoint ``train.resume`` names, verified with its checksums: ``""`` -> None; ``"auto"`` -> the newest
    one of ``out`` that verifies (None when there is none; ``ValueError`` when there are some and none verifies,
    each skipped one printed as a warning); a path -> that folder (``ValueError`` when it does not verify)."""
    from .checkpoint import latest_checkpoint, resolve_resume

    if resume != "auto":
        return resolve_resume(out, resume)
    skipped = []
    chosen = latest_checkpoint(out, report=lambda msg: skipped.append(msg) or print(f"warning: {msg}", file=sys.stderr,
                                                                                      flush=True))
    if chosen is None and skipped:
        raise ValueError(f"--resume auto: no checkpoint in {out / 'checkpoints'} verifies ({len(skipped)} skipped, "
                         "reasons above); pass --resume PATH, or move them away to start afresh")
    return chosen


def run_training(recipe: Recipe, cfg: RecipeConfig, allow_config_change: bool = False) -> int:
    """``train``: join the torchrun job if any, lock the run folder (rank 0), resolve and check ``train.resume``,
    build the components, train. Returns 0, or ``128 + signal`` when SIGTERM / SIGINT interrupted the run (a
    checkpoint was written; nothing that follows training, such as an evaluation, should run). Then
    :attr:`Recipe.after_train` on rank 0 when the run completed."""
    import torch.distributed as dist

    from .checkpoint import RunFolderLocked, hold_run_folder
    from .distributed import any_rank, broadcast_object, init_distributed
    from .trainer import Trainer

    info = init_distributed(cfg.train.distributed, cfg.train.device)
    out = Path(cfg.train.out)
    try:
        with contextlib.ExitStack() as stack:
            refused = None
            if info.is_main:
                try:
                    stack.enter_context(hold_run_folder(out))
                except RunFolderLocked as e:
                    refused = e
            if any_rank(refused is not None, info):
                raise refused or RunFolderLocked(f"run folder {out} is in use by another run (see rank 0)")
            # rank 0 chooses (and checksums) the checkpoint once; the others take its choice, or its refusal
            resume, refusal = None, None
            if info.is_main:
                try:
                    resume = choose_resume(out, cfg.train.resume)
                except ValueError as e:
                    refusal = e
            chosen, message = broadcast_object((None if resume is None else str(resume),
                                                None if refusal is None else str(refusal)), info)
            if refusal is not None:
                raise refusal
            if message is not None:
                raise ValueError(f"{message} (rank 0)")
            resume = None if chosen is None else Path(chosen)
            if resume is not None:
                diff = check_resume_config(cfg, resume, info.world_size, allow_config_change, recipe.module)
                if diff and info.is_main:
                    print(f"warning: config changed at resume (--allow-config-change): {'; '.join(diff)}", file=sys.stderr,
                          flush=True)
            torch.manual_seed(cfg.train.seed)
            components = recipe.build(cfg, info)
            trainer = Trainer(cfg, components, info, out, recipe=recipe.module)
            last = trainer.train(resume, checksums=False)  # choose_resume read them
            result = TrainResult(last, trainer.step, trainer.interrupted is None and trainer.step >= cfg.train.max_steps)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if recipe.after_train is not None and info.is_main and result.completed:
        recipe.after_train(cfg, result)
    if info.is_main:
        print(run_summary(recipe, cfg, last, trainer.step), flush=True)
    return 0 if trainer.interrupted is None else 128 + trainer.interrupted


def run_summary(recipe: Recipe, cfg: RecipeConfig, checkpoint: Path | None, step: int) -> str:
    """The closing lines of ``train``: the run folder, the last checkpoint and :attr:`Recipe.next_steps`."""
    out = Path(cfg.train.out)
    done = "done" if step >= cfg.train.max_steps else f"stopped at iteration {step} of {cfg.train.max_steps}"
    lines = [f"{recipe.name}: {done}. Run folder {out} (config.json, log.jsonl"
             + "".join(f", {d}/" for d in ("tb", "samples", "wandb") if (out / d).is_dir()) + ")",
             f"  checkpoint: {checkpoint}"]
    if checkpoint is not None:
        steps = list(recipe.next_steps(cfg, checkpoint)) if recipe.next_steps is not None else []
        steps.append(f"python -m dmd2.recipes.{recipe.name} --config {out / 'config.json'} --resume auto "
                     "train.max_steps=N   # train on")
        lines += ["  next:"] + [f"    {c}" for c in steps]
    return "\n".join(lines)


def main(recipe: Recipe, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "train"
    if argv and not argv[0].startswith("-") and "=" not in argv[0]:
        command = argv.pop(0)
    parser = _parser(recipe)
    args, rest = parser.parse_known_args(argv)
    switches = set(recipe.command_flags.get(command, ()))
    unknown_flags = [r for r in rest if r.startswith("-") and r not in switches]
    try:
        if unknown_flags:
            raise ValueError(f"unknown option(s) {unknown_flags}; see --help")
        if command != "train" and command not in recipe.commands:
            raise ValueError(f"unknown command {command!r}; valid commands: {', '.join(['train', *recipe.commands])}")
        overrides = [r for r in rest if "=" in r]
        positional = [r for r in rest if "=" not in r]  # with the command's own switches, in order
        if command == "train" and positional:
            raise ValueError(f"train takes no positional arguments, got {positional} (overrides look like key.sub=value)")
        flagged = [f"{key}={getattr(args, 'flag:' + key)}" for key in recipe.flags.values()
                   if getattr(args, "flag:" + key) is not None]
        cfg = resolve_config(recipe, args.preset, flagged + overrides, args.out, args.resume, args.steps, args.config)
        if args.help:
            print(help_text(recipe, cfg))
            return 0
        if args.help_config is not None:
            print(config_help(cfg, args.help_config))
            return 0
        if args.dry_run:
            print(config_to_json(cfg))
            return 0
        if command == "train" and "train" not in recipe.commands:
            return run_training(recipe, cfg, args.allow_config_change)
        return int(recipe.commands[command](cfg, positional) or 0)
    except (ValueError, OSError) as e:  # OSError: a missing file or folder, a full disk, no permission
        print(f"error: {e}", file=sys.stderr)
        return 2
