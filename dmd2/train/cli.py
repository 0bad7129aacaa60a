"""The command line every recipe shares (DESIGN "Command line and run folder")::

    python -m dmd2.recipes.NAME [COMMAND] [--preset P] [--out DIR] [--resume auto|PATH] [--dry-run] [--steps N] [key.sub=value ...]

COMMAND defaults to ``train``; a recipe registers more in :attr:`Recipe.commands`. The config is resolved as:
the recipe's defaults, then the preset's overrides, then ``--out`` (``train.out``), ``--resume`` (``train.resume``),
``--steps`` (``sampler.steps``), then the ``key.sub=value`` overrides in order. ``--dry-run`` prints the resolved
config as JSON and writes nothing. Bad input (unknown key, preset or command) prints ``error: ...`` and returns 2.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .config import RecipeConfig, apply_overrides, config_to_json

__all__ = ["Recipe", "TrainResult", "main", "resolve_config", "run_training"]


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
        presets: name -> overrides (a ``{"a.b": value}`` dict or a list of ``"a.b=value"`` strings); every recipe
            has ``tiny``.
        commands: extra sub-commands, name -> ``fn(cfg, args) -> exit code`` (``args``: the positional arguments).
        generator: ``generator(cfg, state_dict) -> Student`` (:class:`~dmd2.train.loading.Student`): the run's
            generator network with ``state_dict`` (its plain weights) loaded, wrapped with the run's sampler; what
            :func:`~dmd2.train.loading.load_generator` calls.
        after_train: ``after_train(cfg, result: TrainResult)``, run on rank 0 after ``train`` returns, only when
            the run completed (``result.completed``: not stopped by SIGTERM; SIGINT raises and skips it).
        module: the recipe's module name, recorded in the run's ``config.json`` (default: where ``build`` lives).
    """

    name: str
    config: RecipeConfig
    build: Callable
    presets: Mapping[str, Any] = field(default_factory=dict)
    commands: Mapping[str, Callable[[RecipeConfig, list[str]], int]] = field(default_factory=dict)
    generator: Callable | None = None
    after_train: Callable[[RecipeConfig, TrainResult], None] | None = None
    module: str = ""

    def __post_init__(self):
        if not self.module:
            self.module = _module_name(self.build)


def _module_name(fn: Callable) -> str:
    """The importable module of ``fn`` (``python -m pkg.mod`` runs it as ``__main__``: then ``pkg.mod``)."""
    name = getattr(fn, "__module__", "") or ""
    if name == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        name = spec.name if spec is not None else ""
    return name


def _parser(recipe: Recipe) -> argparse.ArgumentParser:
    cmds = ", ".join(["train", *recipe.commands])
    p = argparse.ArgumentParser(prog=f"python -m dmd2.recipes.{recipe.name}",
                                description=f"DMD2 recipe '{recipe.name}'. Commands: {cmds} (default train).",
                                epilog="Any other argument of the form key.sub=value overrides the config.")
    p.add_argument("--preset", default=None, help=f"one of: {', '.join(recipe.presets) or '(none)'}")
    p.add_argument("--out", default=None, help="run folder (train.out)")
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in OUT) or a checkpoint folder")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit, writing nothing")
    p.add_argument("--steps", type=int, default=None, help="student sampling steps (sampler.steps)")
    return p


def resolve_config(recipe: Recipe, preset: str | None = None, overrides: Sequence[str] = (), out: str | None = None,
                   resume: str | None = None, steps: int | None = None) -> RecipeConfig:
    """The config a command line describes (see the module docstring for the order)."""
    cfg = recipe.config
    if preset is not None:
        if preset not in recipe.presets:
            raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(recipe.presets) or '(none)'}")
        cfg = apply_overrides(cfg, recipe.presets[preset])
    flags = []
    if out is not None:
        flags.append(("train.out", out))
    if resume is not None:
        flags.append(("train.resume", resume))
    if steps is not None:
        flags.append(("sampler.steps", steps))
    cfg = apply_overrides(cfg, dict(flags))
    cfg = apply_overrides(cfg, list(overrides))
    if not cfg.train.out:
        cfg = apply_overrides(cfg, {"train.out": f"runs/{recipe.name}" + (f"-{preset}" if preset else "")})
    return cfg


def run_training(recipe: Recipe, cfg: RecipeConfig) -> int:
    """``train``: join the torchrun job if any, build the components, train (resuming per ``train.resume``), then
    :attr:`Recipe.after_train` on rank 0 when the run completed."""
    import torch.distributed as dist

    from .checkpoint import resolve_resume
    from .distributed import init_distributed
    from .trainer import Trainer

    info = init_distributed(cfg.train.distributed, cfg.train.device)
    try:
        torch.manual_seed(cfg.train.seed)
        components = recipe.build(cfg, info)
        trainer = Trainer(cfg, components, info, cfg.train.out, recipe=recipe.module)
        resume = resolve_resume(cfg.train.out, cfg.train.resume)
        last = trainer.train(resume)
        result = TrainResult(last, trainer.step, trainer.step >= cfg.train.max_steps)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if recipe.after_train is not None and info.is_main and result.completed:
        recipe.after_train(cfg, result)
    return 0


def main(recipe: Recipe, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "train"
    if argv and not argv[0].startswith("-") and "=" not in argv[0]:
        command = argv.pop(0)
    parser = _parser(recipe)
    args, rest = parser.parse_known_args(argv)
    unknown_flags = [r for r in rest if r.startswith("-")]
    try:
        if unknown_flags:
            raise ValueError(f"unknown option(s) {unknown_flags}; see --help")
        if command != "train" and command not in recipe.commands:
            raise ValueError(f"unknown command {command!r}; valid commands: {', '.join(['train', *recipe.commands])}")
        overrides = [r for r in rest if "=" in r]
        positional = [r for r in rest if "=" not in r]
        if command == "train" and positional:
            raise ValueError(f"train takes no positional arguments, got {positional} (overrides look like key.sub=value)")
        cfg = resolve_config(recipe, args.preset, overrides, args.out, args.resume, args.steps)
        if args.dry_run:
            print(config_to_json(cfg))
            return 0
        if command == "train":
            return run_training(recipe, cfg)
        return int(recipe.commands[command](cfg, positional) or 0)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
