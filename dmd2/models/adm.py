r"""The ADM UNet (Dhariwal & Nichol 2021) as EDM uses it for ImageNet-64, with EDM's parameter names.

This is the raw network ``F`` of EDM (Karras et al. 2022, arXiv 2206.00364, Table 1 / App. B.7: "ADM" column) that
EDM's preconditioning wraps: ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, y)`` with ``c_noise = ln(sigma) / 4``.
DMD2 (Yin et al. 2024, Sec. 5.1) distils EDM's ``edm-imagenet-64x64-cond-adm`` checkpoint, so the module tree and
every parameter / buffer name here equals the ``ema`` network of that pickle (``DhariwalUNet`` in EDM's code):

* mapping: ``map_noise`` (sinusoidal, no parameters), ``map_augment`` (optional), ``map_layer0``, ``map_layer1``,
  ``map_label`` (class embedding, a bias-free linear map of the one-hot label);
* encoder ``enc``: at level ``l`` (resolution ``R = img_resolution >> l``) ``{R}x{R}_conv`` (level 0) or
  ``{R}x{R}_down`` (a down-sampling :class:`UNetBlock`), then ``{R}x{R}_block{i}``, ``i < num_blocks``;
* decoder ``dec``: at the lowest resolution ``{R}x{R}_in0`` (with attention) and ``{R}x{R}_in1``, elsewhere
  ``{R}x{R}_up``; then ``{R}x{R}_block{i}``, ``i <= num_blocks``, each concatenating one encoder skip;
* ``out_norm``, ``out_conv``.

Shapes: ``x (B, C, H, W)``, ``noise_labels (B,)``, ``class_labels (B, label_dim)`` float (one-hot or a mixture) or
None -> ``F (B, C, H, W)`` in ``x.dtype``. Weights are cast to the input's dtype in every layer (EDM's mixed-precision
style); the attention softmax runs in fp32 via ``scaled_dot_product_attention`` on fp32 inputs.

The GAN head of DMD2 reads the *bottleneck*: :attr:`ADMNet.bottleneck_name` is the last encoder block at the lowest
resolution (``enc.8x8_block2`` for ImageNet-64), the input of the decoder's middle blocks ``in0``/``in1``; hook it with
:class:`dmd2.core.gan.FeatureHooks` (inside :class:`~dmd2.core.denoisers.EDMPrecond` its name gets the ``model.``
prefix: :func:`bottleneck_name` of the wrapper).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ADMConfig",
    "ADMNet",
    "UNetBlock",
    "PositionalEmbedding",
    "edm_imagenet64_config",
    "small_adm_config",
    "build_edm_adm",
    "bottleneck_name",
    "EDM_IMAGENET64_SIGMA_DATA",
]

EDM_IMAGENET64_SIGMA_DATA = 0.5


@dataclass(frozen=True)
class ADMConfig:
    """Size and conditioning of an :class:`ADMNet` (EDM's ``DhariwalUNet`` keyword names).

    Args:
        img_resolution: input height = width (must be divisible by ``2 ** (len(channel_mult) - 1)``).
        img_channels: input = output channels.
        label_dim: number of classes; 0 = unconditional (no ``map_label``).
        model_channels: base width; level ``l`` has ``model_channels * channel_mult[l]`` channels.
        channel_mult: per-level width multipliers, highest resolution first.
        channel_mult_emb: embedding width = ``model_channels * channel_mult_emb``.
        num_blocks: residual blocks per encoder level (the decoder has one more).
        attn_resolutions: resolutions whose blocks carry self-attention (the decoder's ``in0`` always does).
        dropout: dropout before each block's second convolution (training only).
        label_dropout: probability of zeroing the class label per sample in training (classifier-free guidance).
        augment_dim: size of EDM's augmentation labels (0 = no ``map_augment``).
        channels_per_head: attention head width (EDM: 64); heads = channels // channels_per_head.
    """

    img_resolution: int = 64
    img_channels: int = 3
    label_dim: int = 0
    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    channel_mult_emb: int = 4
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (32, 16, 8)
    dropout: float = 0.10
    label_dropout: float = 0.0
    augment_dim: int = 0
    channels_per_head: int = 64

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        for name in ("img_resolution", "img_channels", "model_channels", "channel_mult_emb", "num_blocks",
                     "channels_per_head"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ADMConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("label_dim", "augment_dim"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"ADMConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"ADMConfig.channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.img_resolution % factor:
            raise ValueError(
                f"ADMConfig.img_resolution={self.img_resolution} must be divisible by 2**(levels-1)={factor}"
            )
        for name in ("dropout", "label_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"ADMConfig.{name} must be in [0, 1), got {p}")

    @property
    def lowest_resolution(self) -> int:
        return self.img_resolution >> (len(self.channel_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> "ADMConfig":
        """Build from a mapping of field names; keys in ``ignore`` are skipped, any other unknown key is an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if k not in known and k not in ignore)
        if unknown:
            raise ValueError(f"ADMConfig: unknown keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known})


def edm_imagenet64_config() -> ADMConfig:
    """The configuration of EDM's ``edm-imagenet-64x64-cond-adm.pkl`` network (295,899,315 tensor elements)."""
    return ADMConfig(
        img_resolution=64, img_channels=3, label_dim=1000, model_channels=192, channel_mult=(1, 2, 3, 4),
        channel_mult_emb=4, num_blocks=3, attn_resolutions=(32, 16, 8), dropout=0.10, label_dropout=0.0,
        augment_dim=0,
    )


def small_adm_config(label_dim: int = 10) -> ADMConfig:
    """A small ADM at 32x32, one channel, ``label_dim`` classes (0 = unconditional): 2 blocks per level, widths 32,
    64, 64, attention at 8x8 (a test-sized network; the MNIST teacher's is
    :func:`dmd2.recipes.mnist_teacher.teacher_adm_config`)."""
    return ADMConfig(
        img_resolution=32, img_channels=1, label_dim=label_dim, model_channels=32, channel_mult=(1, 2, 2),
        channel_mult_emb=4, num_blocks=2, attn_resolutions=(8,), dropout=0.1, channels_per_head=32,
    )


# --------------------------------------------------------------------------------------------------------------------
# Layers. EDM's initialisation: weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) ("kaiming_uniform" scaled by
# sqrt(1/3)); the last convolution of each residual branch and of the network starts at zero; the class embedding is
# N(0, 1) (kaiming_normal scaled by sqrt(label_dim)).


def _uniform_fan_in(shape, fan_in: int, gain: float, device=None) -> torch.Tensor:
    bound = gain / math.sqrt(fan_in)
    return (torch.rand(shape, device=device) * 2 - 1) * bound


class EDMLinear(nn.Module):
    """``y = x W^T + b`` with EDM's parameter names (``weight (out, in)``, ``bias (out,)``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init: str = "uniform"):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        if init == "uniform":
            w = _uniform_fan_in((out_features, in_features), in_features, 1.0)
        elif init == "zero":
            w = torch.zeros(out_features, in_features)
        elif init == "normal":  # EDM's map_label: kaiming_normal * sqrt(in) == N(0, 1)
            w = torch.randn(out_features, in_features)
        else:
            raise ValueError(f"init must be 'uniform', 'zero' or 'normal', got {init!r}")
        self.weight = nn.Parameter(w)
        if bias:
            b = torch.zeros(out_features) if init == "zero" else _uniform_fan_in((out_features,), in_features, 1.0)
            self.bias = nn.Parameter(b)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), b)


class EDMConv2d(nn.Module):
    """Convolution with optional 2x nearest up-sampling or 2x2 average down-sampling before it.

    ``kernel == 0`` makes a parameter-free resampler (EDM's skip path of up/down blocks). The resampling filter is the
    persistent buffer ``resample_filter (1, 1, 2, 2) = 1/4`` (EDM's name), present only when ``up`` or ``down``:
    down = depthwise stride-2 convolution with it (2x2 mean), up = depthwise stride-2 transposed convolution with
    ``4 * filter`` (each pixel copied to a 2x2 block).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, init: str = "uniform"):
        super().__init__()
        if up and down:
            raise ValueError("EDMConv2d: up and down are exclusive")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        if kernel:
            fan_in = in_channels * kernel * kernel
            shape = (out_channels, in_channels, kernel, kernel)
            zero = init == "zero"
            self.weight = nn.Parameter(torch.zeros(shape) if zero else _uniform_fan_in(shape, fan_in, 1.0))
            if bias:
                self.bias = nn.Parameter(torch.zeros(out_channels) if zero else _uniform_fan_in((out_channels,), fan_in, 1.0))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if up or down:
            self.register_buffer("resample_filter", torch.full((1, 1, 2, 2), 0.25))
        else:
            self.resample_filter = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up or self.down:
            f = self.resample_filter.to(x.dtype).expand(self.in_channels, 1, 2, 2)
            if self.up:
                x = F.conv_transpose2d(x, f * 4, groups=self.in_channels, stride=2)
            else:
                x = F.conv2d(x, f, groups=self.in_channels, stride=2)
        if self.weight is not None:
            b = None if self.bias is None else self.bias.to(x.dtype)
            x = F.conv2d(x, self.weight.to(x.dtype), b, padding=self.weight.shape[-1] // 2)
        return x


class EDMGroupNorm(nn.Module):
    """Group normalisation with ``min(32, C // 4)`` groups (EDM's rule), affine ``weight``/``bias`` of shape (C,)."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        if self.num_groups < 1 or num_channels % self.num_groups:
            raise ValueError(
                f"EDMGroupNorm: {num_channels} channels cannot be split into min(32, C//4)={self.num_groups} equal "
                f"groups; choose model_channels / channel_mult so that every width (and every decoder concatenation) "
                f"is divisible by its group count"
            )
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class PositionalEmbedding(nn.Module):
    r"""Sinusoidal embedding of the noise level: ``[cos(c f_j), sin(c f_j)]``, ``f_j = (1/10000)^(j / (N/2))``,
    ``j < N/2`` (EDM's ``endpoint=False``). ``(B,) -> (B, N)``; no parameters."""

    def __init__(self, num_channels: int, max_positions: int = 10000):
        super().__init__()
        if num_channels % 2:
            raise ValueError(f"PositionalEmbedding: num_channels must be even, got {num_channels}")
        self.num_channels = num_channels
        self.max_positions = max_positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = (1.0 / self.max_positions) ** (torch.arange(half, dtype=torch.float32, device=x.device) / half)
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class UNetBlock(nn.Module):
    r"""ADM residual block with adaptive group-norm scale/shift and optional self-attention.

    ``h = conv0(silu(norm0(x)))`` (resampled first if up/down); ``(s, b) = affine(emb)``;
    ``h = conv1(dropout(silu(norm1(h) * (1 + s) + b))) + skip(x)``; with attention (``heads = C // channels_per_head``)
    ``h = h + proj(attn(qkv(norm2(h))))``. The ``qkv`` output channels are laid out as ``(head, c_per_head, 3)``
    (EDM's layout; it matters for loading its weights).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, channels_per_head: int = 64, dropout: float = 0.0, eps: float = 1e-5):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        if attention:
            if out_channels % channels_per_head:
                raise ValueError(
                    f"UNetBlock: attention needs out_channels={out_channels} divisible by "
                    f"channels_per_head={channels_per_head}"
                )
            self.num_heads = out_channels // channels_per_head
        else:
            self.num_heads = 0
        self.norm0 = EDMGroupNorm(in_channels, eps=eps)
        self.conv0 = EDMConv2d(in_channels, out_channels, kernel=3, up=up, down=down)
        self.affine = EDMLinear(emb_channels, out_channels * 2)
        self.norm1 = EDMGroupNorm(out_channels, eps=eps)
        self.conv1 = EDMConv2d(out_channels, out_channels, kernel=3, init="zero")
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if out_channels != in_channels else 0
            self.skip = EDMConv2d(in_channels, out_channels, kernel=kernel, up=up, down=down)
        if self.num_heads:
            self.norm2 = EDMGroupNorm(out_channels, eps=eps)
            self.qkv = EDMConv2d(out_channels, out_channels * 3, kernel=1)
            self.proj = EDMConv2d(out_channels, out_channels, kernel=1, init="zero")

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb).to(x.dtype)[:, :, None, None].chunk(2, dim=1)
        x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        if self.num_heads:
            b, c, h, w = x.shape
            qkv = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, h * w)
            dt = torch.promote_types(x.dtype, torch.float32)  # softmax in at least fp32 (EDM)
            q, k, v = (t.transpose(1, 2).to(dt) for t in qkv.unbind(2))  # (B*heads, N, c_head)
            a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c_head)) v
            x = self.proj(a.to(x.dtype).transpose(1, 2).reshape(b, c, h, w)) + x
        return x


class ADMNet(nn.Module):
    """EDM's ADM UNet (``DhariwalUNet``): ``net(x, noise_labels, class_labels=None) -> F``.

    Args:
        config: :class:`ADMConfig`.

    Forward:
        x: ``(B, img_channels, H, W)``, ``H`` and ``W`` divisible by ``2 ** (levels - 1)``.
        noise_labels: ``(B,)`` (EDM passes ``c_noise = ln(sigma) / 4``).
        class_labels: ``(B, label_dim)`` float (one-hot) or None. For a conditional net None means the zero label
            (no class embedding, as EDM's preconditioning does for missing labels); an unconditional net refuses labels.
        augment_labels: ``(B, augment_dim)`` or None (only when ``augment_dim > 0``).

    Returns ``F`` with the shape and dtype of ``x``.
    """

    def __init__(self, config: ADMConfig):
        super().__init__()
        if not isinstance(config, ADMConfig):
            raise ValueError(f"ADMNet expects an ADMConfig, got {type(config).__name__}")
        self.config = config
        c = config
        emb_channels = c.model_channels * c.channel_mult_emb
        block = dict(emb_channels=emb_channels, channels_per_head=c.channels_per_head, dropout=c.dropout)

        self.map_noise = PositionalEmbedding(c.model_channels)
        self.map_augment = EDMLinear(c.augment_dim, c.model_channels, bias=False, init="zero") if c.augment_dim else None
        self.map_layer0 = EDMLinear(c.model_channels, emb_channels)
        self.map_layer1 = EDMLinear(emb_channels, emb_channels)
        self.map_label = EDMLinear(c.label_dim, emb_channels, bias=False, init="normal") if c.label_dim else None

        self.enc = nn.ModuleDict()
        skips: list[int] = []
        cout = c.img_channels
        for level, mult in enumerate(c.channel_mult):
            res = c.img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = EDMConv2d(cout, c.model_channels * mult, kernel=3)
                cout = c.model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            skips.append(cout)
            for i in range(c.num_blocks):
                cin, cout = cout, c.model_channels * mult
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, attention=res in c.attn_resolutions, **block)
                skips.append(cout)
        low = c.lowest_resolution
        self._bottleneck_name = f"enc.{low}x{low}_block{c.num_blocks - 1}"
        self.bottleneck_channels = cout

        self.dec = nn.ModuleDict()
        self._dec_takes_skip: list[bool] = []
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            res = c.img_resolution >> level
            if level == len(c.channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
                self._dec_takes_skip += [False, False]
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
                self._dec_takes_skip.append(False)
            for i in range(c.num_blocks + 1):
                cin, cout = cout + skips.pop(), c.model_channels * mult
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, attention=res in c.attn_resolutions, **block)
                self._dec_takes_skip.append(True)
        self.out_norm = EDMGroupNorm(cout)
        self.out_conv = EDMConv2d(cout, c.img_channels, kernel=3, init="zero")

    @property
    def bottleneck_name(self) -> str:
        """Module name of the bottleneck (the last encoder block at the lowest resolution, e.g. ``enc.8x8_block2``);
        its output ``(B, bottleneck_channels, R_low, R_low)`` feeds the GAN head. Inside ``EDMPrecond`` prefix ``model.``."""
        return self._bottleneck_name

    @property
    def bottleneck_module(self) -> nn.Module:
        return self.get_submodule(self._bottleneck_name)

    def _check_inputs(self, x, noise_labels, class_labels, augment_labels):
        c = self.config
        factor = 2 ** (len(c.channel_mult) - 1)
        if x.dim() != 4 or x.shape[1] != c.img_channels or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"ADMNet: x must be (B, {c.img_channels}, H, W) with H, W divisible by {factor}, got {tuple(x.shape)}"
            )
        b = x.shape[0]
        if noise_labels.shape != (b,):
            raise ValueError(f"ADMNet: noise_labels must have shape ({b},), got {tuple(noise_labels.shape)}")
        if c.label_dim == 0 and class_labels is not None:
            raise ValueError("ADMNet: unconditional network (label_dim=0) got class_labels")
        if class_labels is not None and (class_labels.shape != (b, c.label_dim) or not class_labels.is_floating_point()):
            raise ValueError(
                f"ADMNet: class_labels must be a float one-hot tensor of shape ({b}, {c.label_dim}), got "
                f"{tuple(class_labels.shape)} {class_labels.dtype}"
            )
        if augment_labels is not None and (c.augment_dim == 0 or augment_labels.shape != (b, c.augment_dim)):
            raise ValueError(
                f"ADMNet: augment_labels must be ({b}, {c.augment_dim}) and need augment_dim > 0, got "
                f"{tuple(augment_labels.shape)} with augment_dim={c.augment_dim}"
            )

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(x, noise_labels, class_labels, augment_labels)
        emb = self.map_noise(noise_labels.float())
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None and class_labels is not None:
            labels = class_labels.to(emb.dtype)
            if self.training and self.config.label_dropout:
                keep = torch.rand(x.shape[0], 1, device=x.device) >= self.config.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        emb = F.silu(emb)

        skips = []
        for name, block in self.enc.items():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for takes_skip, block in zip(self._dec_takes_skip, self.dec.values()):
            if takes_skip:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


def bottleneck_name(module: nn.Module) -> str:
    """Name of the ADM bottleneck inside ``module`` (an :class:`ADMNet`, or a wrapper holding one, e.g.
    ``EDMPrecond`` -> ``"model.enc.8x8_block2"``), for :class:`dmd2.core.gan.FeatureHooks`."""
    for name, sub in module.named_modules():
        if isinstance(sub, ADMNet):
            return f"{name}.{sub.bottleneck_name}" if name else sub.bottleneck_name
    raise ValueError(f"bottleneck_name: no ADMNet inside {type(module).__name__}")


def build_edm_adm(config: ADMConfig, sigma_data: float = EDM_IMAGENET64_SIGMA_DATA,
                  device: torch.device | str | None = None) -> nn.Module:
    """``EDMPrecond(ADMNet(config), sigma_data, label_dim)``: the denoiser ``D(x_t, sigma, cond) -> x0``.

    Its state-dict keys are EDM's (``model.map_layer0.weight``, ...). ``device="meta"`` builds it without memory.
    """
    from ..core.denoisers import EDMPrecond

    with torch.device(device) if device is not None else contextlib.nullcontext():
        net = ADMNet(config)
    return EDMPrecond(net, sigma_data=sigma_data, label_dim=config.label_dim)

