"""Text prompts for text-to-image distillation, from ``.txt`` (one prompt per line), ``.jsonl`` (one object per line)
or ``.parquet`` (one column).

DMD2 trains the SDXL student on text prompts only for the distribution-matching term (the GAN's real images come
from :mod:`dmd2.data.sdxl_images`); the official run uses the captions of LAION-aesthetic images.
:class:`PromptNoise` turns a prompt list into the generator's inputs, noise and the conditions of drawn prompts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch

__all__ = ["read_prompts", "PROMPT_KEYS", "PromptNoise"]

#: keys tried, in order, when the configured key is absent from a jsonl object / parquet table
PROMPT_KEYS = ("prompt", "caption", "text")


def _pick(keys_present, key: str | None, where: str) -> str:
    order = ([key] if key else []) + [k for k in PROMPT_KEYS if k != key]
    for k in order:
        if k in keys_present:
            if key and k != key:
                raise ValueError(f"{where}: no field {key!r} (fields: {sorted(keys_present)})")
            return k
    raise ValueError(f"{where}: expected a field among {list(order)}, found {sorted(keys_present)}")


def read_prompts(path: str | Path, key: str | None = None, limit: int | None = None) -> list[str]:
    """All prompts of a file, in file order (blank lines of a ``.txt`` skipped).

    Args:
        path: ``.txt``, ``.jsonl`` or ``.parquet`` file.
        key: the jsonl field / parquet column (default: the first of :data:`PROMPT_KEYS` present).
        limit: keep the first ``limit`` prompts.

    Raises ``ValueError`` for a missing file, an unknown suffix, a missing field, a non-string prompt or no prompt.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"prompt file {str(p)!r} does not exist (expected a .txt, .jsonl or .parquet file)")
    suffix = p.suffix.lower()
    if suffix == ".txt":
        prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix == ".jsonl":
        prompts, field = [], None
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{i + 1}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{p}:{i + 1}: expected a JSON object per line")
            field = field or _pick(obj.keys(), key, f"{p}:{i + 1}")
            if field not in obj:
                raise ValueError(f"{p}:{i + 1}: no field {field!r}")
            prompts.append(obj[field])
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        field = _pick(set(table.column_names), key, str(p))
        prompts = table.column(field).to_pylist()
    else:
        raise ValueError(f"prompt file {str(p)!r}: unknown suffix {suffix!r}; expected .txt, .jsonl or .parquet")
    bad = [i for i, s in enumerate(prompts) if not isinstance(s, str)]
    if bad:
        raise ValueError(f"{p}: prompt {bad[0]} is not a string ({type(prompts[bad[0]]).__name__})")
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise ValueError(f"{p}: no prompts found")
    return prompts


class PromptNoise:
    """The generator's inputs of text-to-image training (:attr:`Components.latents <dmd2.train.Components>`):
    ``(batch, generator, device) -> (noise (batch, *shape), encode(prompts drawn))``.

    From ``generator``, in this order: ``batch`` prompt indices uniform over ``prompts`` with replacement (on the
    generator's device), then unit Gaussian noise on ``device``.

    Args:
        prompts: the prompt list (:func:`read_prompts`, or the captions of the real-image set).
        encode: ``list of prompts -> cond`` (the SDXL recipe: :meth:`PromptEncoder.cond
            <dmd2.models.sdxl.PromptEncoder.cond>` at the run's resolution).
        shape: the noise's shape per sample, ``(C, h, w)``.
    """

    def __init__(self, prompts: Sequence[str], encode: Callable, shape: Sequence[int]):
        if not prompts:
            raise ValueError("PromptNoise: expected a non-empty list of prompts")
        self.prompts, self.encode, self.shape = list(prompts), encode, tuple(shape)

    def __call__(self, batch: int, generator: torch.Generator, device) -> tuple[torch.Tensor, object]:
        idx = torch.randint(len(self.prompts), (batch,), generator=generator, device=generator.device).tolist()
        noise = torch.randn((batch, *self.shape), generator=generator, device=device)
        return noise, self.encode([self.prompts[i] for i in idx])
