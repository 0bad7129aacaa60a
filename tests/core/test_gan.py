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
