"""Run configuration: frozen dataclasses, one per component, under one :class:`RecipeConfig` root.

Keys are dotted paths ``section.field`` (``train.max_steps``, ``objective.gan_generator_weight``,
``critic.ratio``, ``sampler.steps``); recipes subclass :class:`RecipeConfig` to add their own sections
(``model``, ``data``, ``teacher``, ...). Overrides are strings ``"a.b=value"`` parsed by the field's declared type
(int, float, bool, str, tuple, ``X | None``) or already-typed dict entries; presets are dicts of overrides.

>>> cfg = apply_overrides(RecipeConfig(), ["train.max_steps=10", "train.betas=0.9,0.99", "critic.ratio=5"])
>>> cfg.train.max_steps, cfg.train.betas
(10, (0.9, 0.99))
"""
from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from torch import nn

from ..core.gan import GANHead
from ..core.objective import DMD2Config

__all__ = [
    "TrainConfig", "CriticConfig", "SamplerConfig", "GANConfig", "RecipeConfig", "DMD2Config", "gan_enabled", "gan_head",
    "apply_overrides", "valid_keys", "config_to_dict", "config_from_dict", "config_to_json", "parse_value",
    "field_docs", "config_help", "read_config_file", "flatten",
]

MIXED_PRECISION = ("no", "bf16")
DISTRIBUTED = ("none", "ddp", "fsdp2")
CHECKPOINT_FORMATS = ("auto", "sharded", "full")
LOGGERS = ("tensorboard", "wandb")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop (one iteration = one critic update + a generator update every ``critic.ratio``-th).

    Attributes:
        max_steps: iterations to run in total (a checkpoint is always written here).
        batch_size: samples per rank per micro-batch; the global batch is ``batch_size * world * grad_accum``.
        grad_accum: micro-batches accumulated per optimizer update.
        lr_generator, lr_critic: AdamW learning rates (critic = fake score + GAN head), constant after warmup.
        betas, weight_decay, adam_eps: AdamW hyperparameters (paper: (0.9, 0.999), 0.01).
        warmup_steps: linear warmup over this many iterations (lr factor ``min(1, (step + 1) / warmup_steps)``).
        grad_clip: max global grad norm per optimizer (paper: 10); 0 disables clipping (the norm is still logged).
        mixed_precision: ``"no"`` (fp32) or ``"bf16"`` (autocast forwards to bfloat16; fp32 master weights,
            optimizer state and gradient reduction).
        ema_decay: decay of the generator's EMA; ``None`` disables it.
        checkpoint_every, keep_last: checkpoint interval (iterations) and how many to keep (0 = all).
        checkpoint_format: ``"sharded"`` (every rank writes its shards with torch.distributed.checkpoint, nothing is
            gathered), ``"full"`` (full tensors gathered on rank 0, ``.safetensors``) or ``"auto"`` (``sharded`` under
            FSDP2, ``full`` otherwise). Either resumes on any number of ranks (:mod:`dmd2.train.checkpoint`).
        log_every: log interval (iterations); loss values are means over the interval, across ranks.
        sample_every: PNG sample grid interval (0 = never; needs the recipe's ``sample_fn``).
        seed: base seed; all randomness of iteration ``s`` derives from ``(seed, s, phase, shard)``.
        distributed: ``"none"``, ``"ddp"`` or ``"fsdp2"`` (launch with ``torchrun`` for the latter two).
        grad_checkpointing: recompute activations of the trained networks in backward.
        compile: ``torch.compile`` the networks (generator, fake score, teacher, GAN head) block by block: the
            forward of each of the recipe's blocks (``Components.checkpoint_units``, else ``fsdp_units``, else the
            whole network), so module hooks (feature taps, FSDP2's) stay outside the compiled code.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        out: run folder (``--out``).
        resume: ``""`` (a fresh run), ``"auto"`` (the newest complete checkpoint in ``out``) or a checkpoint folder
            (``--resume``).
        progress: show a tqdm bar on rank 0.
        loggers: comma-separated run loggers besides ``OUT/log.jsonl`` (always written): ``tensorboard``
            (``OUT/tb/``), ``wandb`` (``pip install -e .[wandb]``; ``WANDB_MODE=offline`` writes ``OUT/wandb/`` only);
            ``""`` for none. Both log the resolved config as hyperparameters.
        origin: where this config came from (recipe, preset, config file, overrides); set by the command line.
    """

    max_steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr_generator: float = 2e-6
    lr_critic: float = 2e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: float = 10.0
    mixed_precision: str = "no"
    ema_decay: float | None = 0.999
    checkpoint_every: int = 1000
    keep_last: int = 3
    checkpoint_format: str = "auto"
    log_every: int = 10
    sample_every: int = 0
    seed: int = 0
    distributed: str = "none"
    grad_checkpointing: bool = False
    compile: bool = False
    device: str = "auto"
    out: str = ""
    resume: str = ""
    progress: bool = True
    loggers: str = "tensorboard"
    origin: str = ""

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "keep_last", "sample_every", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_generator < 0 or self.lr_critic < 0:
            raise ValueError(f"train learning rates must be >= 0, got {self.lr_generator}, {self.lr_critic}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas must be two values in [0, 1), got {self.betas}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"train.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"train.checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {self.checkpoint_format!r}")
        if self.distributed not in DISTRIBUTED:
            raise ValueError(f"train.distributed must be one of {DISTRIBUTED}, got {self.distributed!r}")
        if self.ema_decay is not None and not (0.0 <= self.ema_decay < 1.0):
            raise ValueError(f"train.ema_decay must lie in [0, 1) or be None, got {self.ema_decay}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        bad = [n for n in self.logger_names() if n not in LOGGERS]
        if bad:
            raise ValueError(f"train.loggers: unknown logger(s) {bad}; expected a comma-separated subset of "
                             f"{', '.join(LOGGERS)} (jsonl is always on)")

    def logger_names(self) -> list[str]:
        """``loggers`` as a list, without ``jsonl`` (always on)."""
        return [n.strip() for n in self.loggers.split(",") if n.strip() and n.strip() != "jsonl"]


@dataclass(frozen=True)
class CriticConfig:
    """Two time-scale update rule (TTUR, paper Sec. 4.1).

    Attributes:
        ratio: critic (fake score + GAN head) updates per generator update (paper: 5).
    """

    ratio: int = 5

    def __post_init__(self):
        if self.ratio < 1:
            raise ValueError(f"critic.ratio must be >= 1, got {self.ratio}")


@dataclass(frozen=True)
class SamplerConfig:
    """The student's inference grid.

    Attributes:
        steps: number of student steps (``--steps N``); the recipe's default grid for that many steps.
        timesteps: explicit grid instead, noisiest first (its length must equal ``steps``); ``none``: the default.
    """

    steps: int = 1
    timesteps: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"sampler.steps must be >= 1, got {self.steps}")

    def grid(self, default: Callable[[int], Sequence[float]]) -> list[float]:
        """The grid: ``timesteps`` when set (its length must equal ``steps``), else ``default(steps)``.

        Checked here, once all overrides are applied, so their order on the command line does not matter.
        """
        if self.timesteps is None:
            return list(default(self.steps))
        if len(self.timesteps) != self.steps:
            raise ValueError(f"sampler.timesteps has {len(self.timesteps)} entries but sampler.steps is {self.steps}")
        return list(self.timesteps)


@dataclass(frozen=True)
class GANConfig:
    """The GAN head (:class:`~dmd2.core.GANHead`, DMD2 Sec. 4.2) on the fake score's bottleneck, the same section in
    every recipe (the recipe picks the tapped layer: its network's bottleneck / mid block).

    Whether a head exists is one rule, :func:`gan_enabled`: ``objective.gan_generator_weight > 0`` or
    ``objective.gan_discriminator_weight > 0`` (the weights stay in ``objective``, next to the losses they scale).
    With both at 0 no head is built, run or saved, and the trainer asks for no real images.

    Attributes:
        layers: fake-score submodules whose outputs the head reads (one branch each, logits summed), as dotted module
            names inside the fake score (``FeatureHooks`` names, e.g. ``model.enc.8x8_block0,model.enc.16x16_block0``
            for MNIST's ADM); empty: the recipe's tap (its network's bottleneck / mid block). Recipes whose tap is
            fixed (sdxl, tiny) refuse a non-empty value.
        hidden: width of the head's conv blocks.
        depth: stride-2 4x4 conv blocks (each + GroupNorm + SiLU).
        final_conv: end with a 4x4 conv of stride 4 (a 4x4 map -> 1x1) + GroupNorm + SiLU, as the official heads do
            (SDXL: hidden 1280, depth 3; ImageNet-64: hidden 768, depth 1); else a global average pool.
    """

    layers: tuple[str, ...] = ()
    hidden: int = 256
    depth: int = 2
    final_conv: bool = False

    def __post_init__(self):
        if self.hidden < 1 or self.depth < (0 if self.final_conv else 1):
            raise ValueError(f"gan.hidden must be >= 1 and gan.depth >= {0 if self.final_conv else 1} "
                             f"(gan.final_conv={self.final_conv}), got {self.hidden}, {self.depth}")


@dataclass(frozen=True)
class RecipeConfig:
    """Root of a run's configuration; recipes subclass it (frozen) to add sections."""

    train: TrainConfig = field(default_factory=TrainConfig)
    objective: DMD2Config = field(default_factory=DMD2Config)
    critic: CriticConfig = field(default_factory=CriticConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    gan: GANConfig = field(default_factory=GANConfig)


def gan_enabled(cfg: RecipeConfig) -> bool:
    """The one rule for "this run has a GAN head": a GAN weight of ``cfg.objective`` is positive."""
    return cfg.objective.gan_generator_weight > 0 or cfg.objective.gan_discriminator_weight > 0


def gan_head(cfg: RecipeConfig, in_channels: Sequence[int]) -> GANHead | None:
    """The run's :class:`~dmd2.core.GANHead` over maps of ``in_channels`` (``cfg.gan``), or None when
    :func:`gan_enabled` is false."""
    if not gan_enabled(cfg):
        return None
    g = cfg.gan
    return GANHead(in_channels, hidden=g.hidden, depth=g.depth, final_conv=g.final_conv)


def gan_layers(cfg: RecipeConfig, fake_score: nn.Module, default: Sequence[str], configurable: bool = True) -> list[str]:
    """The fake-score submodules the GAN head reads: ``cfg.gan.layers``, or the recipe's ``default`` tap when that is
    empty; ``[]`` when :func:`gan_enabled` is false. ``ValueError`` (one line) for a name that is not a submodule of
    ``fake_score``, or for any value when the recipe's tap is fixed (``configurable=False``)."""
    chosen = list(cfg.gan.layers)
    if chosen and not configurable:
        raise ValueError(f"gan.layers: this recipe's GAN head reads {list(default)} only; leave gan.layers empty, "
                         f"got {','.join(chosen)}")
    if not gan_enabled(cfg):
        return []
    layers = chosen or list(default)
    names = {n for n, _ in fake_score.named_modules()}
    for layer in layers:
        if layer not in names:
            near = sorted(n for n in names if n and n.count(".") == layer.count("."))[:6]
            raise ValueError(f"gan.layers: {layer!r} is not a submodule of the fake score (e.g. {', '.join(near)})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"gan.layers: each layer once, got {','.join(layers)}")
    return layers


# ---------------------------------------------------------------------------------------------------------------
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cfg) -> list[str]:
    """Every dotted leaf key of a (nested) config dataclass, in declaration order."""
    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out += [f"{f.name}.{k}" for k in valid_keys(v)]
        else:
            out.append(f.name)
    return out


def _split_optional(tp):
    """``X | None`` -> (X, True); other types -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_value(tp, value: Any, key: str = "value") -> Any:
    """Convert ``value`` (a string from the command line, or an already-typed value) to type ``tp``.

    Strings: ints ``"10"``, floats ``"2e-6"``, bools ``true/false/1/0/yes/no``, tuples ``"0.9,0.999"`` or
    ``"(0.9, 0.999)"`` (``"()"`` is empty), ``"none"``/``"null"`` for optional fields. Raises ``ValueError``.
    """
    inner, optional = _split_optional(tp)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ValueError(f"{key}: None is not allowed (expected {getattr(tp, '__name__', tp)})")
    tp = inner
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                return value.strip().lower() in _TRUE
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return int(str(value).strip())
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value) if isinstance(value, (int, float)) else float(str(value).strip())
        if tp is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        if origin is tuple:
            args = typing.get_args(tp)
            if isinstance(value, str):
                s = value.strip()
                if s[:1] in "([" and s[-1:] in ")]":
                    s = s[1:-1]
                items = [p.strip() for p in s.split(",") if p.strip()]
            else:
                items = list(value)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(parse_value(args[0], v, key) for v in items)
            if len(items) != len(args):
                raise ValueError
            return tuple(parse_value(a, v, key) for a, v in zip(args, items))
    except (TypeError, ValueError):
        pass
    else:
        if tp is Any:
            return value
    name = getattr(tp, "__name__", str(tp))
    raise ValueError(f"{key}: cannot parse {value!r} as {name}{' or None' if optional else ''}")


def _parse_items(overrides) -> list[tuple[str, Any]]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    items = []
    for o in overrides:
        if not isinstance(o, str) or "=" not in o:
            raise ValueError(f"override {o!r} must have the form key.sub=value")
        k, v = o.split("=", 1)
        items.append((k.strip(), v))
    return items


def _set(cfg, parts: list[str], value: Any, full_key: str, root):
    names = {f.name for f in dataclasses.fields(cfg)}
    head = parts[0]
    if head not in names:
        raise ValueError(f"unknown config key {full_key!r}; valid keys: {', '.join(valid_keys(root))}")
    cur = getattr(cfg, head)
    if len(parts) == 1:
        if dataclasses.is_dataclass(cur):
            raise ValueError(f"config key {full_key!r} is a section; set one of its fields: "
                             f"{', '.join(full_key + '.' + k for k in valid_keys(cur))}")
        new = parse_value(_hints(type(cfg))[head], value, full_key)
    else:
        if not dataclasses.is_dataclass(cur):
            raise ValueError(f"unknown config key {full_key!r}; valid keys: {', '.join(valid_keys(root))}")
        new = _set(cur, parts[1:], value, full_key, root)
    return dataclasses.replace(cfg, **{head: new})


def apply_overrides(cfg, overrides: Iterable[str] | Mapping[str, Any] | None):
    """A copy of ``cfg`` with ``overrides`` applied in order (later wins).

    ``overrides``: strings ``"a.b=value"`` or a mapping ``{"a.b": value}``. An unknown key raises ``ValueError``
    listing every valid key; a value that does not parse, or that a section's validation rejects, raises too.
    """
    for key, value in _parse_items(overrides):
        if not key:
            raise ValueError("empty config key in override")
        cfg = _set(cfg, key.split("."), value, key, cfg)
    return cfg


def config_to_dict(cfg) -> dict:
    """Nested plain dict (tuples become lists in JSON)."""
    return dataclasses.asdict(cfg)


#: the top-level key of a run's ``config.json`` naming the module of the recipe that wrote it (not a config field)
RECIPE_KEY = "recipe"


def config_to_json(cfg, recipe: str = "") -> str:
    """The config as JSON; ``recipe`` (a module name such as ``dmd2.recipes.mnist``), when given, is recorded first
    under :data:`RECIPE_KEY` so that :func:`dmd2.train.load_generator` can find the run's builder."""
    return json.dumps({**({RECIPE_KEY: recipe} if recipe else {}), **config_to_dict(cfg)}, indent=2, sort_keys=False)


#: keys of run folders written before the one ``gan`` section -> their key now (None: dropped; the tiny recipe's
#: ``model.gan`` flag is implied by the GAN weights)
LEGACY_KEYS = {"model.gan_hidden": "gan.hidden", "model.gan_depth": "gan.depth", "model.gan": None}


def config_from_dict(cls_or_cfg, data: Mapping[str, Any]):
    """Rebuild a config from :func:`config_to_dict` output; ``cls_or_cfg`` is the root class or a default instance.

    Keys absent from ``data`` keep their defaults; :data:`LEGACY_KEYS` are renamed (:func:`flatten`); a top-level
    :data:`RECIPE_KEY` (written by :func:`config_to_json`) is not a field and is skipped; other unknown keys raise
    ``ValueError``.
    """
    base = cls_or_cfg() if isinstance(cls_or_cfg, type) else cls_or_cfg
    data = {k: v for k, v in data.items() if k != RECIPE_KEY}
    return apply_overrides(base, flatten(data))


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> ``{"a.b": value}`` (keys already dotted pass through); :data:`LEGACY_KEYS` renamed."""
    out = {}
    for k, v in data.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
            continue
        key = f"{prefix}{k}"
        if key in LEGACY_KEYS:
            if LEGACY_KEYS[key] is None:
                continue
            key = LEGACY_KEYS[key]
        out[key] = v
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The overrides a config file holds, as ``{"a.b": value}``: a saved ``OUT/config.json`` (every key) or a JSON /
    YAML (``.yaml``, ``.yml``) file of some keys, nested (``{"train": {"max_steps": 10}}``) or dotted
    (``{"train.max_steps": 10}``). ``ValueError`` for a missing file or one that is not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {str(path)!r}: no such file (expected a saved OUT/config.json or a JSON/YAML file)")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line naming the file
        raise ValueError(f"--config {str(path)!r}: cannot parse ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"--config {str(path)!r}: expected a mapping of config keys, got {type(data).__name__}")
    return flatten({k: v for k, v in data.items() if k != RECIPE_KEY})  # a saved config.json names its recipe


# ------------------------------------------------------------------------------------------------ help text
_ENTRY = re.compile(r"^(\s*)([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)\s*:\s+(.*)$")


def _block_docs(doc: str) -> dict[str, str]:
    """Entries of the ``Attributes:`` (or ``Args:``) block: ``name[, name2]: text``, continued on deeper-indented
    lines."""
    out: dict[str, str] = {}
    lines = doc.expandtabs().splitlines()
    for i, line in enumerate(lines):
        if line.strip() not in ("Attributes:", "Args:"):
            continue
        base, indent, names = len(line) - len(line.lstrip()), None, []
        for ln in lines[i + 1:]:
            depth = len(ln) - len(ln.lstrip())
            if not ln.strip() or depth <= base:
                break
            m = _ENTRY.match(ln)
            if m and (indent is None or depth <= indent):
                indent, names = depth, [n.strip() for n in m.group(2).split(",")]
                out.update({n: m.group(3).strip() for n in names})
            else:
                out.update({n: f"{out[n]} {ln.strip()}" for n in names})
    return out


def _plain(text: str) -> str:
    """Docstring markup -> plain text: ``x`` -> x, :mod:`~a.b` -> a.b, whitespace runs -> one space."""
    return " ".join(re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "").split())


def field_docs(cls) -> dict[str, str | None]:
    """``field name -> its description`` from the ``Attributes:`` block of the dataclass's docstring (or of the
    nearest dataclass base that documents it); ``None`` where none does."""
    blocks = [_block_docs(k.__dict__.get("__doc__") or "") for k in cls.__mro__ if dataclasses.is_dataclass(k)]
    out: dict[str, str | None] = {}
    for f in dataclasses.fields(cls):
        text = next((b[f.name] for b in blocks if f.name in b), None)
        out[f.name] = _plain(text) if text else None
    return out


def _type_name(tp) -> str:
    inner, optional = _split_optional(tp)
    if optional:
        return f"{_type_name(inner)} | None"
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{_type_name(args[0])}, ...]"
        return f"tuple[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _value_text(v) -> str:
    if isinstance(v, tuple):
        return ",".join(str(x) for x in v) if v else "()"
    if isinstance(v, str):
        return repr(v) if v == "" or " " in v else v
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def config_help(cfg, section: str | None = None) -> str:
    """Every config key of ``cfg`` (a root config instance: its values are shown as the defaults), grouped by
    section: ``key  type = default  description``. ``section`` limits it to one; ``ValueError`` names the valid ones."""
    sections = [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]
    if section is not None and section not in sections:
        raise ValueError(f"unknown config section {section!r}; valid sections: {', '.join(sections)}")
    rows = []
    for name in sections if section is None else [section]:
        sub = getattr(cfg, name)
        cls = type(sub)
        summary = _plain((cls.__doc__ or "").strip().split("\n\n")[0])
        rows.append(f"[{name}] {summary}" if summary else f"[{name}]")
        hints, docs = _hints(cls), field_docs(cls)
        for f in dataclasses.fields(sub):
            if dataclasses.is_dataclass(getattr(sub, f.name)):
                continue
            key = f"{name}.{f.name}"
            spec = f"{_type_name(hints[f.name])} = {_value_text(getattr(sub, f.name))}"
            rows.append(f"  {key:<34} {spec:<28} {docs[f.name] or ''}".rstrip())
    return "\n".join(rows)
