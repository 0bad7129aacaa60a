"""ADM UNet (EDM's DhariwalUNet): exact parameter names against the released network's manifest, and its math."""
import json
import math
from importlib import resources

import pytest
import torch
import torch.nn.functional as F

from dmd2.core.denoisers import EDMPrecond
from dmd2.core.gan import FeatureHooks
from dmd2.models.adm import (
    ADMConfig,
    ADMNet,
    EDMConv2d,
    PositionalEmbedding,
    UNetBlock,
    bottleneck_name,
    build_edm_adm,
    edm_imagenet64_config,
    small_adm_config,
)

TINY = ADMConfig(img_resolution=16, img_channels=3, label_dim=5, model_channels=16, channel_mult=(1, 2, 2),
                 channel_mult_emb=2, num_blocks=1, attn_resolutions=(8,), dropout=0.0, channels_per_head=8)


def manifest() -> dict:
    return json.loads(resources.files("dmd2.models").joinpath("manifests/edm_imagenet64_adm.json").read_text())


def randomise(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """EDM zero-initialises the last layer of every branch; give all parameters values so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return net


def test_manifest_names_shapes_and_count_match_edm_exactly():
    m = manifest()
    cfg = m["config"]
    assert ADMConfig.from_dict(cfg, ignore=("sigma_data",)) == edm_imagenet64_config()
    net = build_edm_adm(edm_imagenet64_config(), sigma_data=cfg["sigma_data"], device="meta")
    sd = net.state_dict()
    ours = {k: list(v.shape) for k, v in sd.items()}
    assert ours == m["tensors"]
    assert list(ours) == list(m["tensors"])  # same order too
    assert len(sd) == m["num_tensors"] == 553
    assert sum(v.numel() for v in sd.values()) == m["num_parameters"] == 295_899_315
    # the 12 resample filters (4 elements each) are buffers; the rest are parameters
    assert sum(p.numel() for p in net.parameters()) == 295_899_315 - 48
    assert all(v.device.type == "meta" for v in sd.values())
    assert net.sigma_data == 0.5 and net.label_dim == 1000
    assert bottleneck_name(net) == "model.enc.8x8_block2"
    assert net.model.bottleneck_channels == 768


def test_forward_shapes_dtype_and_zero_init_output():
    torch.manual_seed(0)
    net = ADMNet(TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    labels = F.one_hot(torch.tensor([1, 4]), 5).float()
    out = net(x, torch.tensor([0.1, -0.5]), labels)
    assert out.shape == x.shape and out.dtype == x.dtype
    # EDM initialises out_conv to zero: a fresh network outputs exactly 0
    assert torch.equal(out, torch.zeros_like(out))
    randomise(net)
    out = net(x, torch.tensor([0.1, -0.5]), labels)
    assert out.abs().mean() > 1e-3 and torch.isfinite(out).all()


def test_noise_and_class_conditioning_and_none_is_zero_label():
    net = randomise(ADMNet(TINY)).eval()
    x = torch.randn(2, 3, 16, 16)
    c = torch.tensor([0.2, 0.2])
    a = net(x, c, F.one_hot(torch.tensor([0, 0]), 5).float())
    b = net(x, c, F.one_hot(torch.tensor([3, 3]), 5).float())
    assert (a - b).abs().max() > 1e-3
    assert (net(x, c + 1.0, F.one_hot(torch.tensor([0, 0]), 5).float()) - a).abs().max() > 1e-3
    torch.testing.assert_close(net(x, c, None), net(x, c, torch.zeros(2, 5)), rtol=0, atol=0)
    # per-sample independence: sample 0's output does not depend on sample 1
    x2 = x.clone()
    x2[1] = torch.randn(3, 16, 16)
    torch.testing.assert_close(net(x2, c, None)[0], net(x, c, None)[0], rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_value_error():
    net = ADMNet(TINY)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="x must be"):
        net(torch.randn(2, 1, 16, 16), torch.zeros(2))
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(2, 3, 18, 18), torch.zeros(2))
    with pytest.raises(ValueError, match="noise_labels"):
        net(x, torch.zeros(2, 1))
    with pytest.raises(ValueError, match="class_labels"):
        net(x, torch.zeros(2), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="class_labels"):
        net(x, torch.zeros(2), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="unconditional"):
        ADMNet(ADMConfig(**{**TINY.to_dict(), "label_dim": 0}))(x, torch.zeros(2), torch.zeros(2, 5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(img_resolution=18, channel_mult=(1, 2, 2)), "divisible"),
        (dict(model_channels=14), "groups"),
        (dict(channels_per_head=12), "channels_per_head"),
        (dict(dropout=1.0), "dropout"),
        (dict(channel_mult=()), "channel_mult"),
        (dict(label_dim=-1), "label_dim"),
    ],
)
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ADMNet(ADMConfig(**{**TINY.to_dict(), **kwargs}))


def test_unconditional_and_mnist_configs():
    net = ADMNet(ADMConfig(**{**TINY.to_dict(), "label_dim": 0}))
    assert net.map_label is None and not any("map_label" in k for k in net.state_dict())
    mn = randomise(ADMNet(small_adm_config())).eval()
    x = torch.randn(3, 1, 32, 32)
    out = mn(x, torch.zeros(3), F.one_hot(torch.tensor([0, 5, 9]), 10).float())
    assert out.shape == (3, 1, 32, 32)
    assert mn.bottleneck_name == "enc.8x8_block1"
    assert isinstance(mn.bottleneck_module, UNetBlock)
    # MNIST config has attention at 8x8 (32 channels per head, 64 channels -> 2 heads)
    assert mn.enc["8x8_block0"].num_heads == 2


def test_positional_embedding_formula():
    emb = PositionalEmbedding(8)(torch.tensor([0.0, 2.0]))
    freqs = torch.tensor([10000 ** (-j / 4) for j in range(4)])
    expected = torch.cat([torch.cos(2.0 * freqs), torch.sin(2.0 * freqs)])
    torch.testing.assert_close(emb[1], expected)
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(4), torch.zeros(4)]))


def test_resamplers_are_mean_pool_and_nearest_upsample():
    x = torch.randn(2, 3, 6, 8)
    down = EDMConv2d(3, 3, kernel=0, down=True)
    up = EDMConv2d(3, 3, kernel=0, up=True)
    assert dict(down.named_parameters()) == {} and down.resample_filter.shape == (1, 1, 2, 2)
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(up(x), F.interpolate(x, scale_factor=2, mode="nearest"))


def test_attention_matches_edm_formula_and_qkv_layout():
    """EDM: qkv(norm2(x)) reshaped (B*heads, C/heads, 3, HW); w = softmax_k(q.k / sqrt(C/heads)); a = sum_k w v."""
    torch.manual_seed(1)
    blk = randomise(UNetBlock(16, 16, emb_channels=8, attention=True, channels_per_head=4), seed=3).double()
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    emb = torch.randn(2, 8, dtype=torch.float64)
    captured = {}
    blk.proj.register_forward_pre_hook(lambda m, args: captured.update(a=args[0]))
    out = blk(x, emb)
    # recompute the residual part without attention, then attention by the explicit formula
    h = blk.conv0(F.silu(blk.norm0(x)))
    scale, shift = blk.affine(emb)[:, :, None, None].chunk(2, dim=1)
    h = blk.conv1(F.silu(blk.norm1(h) * (scale + 1) + shift)) + x
    heads, c = 4, 4
    qkv = blk.qkv(blk.norm2(h)).reshape(2 * heads, c, 3, 16)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(c)).softmax(dim=2)
    a = torch.einsum("nqk,nck->ncq", w, v).reshape(2, 16, 4, 4)
    torch.testing.assert_close(captured["a"], a)
    torch.testing.assert_close(out, blk.proj(a) + h)


def test_bottleneck_hook_is_decoder_input():
    den = EDMPrecond(randomise(ADMNet(TINY)).eval(), sigma_data=0.5, label_dim=5)
    name = bottleneck_name(den)
    assert name == "model.enc.4x4_block0"
    seen = {}
    den.model.dec["4x4_in0"].register_forward_pre_hook(lambda m, args: seen.update(dec_in=args[0]))
    hooks = FeatureHooks(den, [name])
    x = torch.randn(2, 3, 16, 16)
    x0, feats = hooks.run(den, x, torch.tensor([1.0, 3.0]), torch.tensor([1, 2]))
    assert x0.shape == x.shape
    assert feats[0].shape == (2, den.model.bottleneck_channels, 4, 4) == (2, 32, 4, 4)
    torch.testing.assert_close(feats[0], seen["dec_in"], rtol=0, atol=0)


def test_dropout_only_in_training():
    cfg = ADMConfig(**{**TINY.to_dict(), "dropout": 0.5})
    net = randomise(ADMNet(cfg))
    x, c = torch.randn(2, 3, 16, 16), torch.zeros(2)
    net.eval()
    torch.testing.assert_close(net(x, c), net(x, c), rtol=0, atol=0)
    net.train()
    torch.manual_seed(0)
    a = net(x, c)
    torch.manual_seed(1)
    assert (a - net(x, c)).abs().max() > 1e-4


def test_bf16_close_to_fp32_and_grads_flow():
    net = randomise(ADMNet(TINY)).eval()
    x, c = torch.randn(2, 3, 16, 16), torch.tensor([0.3, -0.2])
    lab = F.one_hot(torch.tensor([2, 0]), 5).float()
    ref = net(x, c, lab)
    out = net(x.bfloat16(), c, lab)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 0.05
    net(x, c, lab).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
