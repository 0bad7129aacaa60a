"""The shipped MNIST classifier: loads, >= 98% on the held-out split, features usable for FID."""
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from dmd2.data.mnist import load_mnist
from dmd2.eval import mnist_classifier as mc
from dmd2.eval.metrics import frechet_distance_from_features


@pytest.fixture(scope="module")
def heldout():
    return load_mnist("heldout")


def test_shipped_checkpoint_reaches_98_percent_on_heldout(heldout):
    x, y = heldout
    feats, logits = mc.mnist_features(x)
    acc = float((logits.argmax(1) == y).double().mean())
    assert acc >= 0.98, f"held-out accuracy {acc:.4f}"
    # per class too: no class is sacrificed
    for c in range(10):
        assert float((logits[y == c].argmax(1) == c).double().mean()) >= 0.95


def test_shipped_record_matches_checkpoint(heldout):
    record = json.loads(mc.DEFAULT_CHECKPOINT.with_suffix(".json").read_text())
    assert record["sha256"] == hashlib.sha256(mc.DEFAULT_CHECKPOINT.read_bytes()).hexdigest()
    acc, correct = mc.heldout_accuracy(mc.load_classifier())
    assert abs(correct - record["heldout_correct"]) <= 2  # same weights; argmax ties may flip with thread count
    assert record["heldout_accuracy"] >= 0.98 and record["train_split_size"] == 4000
    assert record["num_parameters"] == sum(p.numel() for p in mc.MNISTClassifier().parameters())


def test_feature_and_logit_shapes_devices_and_batching(heldout):
    x = heldout[0][:37]
    feats, logits = mc.mnist_features(x)
    assert feats.shape == (37, mc.FEATURE_DIM) and logits.shape == (37, 10)
    assert feats.dtype == logits.dtype == torch.float32 and feats.device == x.device
    f7, l7 = mc.mnist_features(x, batch_size=7)
    torch.testing.assert_close(f7, feats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l7, logits, rtol=1e-5, atol=1e-5)
    # logits are the linear head applied to the features
    model = mc.load_classifier()
    torch.testing.assert_close(model.head(feats), logits, rtol=1e-5, atol=1e-5)
    # cached: the same module object on repeated calls
    assert mc._cached_classifier(str(mc.DEFAULT_CHECKPOINT), "cpu") is mc._cached_classifier(str(mc.DEFAULT_CHECKPOINT), "cpu")


def test_fid_heldout_vs_train_is_small_relative_to_noise(heldout):
    x_tr, _ = load_mnist("train")
    f_ho, _ = mc.mnist_features(heldout[0])
    f_tr, _ = mc.mnist_features(x_tr[torch.randperm(4000, generator=torch.Generator().manual_seed(0))[:1000]])
    noise = torch.rand(1000, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    f_noise, _ = mc.mnist_features(noise)
    fid_real = frechet_distance_from_features(f_ho, f_tr)
    fid_noise = frechet_distance_from_features(f_ho, f_noise)
    assert fid_real < 0.05 * fid_noise, (fid_real, fid_noise)


def test_random_affine_identity_and_background():
    x, _ = load_mnist("heldout")
    x = x[:8]
    ident = mc.ClassifierTrainConfig(rot_deg=0.0, scale=0.0, shear=0.0, shift_px=0.0)
    torch.testing.assert_close(mc.random_affine(x, ident, torch.Generator().manual_seed(0)), x, rtol=0, atol=1e-5)
    y = mc.random_affine(x, mc.ClassifierTrainConfig(), torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= -1.0 - 1e-6 and y.max() <= 1.0 + 1e-6
    assert (y[:, :, 0, :] == -1.0).all()  # MNIST ink lies in the central 20x20 box: small warps keep row 0 empty
    assert not torch.allclose(y, x, atol=1e-2)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32\)"):
        mc.mnist_features(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="floating-point"):
        mc.mnist_features(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(FileNotFoundError, match="mnist_classifier train"):
        mc.load_classifier(tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match=".safetensors"):
        mc.train_classifier(tmp_path / "model.pt")


@pytest.mark.slow
def test_training_is_seeded_and_writes_record(tmp_path):
    cfg = mc.ClassifierTrainConfig(epochs=1)
    r1 = mc.train_classifier(tmp_path / "a.safetensors", cfg, log=lambda *_: None)
    r2 = mc.train_classifier(tmp_path / "b.safetensors", cfg, log=lambda *_: None)
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical weights
    assert r1["heldout_correct"] == r2["heldout_correct"]
    assert json.loads((tmp_path / "a.json").read_text())["seed"] == 0
    assert r1["heldout_accuracy"] > 0.5  # one epoch already learns far above chance (0.1)
    mc.train_classifier(tmp_path / "c.safetensors", mc.ClassifierTrainConfig(epochs=1, seed=1), log=lambda *_: None)
    c = load_file(str(tmp_path / "c.safetensors"))
    assert not torch.equal(a["head.weight"], c["head.weight"])
