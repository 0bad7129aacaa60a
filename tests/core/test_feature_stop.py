"""Features-only passes (FeatureHooks.run(..., features_only=True)) end the forward after the last tapped layer:
the layers after the taps never run, and the features and every gradient through them are bit-identical to those
of the full forward - through EDM preconditioning + our ADM, a diffusers UNet2DConditionModel (mid-block tap), and
activation checkpointing."""
import pytest
import torch
from torch import nn

from dmd2.core import FeatureHooks
from dmd2.models.adm import ADMConfig, bottleneck_name, build_edm_adm
from dmd2.train.wrapping import _checkpointed


def _adm():
    torch.manual_seed(0)
    cfg = ADMConfig(img_resolution=16, img_channels=3, label_dim=10, model_channels=16, channel_mult=(1, 2),
                    num_blocks=1, attn_resolutions=(8,), channels_per_head=16, dropout=0.0)
    return build_edm_adm(cfg)


def _count_calls(modules):
    n = {"calls": 0}
    for m in modules:
        m.register_forward_pre_hook(lambda *a: n.__setitem__("calls", n["calls"] + 1))
    return n


def _features_and_grads(net, hooks, stop, x, sigma, labels):
    _, feats = hooks.run(net, x, sigma, labels, features_only=stop)
    loss = sum((f.float() ** 2).mean() for f in feats)
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    return [f.detach() for f in feats], grads


def _assert_same(a, b):
    fa, ga = a
    fb, gb = b
    assert all(torch.equal(x, y) for x, y in zip(fa, fb))
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_adm_bottleneck_pass_stops_and_matches_the_full_pass(checkpointing):
    net = _adm()
    if checkpointing:
        for m in net.model.modules():
            if type(m).__name__ == "UNetBlock":
                _checkpointed(m)
    tap = bottleneck_name(net)
    hooks = FeatureHooks(net, [tap])
    decoder = _count_calls(net.model.dec.values())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 16, 16, generator=g).requires_grad_()
    sigma, labels = torch.rand(4, generator=g) + 0.5, torch.arange(4)

    full = _features_and_grads(net, hooks, False, x, sigma, labels)
    assert decoder["calls"] > 0
    decoder["calls"] = 0
    stopped = _features_and_grads(net, hooks, True, x, sigma, labels)
    assert decoder["calls"] == 0                      # no decoder block ran
    _assert_same(full, stopped)                       # features, d/dx and d/dparams: bitwise
    assert any(g is not None and g.abs().sum() > 0 for g in stopped[1][1:])
    # the stop leaves nothing armed: the next full pass runs the decoder and returns the output
    y, feats = hooks.run(net, x, sigma, labels)
    assert y is not None and y.shape == x.shape and decoder["calls"] > 0
    assert not nn.modules.module._global_forward_pre_hooks


def test_stop_works_without_grad_and_without_capture_records_nothing():
    net = _adm()
    hooks = FeatureHooks(net, [bottleneck_name(net)])
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.ones(2), torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        y, feats = hooks.run(net, x, sigma, labels, features_only=True)
    assert y is None and feats[0].shape == (2, net.model.bottleneck_channels, 8, 8)
    assert net(x, sigma, labels).shape == x.shape      # a plain call outside run: untouched


def test_two_taps_stop_after_the_later_one():
    net = _adm()
    names = [n for n, m in net.model.enc.named_children()]
    hooks = FeatureHooks(net, [f"model.enc.{names[-1]}", f"model.enc.{names[1]}"])  # any order
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.ones(2), torch.zeros(2, dtype=torch.long)
    _, full = hooks.run(net, x, sigma, labels)
    _, stopped = hooks.run(net, x, sigma, labels, features_only=True)
    assert [f.shape for f in full] == [f.shape for f in stopped]
    assert all(torch.equal(a, b) for a, b in zip(full, stopped))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_diffusers_unet_mid_block_tap_runs_no_up_block(checkpointing):
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel

    from dmd2.core import VPSchedule
    from dmd2.models.sdxl import SDXLDenoiser, time_ids

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=(2, 4), cross_attention_dim=32, norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32)
    den = SDXLDenoiser(unet, VPSchedule.scaled_linear(), "epsilon")
    if checkpointing:
        den.enable_gradient_checkpointing()
    hooks = FeatureHooks(den, ["gan_tap"])
    up = _count_calls(unet.up_blocks)
    tail = _count_calls([unet.conv_norm_out, unet.conv_out])
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g).requires_grad_()
    t = torch.tensor([10, 700])
    cond = {"encoder_hidden_states": torch.randn(2, 5, 32, generator=g), "text_embeds": torch.randn(2, 32, generator=g),
            "time_ids": time_ids(64, 64, 2)}
    full = _features_and_grads(den, hooks, False, x, t, cond)
    assert up["calls"] == 2 and tail["calls"] == 2
    up["calls"] = tail["calls"] = 0
    stopped = _features_and_grads(den, hooks, True, x, t, cond)
    assert up["calls"] == 0 and tail["calls"] == 0
    assert stopped[0][0].shape == (2, 64, 4, 4)
    _assert_same(full, stopped)


def test_layer_names_must_be_distinct():
    net = _adm()
    with pytest.raises(ValueError, match="distinct"):
        FeatureHooks(net, [bottleneck_name(net)] * 2)


def test_an_exception_in_the_forward_disarms_the_stop():
    net = _adm()
    tap = bottleneck_name(net)
    hooks = FeatureHooks(net, [tap])

    def boom(module, args, output):  # runs after FeatureHooks' hook has armed the stop
        raise KeyError("boom")

    handle = dict(net.named_modules())[tap].register_forward_hook(boom)
    x, sigma, labels = torch.randn(1, 3, 16, 16), torch.ones(1), torch.zeros(1, dtype=torch.long)
    with pytest.raises(KeyError):
        hooks.run(net, x, sigma, labels, features_only=True)
    assert not nn.modules.module._global_forward_pre_hooks
    handle.remove()
    assert hooks.run(net, x, sigma, labels)[0].shape == x.shape
