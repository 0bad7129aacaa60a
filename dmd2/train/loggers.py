"""Run loggers beside ``OUT/log.jsonl`` (always written by :class:`~dmd2.train.monitor.RunMonitor`), chosen by
``train.loggers`` (comma-separated):

* ``tensorboard``: event files in ``OUT/tb/``; the resolved config as TensorBoard hparams (HPARAMS tab) and as
  a ``config`` text entry.
* ``wandb``: a Weights & Biases run (``pip install -e .[wandb]``) with the resolved config as its ``config``; files
  under ``OUT/wandb/``. The project is ``$WANDB_PROJECT`` (default ``dmd2``); ``WANDB_MODE=offline`` writes the
  run only locally (``wandb sync OUT/wandb/offline-run-*`` uploads it later). A resumed run continues the same wandb
  run (its id is kept in ``OUT/wandb/run-id``).

Rank 0 only; every value is logged at ``step`` = completed iterations, like ``log.jsonl``.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .config import flatten

__all__ = ["RunLoggers", "hparams"]


def hparams(config: Mapping[str, Any]) -> dict[str, int | float | str | bool]:
    """The nested config as flat ``{"train.max_steps": 1200, ...}`` of scalar values (tuples and None as text), the
    types TensorBoard's hparams accept."""
    out = {}
    for k, v in flatten(config).items():
        out[k] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
    return out


class RunLoggers:
    """The loggers of one run.

    Args:
        out: the run folder.
        names: a subset of ``("tensorboard", "wandb")`` (:meth:`~dmd2.train.config.TrainConfig.logger_names`).
        config: the resolved config as a nested dict (:func:`~dmd2.train.config.config_to_dict`).
        start_step: iterations already done (a resume: TensorBoard purges later events, wandb continues the run).
    """

    def __init__(self, out: str | Path, names: Sequence[str], config: Mapping[str, Any], start_step: int = 0):
        self.out = Path(out)
        self.tb = self.wandb_run = None
        hp = hparams(config)
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams as tb_hparams

            self.tb = SummaryWriter(str(self.out / "tb"), purge_step=start_step + 1 if start_step else None)
            if not start_step:
                for summary in tb_hparams(hp, {}):  # experiment, session start, session end: in this run's folder
                    self.tb.file_writer.add_summary(summary)
                self.tb.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        if "wandb" in names:
            try:
                import wandb
            except ImportError:
                raise ValueError("train.loggers includes wandb but the wandb package is not installed; "
                                 "pip install -e .[wandb] (or drop wandb from train.loggers)") from None
            folder = self.out / "wandb"
            folder.mkdir(parents=True, exist_ok=True)
            id_file = folder / "run-id"
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
            self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dmd2"), dir=str(self.out),
                                        name=self.out.name, id=run_id, resume="allow", config=hp)

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        nums = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in nums.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log(nums, step=step)

    def image(self, tag: str, grid: np.ndarray, step: int, caption: str = "") -> None:
        """``grid``: an ``(H, W, 3)`` uint8 image."""
        if self.tb is not None:
            self.tb.add_image(tag, grid, step, dataformats="HWC")
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({tag: wandb.Image(grid, caption=caption or None)}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
