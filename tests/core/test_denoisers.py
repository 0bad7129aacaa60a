import re

import pytest
import torch
from torch import nn

from dmd2.core import CFGDenoiser, DiffusersDenoiser, EDMPrecond, EDMSchedule, VPSchedule


class Affine(nn.Module):
    """F(x, c_noise, labels) = w * x + c_noise (+ labels @ v): a network whose output we can write down."""

    def __init__(self, label_dim=0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))
        self.v = nn.Parameter(torch.arange(label_dim, dtype=torch.float32)) if label_dim else None
        self.seen = None

    def forward(self, x, c_noise, labels=None):
        self.seen = (x, c_noise, labels)
        out = self.w * x + c_noise[:, None, None, None]
        if labels is not None:
            out = out + (labels @ self.v)[:, None, None, None]
        return out


def test_edm_precond_matches_edm_formulas():
    net = Affine(label_dim=4)
    d = EDMPrecond(net, sigma_data=0.5, label_dim=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g)
    sigma = torch.tensor([0.002, 0.5, 80.0])
    y = torch.tensor([0, 3, 1])
    out = d(x, sigma, y)
    s = sigma[:, None, None, None]
    c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25).sqrt(), 1 / (s**2 + 0.25).sqrt()
    c_noise = sigma.log() / 4
    F = 0.7 * (c_in * x) + c_noise[:, None, None, None] + y.float()[:, None, None, None]
    torch.testing.assert_close(out, c_skip * x + c_out * F)
    torch.testing.assert_close(net.seen[1], c_noise)
    assert torch.equal(net.seen[2], nn.functional.one_hot(y, 4).float())
    assert [n for n, _ in d.named_parameters()] == ["model.w", "model.v"]  # EDM's names: "model." prefix
    with pytest.raises(ValueError, match="class labels"):
        d(x, sigma, None)
    with pytest.raises(ValueError, match="sigma must have shape"):
        d(x, sigma[:2], y)


def tiny_unet2d():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)


def tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, cross_attention_dim=12, attention_head_dim=2, transformer_layers_per_block=1,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 10,
    )


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_diffusers_unet2d_prediction_types(pred):
    torch.manual_seed(0)
    unet = tiny_unet2d().eval()
    s = VPSchedule.scaled_linear()
    d = DiffusersDenoiser(unet, s, prediction_type=pred)
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        raw = unet(x, t).sample
        out = d(x, t)
    a, sg = s.alpha(t)[:, None, None, None], s.sigma(t)[:, None, None, None]
    expected = {"epsilon": (x - sg * raw) / a, "v_prediction": a * x - sg * raw, "sample": raw}[pred]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_diffusers_sdxl_added_conditions_through_cond():
    torch.manual_seed(0)
    unet = tiny_sdxl_unet().eval()
    s = VPSchedule.scaled_linear()
    d = DiffusersDenoiser(unet, s)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 249])
    cond = {"encoder_hidden_states": torch.randn(2, 5, 12), "text_embeds": torch.randn(2, 10), "time_ids": torch.randn(2, 6)}
    with torch.no_grad():
        eps = unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"],
                   added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}).sample
        out = d(x, t, cond)
        other = d(x, t, {**cond, "text_embeds": torch.randn(2, 10)})
    torch.testing.assert_close(out, s.x0_from_eps(x, eps, t))
    assert not torch.allclose(out, other)  # the pooled embedding reaches the network
    with pytest.raises(ValueError, match="unknown cond keys"):
        d(x, t, {"encoder_hidden_states": cond["encoder_hidden_states"], "pooled": cond["text_embeds"]})
    with pytest.raises(ValueError, match="both"):
        d(x, t, {"encoder_hidden_states": cond["encoder_hidden_states"], "text_embeds": cond["text_embeds"]})


class Recorder(nn.Module):
    """D(x, t, cond) = x * cond_scale: records every call's batch size."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, cond):
        self.calls.append(x.shape[0])
        return x * cond[:, None]


@pytest.mark.parametrize("scale", [0.0, 1.0, 8.0])
def test_cfg_denoiser_one_batched_call(scale):
    rec = Recorder()
    d = CFGDenoiser(rec, scale, uncond=torch.zeros(1))
    x = torch.randn(3, 5)
    cond = torch.tensor([1.0, 2.0, 3.0])
    out = d(x, torch.tensor([1, 2, 3]), cond)
    assert rec.calls == [6]  # cond and uncond in ONE forward of 2B
    u, c = torch.zeros_like(x), x * cond[:, None]
    torch.testing.assert_close(out, u + scale * (c - u))


def test_cfg_scale_shapes():
    """A (B,) scale is per sample even when B equals the last dimension; other non-broadcast shapes are refused."""
    from dmd2.core import cfg

    u, c = torch.zeros(4, 3, 4, 4), torch.ones(4, 3, 4, 4)
    s = torch.tensor([1.0, 2.0, 3.0, 4.0])  # B == width == 4
    out = cfg(u, c, s)
    torch.testing.assert_close(out, s.view(4, 1, 1, 1).expand(4, 3, 4, 4))  # per sample, not along the width
    torch.testing.assert_close(cfg(u, c, s.view(4, 1, 1, 1)), out)
    torch.testing.assert_close(cfg(u, c, torch.tensor(2.0)), 2 * c)
    for bad in [(4, 4), (3,), (4, 1, 1), (2, 1, 1, 1), (1, 1, 1, 1, 1)]:
        with pytest.raises(ValueError, match=rf"cfg: scale must be .* got {re.escape(str(bad))}"):
            cfg(u, c, torch.ones(bad))
