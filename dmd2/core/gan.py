r"""The GAN head of DMD2 (Sec. 4.2) and forward-hook feature capture.

DMD2 puts a small classification head on features of the fake-score network (its bottleneck) and trains it,
together with that backbone, to tell diffused real images from diffused generator samples ("diffusion GAN").

* :class:`GANHead`: a list of feature maps ``[(B, C_i, H_i, W_i), ...]`` (channel counts configured, any spatial size)
  -> ``(B,)`` logits. Each map goes through ``depth`` blocks of strided 4x4 conv + GroupNorm + SiLU, optionally a
  final 4x4 conv of stride 4 (a 4x4 map -> 1x1, as the official heads end), a global average pool and a linear
  layer (on a 1x1 map: the official 1x1 output conv); the per-map logits are summed.
* :class:`FeatureHooks`: captures named submodule outputs with forward hooks (no patched ``forward``); a
  features-only pass ends the forward after the last tapped layer.
* :func:`shift_images`: random integer translations of the images the discriminator sees (opt-in
  ``DMD2Config.gan_shift``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GANHead", "FeatureHooks", "shift_images"]


def shift_images(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` ``(B, C, H, W)`` with each image translated by integer offsets ``(dy, dx)``, each drawn uniformly from
    ``[-max_shift, max_shift]`` (``dy`` for all images, then ``dx``, from ``generator``): ``out[b, :, i, j] =
    x[b, :, clamp(i - dy_b), clamp(j - dx_b)]`` (edge pixels repeat into the gap). Differentiable in ``x``."""
    if x.dim() != 4:
        raise ValueError(f"shift_images: expected (B, C, H, W) images, got shape {tuple(x.shape)}")
    if max_shift < 0:
        raise ValueError(f"shift_images: max_shift must be >= 0, got {max_shift}")
    b, c, h, w = x.shape
    d = torch.randint(-max_shift, max_shift + 1, (2, b), generator=generator, device=x.device)
    rows = (torch.arange(h, device=x.device)[None, :] - d[0][:, None]).clamp(0, h - 1)  # (B, H) source rows
    cols = (torch.arange(w, device=x.device)[None, :] - d[1][:, None]).clamp(0, w - 1)  # (B, W) source columns
    x = x.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    return x.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def _groups(channels: int, max_groups: int = 32, min_per_group: int = 8) -> int:
    """GroupNorm groups: at most ``max_groups`` and at least ``min_per_group`` channels per group, so the norm stays
    informative on 1x1 maps (one channel per group would normalise every value to 0). 768 and 1280 channels: 32."""
    g = max(1, min(max_groups, channels // min_per_group))
    while channels % g:
        g -= 1
    return g


class _DownBlock(nn.Module):
    r"""4x4 conv, GroupNorm, SiLU.

    ``final=False``: stride 2, padding 1 (``H -> \lceil H/2 \rceil``). Maps smaller than 2x2 keep their size (pad
    (1, 2), stride 1); on a 1x1 map that conv reads only the centre tap ``W[:, :, 1, 1]``, so it is computed exactly
    as the linear map ``W[:, :, 1, 1] x + b`` (a ``(B, C)`` matmul instead of a padded 4x4 conv).
    ``final=True``: stride 4, no padding (4x4 -> 1x1; ``H -> \lfloor (H - 4)/4 \rfloor + 1``), maps of at least 4x4.
    """

    def __init__(self, cin: int, cout: int, final: bool = False):
        super().__init__()
        self.final = final
        self.conv = nn.Conv2d(cin, cout, kernel_size=4, stride=4 if final else 2, padding=0 if final else 1)
        self.norm = nn.GroupNorm(_groups(cout), cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.final:
            x = self.conv(x)
        elif h == 1 and w == 1:  # the padded stride-1 conv below, restricted to the one tap it reads
            x = F.linear(x.flatten(1), self.conv.weight[:, :, 1, 1], self.conv.bias)[:, :, None, None]
        elif min(h, w) >= 2:
            x = self.conv(x)
        else:  # keep the size: pad (1, 2) and slide with stride 1
            x = F.conv2d(F.pad(x, (1, 2, 1, 2)), self.conv.weight, self.conv.bias)
        return F.silu(self.norm(x))


class GANHead(nn.Module):
    r"""Discriminator head over feature maps of the fake-score network (DMD2 Sec. 4.2).

    Per map: ``depth`` blocks (4x4 conv stride 2 + GroupNorm + SiLU), then, with ``final_conv``, one 4x4 conv of
    stride 4 without padding + GroupNorm + SiLU; a global average pool and ``Linear(hidden, 1)``. The logits of all
    maps are summed. The official heads are instances:

    * SDXL (mid block, 1280 ch, 32x32 at 1024 px): ``GANHead([1280], hidden=1280, depth=3, final_conv=True)``,
      32 -> 16 -> 8 -> 4 -> 1, then the linear = the official 1x1 conv (104,874,241 parameters);
    * ImageNet-64 (ADM bottleneck, 768 ch, 8x8): ``GANHead([768], hidden=768, depth=1, final_conv=True)``,
      8 -> 4 -> 1 (18,879,745 parameters).

    Args:
        in_channels: channel count of each feature map, in the order they are passed.
        hidden: width of the conv blocks.
        depth: number of stride-2 conv blocks per map (>= 0 with ``final_conv``, else >= 1).
        final_conv: end with the stride-4 block; the map entering it must be at least 4x4.

    ``forward(features: list of (B, C_i, H_i, W_i) or (B, C_i) tensors, one batch size) -> (B,)`` logits (fp32).
    2-d ``(B, C)`` features (e.g. from an MLP) are treated as 1x1 maps.

    State-dict keys: ``branches.{i}.{j}.conv|norm`` (stride-2 blocks), ``final.{i}.conv|norm`` (with
    ``final_conv``), ``out.{i}`` (the linear).
    """

    def __init__(self, in_channels: Sequence[int], hidden: int = 256, depth: int = 2, final_conv: bool = False):
        super().__init__()
        if len(in_channels) == 0 or any(int(c) < 1 for c in in_channels):
            raise ValueError(f"GANHead: in_channels must be a non-empty list of positive ints, got {list(in_channels)}")
        if hidden < 1 or depth < (0 if final_conv else 1):
            raise ValueError(f"GANHead: hidden must be >= 1 and depth >= {0 if final_conv else 1}"
                             f"{' with final_conv' if final_conv else ' without final_conv'}, got {hidden}, {depth}")
        self.in_channels = [int(c) for c in in_channels]
        self.depth, self.final_conv = int(depth), bool(final_conv)
        self.branches = nn.ModuleList()
        for c in self.in_channels:
            blocks = [_DownBlock(c if i == 0 else hidden, hidden) for i in range(depth)]
            self.branches.append(nn.Sequential(*blocks))
        if final_conv:
            self.final = nn.ModuleList(_DownBlock(hidden if depth else c, hidden, final=True) for c in self.in_channels)
        self.out = nn.ModuleList(nn.Linear(hidden, 1) for _ in self.in_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.in_channels):
            raise ValueError(f"GANHead: expected {len(self.in_channels)} feature maps, got {len(features)}")
        batch = [f.shape[0] if f.dim() else None for f in features]
        if len(set(batch)) != 1:
            raise ValueError(f"GANHead: feature maps must share one batch size, got batch sizes {batch}")
        logits = torch.zeros(features[0].shape[0], dtype=torch.float32, device=features[0].device)
        for i, (f, branch, out) in enumerate(zip(features, self.branches, self.out)):
            if f.dim() == 2:
                f = f[:, :, None, None]
            if f.dim() != 4 or f.shape[1] != self.in_channels[i]:
                raise ValueError(
                    f"GANHead: feature {i} must be (B, {self.in_channels[i]}, H, W) or (B, {self.in_channels[i]}), got {tuple(f.shape)}"
                )
            h = branch(f.to(out.weight.dtype))
            if self.final_conv:
                if min(h.shape[-2:]) < 4:
                    raise ValueError(f"GANHead: the final stride-4 conv needs a map of at least 4x4, but feature {i} "
                                     f"{tuple(f.shape[-2:])} is {tuple(h.shape[-2:])} after {self.depth} stride-2 blocks; "
                                     "use a smaller depth or final_conv=False")
                h = self.final[i](h)
            logits = logits + out(h.mean(dim=(2, 3))).squeeze(1).float()  # out of place: a new tensor, not a view
        return logits


class _FeaturesReady(Exception):
    """Ends a features-only forward at the first module call after the last tapped layer (caught in
    :meth:`FeatureHooks.run`; never escapes it)."""


def _finish_interrupted_wrappers(model: nn.Module, output) -> None:
    """Do the end-of-forward bookkeeping of the data-parallel wrappers whose forward a stop interrupted.

    A stopped forward leaves the modules around the taps (the root, and the containers on the path to the taps)
    without their end of forward. For plain modules that only means their forward hooks do not run. The wrappers
    keep per-pass state there: FSDP2's post-forward reshards, registers the pre-backward hook (the unshard before
    backward) on the outputs and clears the root's "forward in flight" marker; DDP's prepares its reducer for
    backward. Both are run here with the captured features as the forward's output, so backward through the features
    and the next forward see the state a completed forward leaves. Modules entirely before the taps completed
    normally; modules after them never started.
    """
    from torch.nn.parallel import DistributedDataParallel

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a build without distributed support
        FSDPModule = ()
    for m in reversed(list(model.modules())):  # innermost first, as forwards end
        if FSDPModule and isinstance(m, FSDPModule):
            state = m._get_fsdp_state()
            if state._training_state.name == "FORWARD":  # entered, never ended
                state._post_forward(m, (), output)
    if isinstance(model, DistributedDataParallel):
        model._post_forward(output)


class FeatureHooks:
    """Capture the outputs of named submodules of ``model`` during a forward pass.

    >>> hooks = FeatureHooks(unet, ["mid_block"])
    >>> x0, feats = hooks.run(denoiser, x_t, t, cond)   # feats: list of tensors, in ``layers`` order
    >>> _, feats = hooks.run(denoiser, x_t, t, cond, features_only=True)   # the forward ends after the taps

    Hooks are registered once and record only inside :meth:`run` / :meth:`capture`; call :meth:`remove` to detach.
    A submodule that returns a tuple contributes its first element; a layer that runs several times in one forward
    contributes its first output under ``features_only`` (its last otherwise).

    ``features_only``: once every tapped layer has produced its output (its forward hooks included), the next
    module call raises a private exception that ends the forward and :meth:`run` catches - the layers after the taps
    (a UNet's decoder) never run, for any ``nn.Module`` and any wrapping: DDP and FSDP2 wrappers interrupted by the
    stop get their end-of-forward bookkeeping (:func:`_finish_interrupted_wrappers`), and activation checkpointing
    (non-reentrant) recomputes only what the stopped forward saved. The features, and gradients through them, are
    exactly those of the full forward when the skipped layers draw no random numbers (dropout there would consume
    the global generator in the full forward only).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]):
        if not layers:
            raise ValueError("FeatureHooks: give at least one layer name")
        if len(set(layers)) != len(layers):
            raise ValueError(f"FeatureHooks: layer names must be distinct, got {list(layers)}")
        names = dict(model.named_modules())
        missing = [n for n in layers if n not in names]
        if missing:
            sample = [n for n in names if n][:40]
            raise ValueError(f"FeatureHooks: no submodule named {missing}; some valid names: {sample}")
        self.model = model
        self.layers = list(layers)
        self._store: dict[str, torch.Tensor] | None = None
        self._stop = False
        self._stopper = None  # the global pre-forward hook that ends a features-only forward, while armed
        self._handles = [names[n].register_forward_hook(self._make_hook(n)) for n in self.layers]

    def _make_hook(self, name: str):
        def hook(module, args, output):
            store = self._store
            if store is None or (self._stop and name in store):
                return
            store[name] = output[0] if isinstance(output, (tuple, list)) else output
            if self._stop and self._stopper is None and len(store) == len(self.layers):
                self._stopper = nn.modules.module.register_module_forward_pre_hook(self._end_forward)

        return hook

    @staticmethod
    def _end_forward(module, args):
        raise _FeaturesReady

    @contextmanager
    def capture(self):
        """Context in which forward passes record features; yields the list filled on exit of the forward."""
        out: list[torch.Tensor] = []
        self._store = {}
        try:
            yield out
            missing = [n for n in self.layers if n not in self._store]
            if missing:
                raise RuntimeError(f"FeatureHooks: layers {missing} did not run during the forward pass")
            out.extend(self._store[n] for n in self.layers)
        finally:
            self._store = None
            self._stop = False
            if self._stopper is not None:
                self._stopper.remove()
                self._stopper = None

    def run(self, fn, *args, features_only: bool = False, **kwargs):
        """Call ``fn(*args, **kwargs)`` (a forward of ``model``) and return ``(output, features)``; with
        ``features_only`` the forward ends after the last tapped layer and ``output`` is ``None`` (unless nothing
        ran after the taps)."""
        with self.capture() as feats:
            self._stop = features_only
            try:
                y = fn(*args, **kwargs)
            except _FeaturesReady:
                y = None
                self._stopper.remove()
                self._stopper = None
                _finish_interrupted_wrappers(self.model, [self._store[n] for n in self.layers])
        return y, feats

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
