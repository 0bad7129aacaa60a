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
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..core.objective import DMD2Config

__all__ = [
    "TrainConfig", "CriticConfig", "SamplerConfig", "RecipeConfig", "DMD2Config",
    "apply_overrides", "valid_keys", "config_to_dict", "config_from_dict", "config_to_json", "parse_value",
]

MIXED_PRECISION = ("no", "bf16")
DISTRIBUTED = ("none", "ddp", "fsdp2")
CHECKPOINT_FORMATS = ("auto", "sharded", "full")


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
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        out: run folder (``--out``); resume: ``""``, ``"auto"`` or a checkpoint folder (``--resume``).
        progress: show a tqdm bar on rank 0.
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
    device: str = "auto"
    out: str = ""
    resume: str = ""
    progress: bool = True

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


@dataclass(frozen=True)
class CriticConfig:
    """Two time-scale update rule: ``ratio`` critic updates per generator update (paper: 5)."""

    ratio: int = 5

    def __post_init__(self):
        if self.ratio < 1:
            raise ValueError(f"critic.ratio must be >= 1, got {self.ratio}")


@dataclass(frozen=True)
class SamplerConfig:
    """The student's inference grid: ``steps`` steps (``--steps N``), or explicit ``timesteps`` (noisiest first)."""

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
class RecipeConfig:
    """Root of a run's configuration; recipes subclass it (frozen) to add sections."""

    train: TrainConfig = field(default_factory=TrainConfig)
    objective: DMD2Config = field(default_factory=DMD2Config)
    critic: CriticConfig = field(default_factory=CriticConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)


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


def config_to_json(cfg) -> str:
    return json.dumps(config_to_dict(cfg), indent=2, sort_keys=False)


def config_from_dict(cls_or_cfg, data: Mapping[str, Any]):
    """Rebuild a config from :func:`config_to_dict` output; ``cls_or_cfg`` is the root class or a default instance.

    Keys absent from ``data`` keep their defaults; unknown keys raise ``ValueError``.
    """
    base = cls_or_cfg() if isinstance(cls_or_cfg, type) else cls_or_cfg

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, Mapping):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    return apply_overrides(base, dict(flat(data)))
