"""Rank-0 outputs of a run: tqdm progress, ``OUT/log.jsonl``, the loggers of ``train.loggers`` (TensorBoard in
``OUT/tb/``, wandb: :mod:`dmd2.train.loggers`) and sample grids in ``OUT/samples/step-XXXXXXXX.png``.

``log.jsonl`` holds one JSON object per logged iteration (``"step"`` = completed iterations, losses, learning
rates, grad norms, samples/s, peak memory). It is only ever appended to, one whole line per write; on resume,
entries after the checkpoint's step are dropped first (through a temporary file and a rename), so the file always
reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

__all__ = ["RunMonitor", "image_grid", "save_png"]


def image_grid(images: torch.Tensor, nrow: int | None = None, value_range=(-1.0, 1.0),
               row_labels: Sequence[str] = ()) -> np.ndarray:
    """``(N, C, H, W)`` images (C in 1, 3) in ``value_range`` -> a ``(rows*H, cols*W, 3)`` uint8 grid, 1 px gaps.

    ``row_labels``: one text per row (``len == rows``), written in a white margin left of the grid.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image_grid: expected (N, 1|3, H, W) images, got {tuple(images.shape)}")
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.zeros(3, rows * (h + 1) + 1, cols * (w + 1) + 1)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = x[i]
    grid = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    if row_labels:
        if len(row_labels) != rows:
            raise ValueError(f"image_grid: {len(row_labels)} row labels for {rows} rows")
        grid = _label_rows(grid, list(row_labels), h + 1)
    return grid


def _label_rows(grid: np.ndarray, labels: list[str], pitch: int) -> np.ndarray:
    """A white margin wide enough for the longest label, each label drawn (PIL's default font) level with its row."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(probe.textbbox((0, 0), t, font=font)[2] for t in labels) + 6
    img = Image.new("RGB", (width + grid.shape[1], grid.shape[0]), (255, 255, 255))
    img.paste(Image.fromarray(grid), (width, 0))
    draw = ImageDraw.Draw(img)
    for r, text in enumerate(labels):
        box = draw.textbbox((0, 0), text, font=font)
        draw.text((3, 1 + r * pitch + max(0, (pitch - 1 - (box[3] - box[1])) // 2) - box[1]), text, fill=(0, 0, 0), font=font)
    return np.asarray(img)


def save_png(images: torch.Tensor, path: str | Path, **kw) -> Path:
    """:func:`image_grid` of ``images`` (``kw``: its options) written as a PNG."""
    return _write_png(image_grid(images, **kw), path)


def _write_png(grid: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


class RunMonitor:
    """Progress bar, JSONL log, the run loggers and sample grids; a no-op on ranks other than 0.

    Args:
        out: the run folder; start_step: iterations already done (resume); max_steps: total iterations.
        loggers: names for :class:`~dmd2.train.loggers.RunLoggers`; config: the resolved config (nested dict) they
            record as hyperparameters.
    """

    def __init__(self, out: str | Path, is_main: bool, start_step: int, max_steps: int, progress: bool = True,
                 loggers: Sequence[str] = ("tensorboard",), config: Mapping[str, Any] | None = None):
        self.out, self.is_main = Path(out), is_main
        self.bar = self.loggers = None
        if not is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "log.jsonl"
        self._truncate_after(start_step)
        from .loggers import RunLoggers

        self.loggers = RunLoggers(self.out, loggers, config or {}, start_step)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, desc="dmd2", unit="it", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """Keep the records up to ``step``: the kept lines go to ``log.jsonl.tmp``, which then replaces the log in one
        rename (a kill leaves the old file or the new one, never a cut). A torn last line (a kill mid-append) is
        dropped with a warning; a bad line elsewhere is an error naming the file and line."""
        if not self.log_path.is_file():
            return
        data = self.log_path.read_bytes()
        lines = data.split(b"\n")
        keep, changed = [], False
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                at = int(rec["step"])
            except (ValueError, KeyError, TypeError):
                if i == len(lines) - 1:  # no newline after it: a cut append
                    print(f"warning: {self.log_path}: dropping a torn last line ({len(line)} bytes)", file=sys.stderr,
                          flush=True)
                    changed = True
                    continue
                raise ValueError(f"{self.log_path}:{i + 1}: not a JSON record with a 'step' (the run's log is "
                                 f"damaged; move it away to start a new one)") from None
            if at <= step:
                keep.append(line + b"\n")
            else:
                changed = True
        if not changed and data.endswith(b"\n") or not data:
            return
        tmp = self.log_path.with_name(self.log_path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(b"".join(keep))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.log_path)

    def advance(self, n: int = 1) -> None:
        if self.bar is None:
            return
        if self.bar.total is not None and self.bar.n + n >= self.bar.total:
            self.bar.n += n  # the last step: drawn once, by close() (with the final losses), not twice
        else:
            self.bar.update(n)

    def log(self, step: int, values: dict[str, float]) -> None:
        """One record at ``step`` (completed iterations)."""
        if not self.is_main:
            return
        record = {"step": step, **values}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.loggers.scalars(step, values)
        if self.bar is not None:
            short = {k: f"{v:.4g}" for k, v in values.items() if k.startswith("loss")}
            self.bar.set_postfix(short, refresh=False)

    def samples(self, step: int, images: torch.Tensor, row_labels: Sequence[str] = ()) -> Path | None:
        """``OUT/samples/step-XXXXXXXX.png`` and the loggers' ``samples`` image: ``len(row_labels)`` labelled rows
        when given (else a square-ish grid)."""
        if not self.is_main:
            return None
        nrow = math.ceil(images.shape[0] / len(row_labels)) if row_labels else None
        grid = image_grid(images, nrow=nrow, row_labels=row_labels)
        path = self.out / "samples" / f"step-{step:08d}.png"
        _write_png(grid, path)
        self.loggers.image("samples", grid, step, caption="rows: " + ", ".join(row_labels) if row_labels else "")
        return path

    def write(self, msg: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.loggers is not None:
            self.loggers.close()
