"""The one training loop every recipe uses (DMD2, Yin et al. 2024): config, CLI, distributed, checkpoints, logs.

A recipe is a preset table plus a builder::

    from dmd2.train import Components, Recipe, RecipeConfig, main

    @dataclass(frozen=True)
    class MyConfig(RecipeConfig):          # add sections: model, data, teacher, ...
        model: MyModelConfig = field(default_factory=MyModelConfig)

    def build(cfg, info) -> Components:    # called on every rank after torch.manual_seed(cfg.train.seed)
        return Components(generator=..., fake_score=..., teacher=..., schedule=..., sampler=...,
                          latents=lambda batch, g, device: (noise, cond),
                          real_data=lambda step, shard, batch, device: (images, cond),
                          gan_head=GANHead([...]), gan_layers=["mid_block"], sample_fn=...)

    def student(cfg, state_dict) -> Student:  # for load_generator: the generator network, loaded, and its sampler
        ...

    RECIPE = Recipe("mine", MyConfig(), build, presets={"tiny": {"train.max_steps": 4, ...}}, generator=student)
    if __name__ == "__main__":
        sys.exit(main(RECIPE))

* :mod:`dmd2.train.config` - frozen dataclasses (:class:`TrainConfig`, :class:`CriticConfig`,
  :class:`SamplerConfig`, :class:`~dmd2.core.DMD2Config` as ``objective``) under :class:`RecipeConfig`;
  :func:`apply_overrides` (``"a.b=value"``, typed; unknown keys list the valid ones).
* :mod:`dmd2.train.cli` - :func:`main`: ``[COMMAND] [--preset P] [--config FILE] [--out DIR] [--resume auto|PATH]
  [--dry-run] [--steps N] [key.sub=value ...]``; ``--help`` lists every config key.
* :mod:`dmd2.train.trainer` - :class:`Trainer` (the two updates and the loop) and :class:`Components`.
* :mod:`dmd2.train.randomness` - keyed randomness: :func:`derive_seed`, the per-(step, phase, shard) streams.
* :mod:`dmd2.train.metrics` - logged values tracked on device, reduced over ranks; the NaN/inf stop
  (:class:`NonFiniteError`).
* :mod:`dmd2.train.state` - what a checkpoint of a run holds (networks, EMA, optimizers, RNG, log sums): save,
  exact resume on any number of ranks.
* :mod:`dmd2.train.wrapping` - ``train.compile``, ``train.grad_checkpointing``, then DDP / FSDP2 wrapping, in order.
* :mod:`dmd2.train.distributed` - torchrun, DDP, FSDP2 (``fully_shard``), requires_grad toggling safe under FSDP2.
* :mod:`dmd2.train.checkpoint` - the run-folder layout, write-then-rename, keep-last-K, ``--resume auto``.
* :mod:`dmd2.train.sharded` - ``train.checkpoint_format=sharded``: every rank writes its shards
  (torch.distributed.checkpoint), resumable on any number of ranks, consolidated on one process for export.
* :mod:`dmd2.train.loading` - :func:`load_generator` (any recipe's checkpoint or run folder -> a ready
  :class:`Student`), :func:`resolve_checkpoint`.
* :mod:`dmd2.train.monitor` - tqdm, ``log.jsonl``, PNG sample grids.
* :mod:`dmd2.train.loggers` - ``train.loggers``: TensorBoard, wandb (the config as hyperparameters).
* :mod:`dmd2.train.data` - :class:`IndexedBatches`, stateless per-(step, shard) real data from a dataset.

See docs/training.md.
"""
from .cli import Recipe, TrainResult, main, resolve_config
from .config import (CriticConfig, DMD2Config, RecipeConfig, SamplerConfig, TrainConfig, apply_overrides,
                     config_from_dict, config_to_dict, config_to_json, valid_keys)
from .data import IndexedBatches
from .distributed import DistInfo, init_distributed
from .loading import Student, generator_state_dict, load_config, load_generator, resolve_checkpoint
from .metrics import NonFiniteError
from .randomness import derive_seed
from .trainer import Components, Trainer

__all__ = [
    "Recipe", "TrainResult", "main", "resolve_config",
    "load_generator", "load_config", "resolve_checkpoint", "generator_state_dict", "Student",
    "TrainConfig", "CriticConfig", "SamplerConfig", "RecipeConfig", "DMD2Config",
    "apply_overrides", "valid_keys", "config_to_dict", "config_from_dict", "config_to_json",
    "IndexedBatches", "DistInfo", "init_distributed",
    "Components", "Trainer", "NonFiniteError", "derive_seed",
]
