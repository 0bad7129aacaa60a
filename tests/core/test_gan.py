import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmd2.core import FeatureHooks, GANHead, gan_discriminator_loss, gan_generator_loss


@pytest.mark.parametrize("size", [1, 2, 3, 8, 17, 64])
def test_gan_head_logits_any_resolution_with_input_gradients(size):
    torch.manual_seed(0)
    head = GANHead([6, 10], hidden=16)
    f1 = torch.randn(3, 6, size, size, requires_grad=True)
    f2 = torch.randn(3, 10, max(1, size // 2), size, requires_grad=True)
    logits = head([f1, f2])
    assert logits.shape == (3,)
    logits.sum().backward()
    assert f1.grad.abs().sum() > 0 and f2.grad.abs().sum() > 0
    # per-sample: changing sample 0's features changes only logit 0
    f1b = f1.detach().clone()
    f1b[0] += 1.0
    l2 = head([f1b, f2.detach()])
    assert not torch.isclose(l2[0], logits[0]) and torch.allclose(l2[1:], logits[1:].detach())


def test_gan_head_bad_input():
    head = GANHead([4])
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        head([torch.randn(2, 5, 4, 4)])
    with pytest.raises(ValueError, match="expected 1 feature maps"):
        head([torch.randn(2, 4, 4, 4)] * 2)


def test_gan_losses_are_the_softplus_forms():
    f, r = torch.tensor([-2.0, 0.0, 3.0]), torch.tensor([1.0, -1.0, 0.5])
    torch.testing.assert_close(gan_generator_loss(f), torch.log1p(torch.exp(-f)))
    torch.testing.assert_close(gan_discriminator_loss(f, r), torch.log1p(torch.exp(f)) + torch.log1p(torch.exp(-r)))
    # the non-saturating generator loss decreases as D(fake) rises; the discriminator loss increases
    assert (gan_generator_loss(f + 1) < gan_generator_loss(f)).all()
    assert (gan_discriminator_loss(f + 1, r) > gan_discriminator_loss(f, r)).all()
    with pytest.raises(ValueError, match=r"\(B,\)"):
        gan_generator_loss(torch.zeros(3, 1))


def test_feature_hooks_capture_named_outputs_without_patching():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    forward_before = net.forward
    hooks = FeatureHooks(net, ["0", "2"])
    x = torch.randn(5, 3)
    y, feats = hooks.run(net, x)
    torch.testing.assert_close(feats[0], net[0](x))
    torch.testing.assert_close(feats[1], y)
    assert net.forward == forward_before
    net(x)  # outside run(): nothing recorded, no error
    with pytest.raises(ValueError, match="no submodule named"):
        FeatureHooks(net, ["mid_block"])
    hooks.remove()
    assert not net[0]._forward_hooks


# --- the official heads as GANHead instances; the exact 1x1 path; batch checks --------------------------------------
def _official(channels: int, down: int) -> nn.Sequential:
    """The official heads' layer sequence (tianweiy/DMD2 main/sd_guidance.py, main/edm/edm_guidance.py), written from
    its description: ``down`` x (conv 4/s2/p1, GroupNorm(32), SiLU), conv 4/s4/p0, GroupNorm(32), SiLU, conv 1x1 -> 1."""
    layers = []
    for stride, pad in [(2, 1)] * down + [(4, 0)]:
        layers += [nn.Conv2d(channels, channels, 4, stride, pad), nn.GroupNorm(32, channels), nn.SiLU()]
    return nn.Sequential(*layers, nn.Conv2d(channels, 1, 1))


def _load_into_official(head: GANHead, ref: nn.Sequential) -> None:
    blocks = [*head.branches[0], head.final[0]]
    for j, blk in enumerate(blocks):
        ref[3 * j].load_state_dict(blk.conv.state_dict())
        ref[3 * j + 1].load_state_dict(blk.norm.state_dict())
    ref[-1].weight.data.copy_(head.out[0].weight.data[:, :, None, None])
    ref[-1].bias.data.copy_(head.out[0].bias.data)


@pytest.mark.parametrize("name, channels, down, size, params", [
    ("sdxl", 1280, 3, 32, 104_874_241),    # mid block at 1024 px: 32 -> 16 -> 8 -> 4 -> 1
    ("imagenet", 768, 1, 8, 18_879_745),   # ADM bottleneck: 8 -> 4 -> 1
])
def test_official_heads_parameter_counts(name, channels, down, size, params):
    with torch.device("meta"):
        head = GANHead([channels], hidden=channels, depth=down, final_conv=True)
        ref = _official(channels, down)
    assert sum(p.numel() for p in head.parameters()) == params == sum(p.numel() for p in ref.parameters())
    assert [m.num_groups for m in head.modules() if isinstance(m, nn.GroupNorm)] == [32] * (down + 1)


@pytest.mark.parametrize("down, size", [(3, 32), (1, 8)])
def test_official_head_structure_gives_the_same_logits(down, size):
    """At width 256 (GroupNorm(32) as in the official heads), same weights -> same logits and input gradients."""
    torch.manual_seed(0)
    head = GANHead([256], hidden=256, depth=down, final_conv=True)
    ref = _official(256, down)
    _load_into_official(head, ref)
    x = torch.randn(3, 256, size, size, requires_grad=True)
    y = head([x])
    y_ref = ref(x).squeeze(dim=(1, 2, 3))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g, = torch.autograd.grad(y.sum(), x)
    g_ref, = torch.autograd.grad(y_ref.sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_final_conv_refuses_maps_too_small():
    head = GANHead([8], hidden=8, depth=2, final_conv=True)
    with pytest.raises(ValueError, match=r"at least 4x4.*\(2, 2\) after 2 stride-2 blocks"):
        head([torch.randn(2, 8, 8, 8)])
    assert head([torch.randn(2, 8, 16, 16)]).shape == (2,)
    with pytest.raises(ValueError, match="depth >= 1"):
        GANHead([8], depth=0)


@pytest.mark.parametrize("shape", [(256, 128, 1, 1), (256, 128)])
def test_one_by_one_features_take_the_exact_linear_path(shape):
    """A 1x1 map (or a (B, C) vector) through the padded 4x4 stride-1 conv reads only the centre tap: the head's
    linear path equals that conv, in value and in every gradient (fp64, so summation order does not blur it)."""
    torch.manual_seed(0)
    head = GANHead([128], hidden=64, depth=2).double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    def padded_conv_head(f):  # the same head with every block computed as the padded conv
        h = f.reshape(f.shape[0], f.shape[1], 1, 1)
        for blk in head.branches[0]:
            h = F.silu(blk.norm(F.conv2d(F.pad(h, (1, 2, 1, 2)), blk.conv.weight, blk.conv.bias)))
        return head.out[0](h.mean(dim=(2, 3))).squeeze(1)

    y, y_ref = head([x]), padded_conv_head(x).float()  # the head returns fp32 logits
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    params = [x, *head.parameters()]
    grads = torch.autograd.grad(y.sum(), params)
    grads_ref = torch.autograd.grad(y_ref.sum(), params)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gan_head_refuses_feature_maps_of_different_batch_sizes():
    head = GANHead([4, 4], hidden=8)
    with pytest.raises(ValueError, match=r"one batch size, got batch sizes \[1, 2\]"):
        head([torch.randn(1, 4, 4, 4), torch.randn(2, 4, 4, 4)])
