"""The FID pipeline (dmd2.eval.fid) on stand-ins made here: a tiny TorchScript detector with the Inception detector's
calling convention, reference npz files, a tiny imagenet64 checkpoint and a tiny EDM teacher. No downloads.

Numbers are checked against direct computations: statistics accumulated in batches == statistics of all features at
once; the CLI's FID == the Frechet distance of features computed here from the same images."""
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dmd2.eval import fid
from dmd2.eval.metrics import feature_statistics, frechet_distance


class _Layers(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.proj = nn.Linear(8 * 16, dim)

    def forward(self, x):
        h = F.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 4).flatten(1)
        return self.proj(h)[:, :, None, None]  # (B, d, 1, 1), like Inception's pool3


class StandInDetector(nn.Module):
    """The real detector's contract: uint8 (or [0, 255] float) images at any size -> float32, resize to its input
    size inside, ``(x - 128) / 128``, ``layers`` -> features ``(B, d)`` with ``return_features=True``."""

    def __init__(self, dim: int = 24, size: int = 32):
        super().__init__()
        self.layers = _Layers(dim)
        self.size = size

    def forward(self, x, return_features: bool = False):
        x = x.to(torch.float32)
        if x.shape[2] != self.size or x.shape[3] != self.size:
            x = F.interpolate(x, size=[self.size, self.size], mode="bilinear", align_corners=False)
        f = self.layers((x - 128) / 128).flatten(1)
        if return_features:
            return f
        return torch.softmax(f, dim=1)


@pytest.fixture(scope="module")
def detector_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("det") / "inception-standin.pt"
    torch.jit.save(torch.jit.script(StandInDetector().eval()), str(path))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-iteration imagenet64 tiny run (16x16, 10 classes, random ADM teacher)."""
    from dmd2.recipes.imagenet64 import RECIPE
    from dmd2.train import main

    out = tmp_path_factory.mktemp("run")
    assert main(RECIPE, ["--preset", "tiny", "--out", str(out), "train.progress=false", "train.max_steps=2",
                         "train.sample_every=0", "train.checkpoint_every=2"]) == 0
    return out


def _features_direct(det, images_uint8):
    with torch.no_grad():
        return det(images_uint8, return_features=True).double().numpy()


def _random_uint8(n, seed, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _write_ref(path, feats):
    mu, sigma = feature_statistics(feats)
    fid.save_reference(path, mu, sigma)
    return mu, sigma


# --- conversion, detector loading ------------------------------------------------------------------------------
def test_images_to_uint8_is_edms_conversion():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.5, -3.0]).view(1, 1, 1, 7)
    # (x * 127.5 + 128) truncated: 0.5 -> 0, 0.627 -> 0, 128 -> 128, 191.75 -> 191, 255.5 -> 255 (clipped), ...
    assert fid.images_to_uint8(x).flatten().tolist() == [0, 0, 128, 191, 255, 255, 0]
    with pytest.raises(ValueError, match="NaN or infinite"):
        fid.images_to_uint8(torch.tensor([0.0, float("nan")]).view(1, 1, 1, 2))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        fid.images_to_uint8(torch.zeros(3, 4, 4))


def test_load_detector_reads_torchscript_and_refuses_pickles(detector_path, tmp_path):
    det = fid.load_detector(detector_path)
    imgs = _random_uint8(3, 0)
    assert det(imgs, return_features=True).shape == (3, 24)

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    pkl = tmp_path / "inception-2015-12-05.pkl"
    pkl.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="refused.*pickle"):
        fid.load_detector(pkl)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt"):
        fid.load_detector(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a TorchScript archive"):
        fid.load_detector(junk)


def test_modes(detector_path):
    det = fid.load_detector(detector_path)
    with pytest.raises(ValueError, match="pytorch-fid"):
        fid.FeatureExtractor(det, "legacy_pytorch")
    with pytest.raises(ValueError, match="unknown FID mode"):
        fid.FeatureExtractor(det, "tf")
    with pytest.raises(ValueError, match="layers"):
        fid.FeatureExtractor(lambda x, return_features=True: x, "clean")
    imgs = _random_uint8(4, 1)
    edm = fid.FeatureExtractor(det, "edm")(imgs)
    tf = fid.FeatureExtractor(det, "legacy_tensorflow")(imgs)
    np.testing.assert_array_equal(edm.numpy(), _features_direct(det, imgs))
    np.testing.assert_array_equal(tf.numpy(), edm.numpy())
    # clean: every channel through PIL bicubic in float to 299 x 299, then (x - 128) / 128 into layers
    ch = imgs[2, 1].numpy().astype(np.float32)
    direct = np.asarray(Image.fromarray(ch, mode="F").resize((299, 299), resample=Image.BICUBIC))
    resized = fid.FeatureExtractor.clean_resize(imgs)
    assert resized.shape == (4, 3, 299, 299)
    np.testing.assert_array_equal(resized[2, 1].numpy(), direct)
    clean = fid.FeatureExtractor(det, "clean")(imgs)
    with torch.no_grad():
        expect = det.layers((resized - 128) / 128).flatten(1).double()
    torch.testing.assert_close(clean, expect, rtol=0, atol=0)
    assert not torch.allclose(clean, edm)
    # grayscale is repeated to RGB
    gray = imgs[:, :1]
    torch.testing.assert_close(fid.FeatureExtractor(det)(gray), fid.FeatureExtractor(det)(gray.repeat(1, 3, 1, 1)))


# --- statistics ---------------------------------------------------------------------------------------------
def test_running_statistics_equal_direct_ones():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((103, 7)) @ rng.standard_normal((7, 7)) + 5.0
    stats = fid.FeatureStats()
    for start in range(0, 103, 10):
        stats.update(torch.from_numpy(feats[start:start + 10]))
    mu, sigma = stats.statistics()
    mu_d, sigma_d = feature_statistics(feats)
    np.testing.assert_allclose(mu, mu_d, rtol=1e-12)
    np.testing.assert_allclose(sigma, sigma_d, rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="dimension changed"):
        stats.update(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="at least 2"):
        fid.FeatureStats().statistics()


def test_reference_npz_layout(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    p = fid.save_reference(tmp_path / "ref.npz", mu, sigma)
    with np.load(p) as z:
        assert sorted(z.files) == ["mu", "sigma"]
    m2, s2 = fid.load_reference(p)
    np.testing.assert_array_equal(m2, mu)
    np.testing.assert_array_equal(s2, sigma)
    np.savez(tmp_path / "bad.npz", mean=mu, cov=sigma)
    with pytest.raises(ValueError, match="missing keys"):
        fid.load_reference(tmp_path / "bad.npz")
    np.savez(tmp_path / "bad2.npz", mu=mu, sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"mu \(d,\) and sigma \(d, d\)"):
        fid.load_reference(tmp_path / "bad2.npz")
    with pytest.raises(ValueError, match="same detector"):
        fid.fid_from_statistics(mu, sigma, np.zeros(4), np.eye(4))


def _toy_sample_fn(noise, labels, g):
    return torch.tanh(noise + 0.1 * labels.view(-1, 1, 1, 1).float())


def test_generated_statistics_are_per_image_and_batch_independent(detector_path):
    det = fid.load_detector(detector_path)
    ext = fid.FeatureExtractor(det)
    seen = {}

    def recording(batch):
        def f(images):
            seen.setdefault(batch, []).append(images)
            return ext(images)
        return f

    kw = dict(num=11, num_classes=4, shape=(3, 8, 8), seed=5, progress=False)
    mu3, s3 = fid.generated_statistics(_toy_sample_fn, recording(3), batch=3, **kw)
    mu11, s11 = fid.generated_statistics(_toy_sample_fn, recording(11), batch=11, **kw)
    assert [b.shape[0] for b in seen[3]] == [3, 3, 3, 2]
    # the images do not depend on the batch size (per-image seeds) ...
    torch.testing.assert_close(torch.cat(seen[3]), torch.cat(seen[11]), rtol=0, atol=0)
    # ... so the statistics agree up to the detector's float32 rounding, which depends on the batch shape
    np.testing.assert_allclose(mu3, mu11, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(s3, s11, rtol=1e-5, atol=1e-7)
    # the same images built by hand: image i from seed 5 + i, class i mod 4; statistics of all features at once
    noise = torch.stack([torch.randn((3, 8, 8), generator=torch.Generator().manual_seed(5 + i)) for i in range(11)])
    imgs = fid.images_to_uint8(_toy_sample_fn(noise, torch.arange(11) % 4, None))
    torch.testing.assert_close(torch.cat(seen[11]), imgs, rtol=0, atol=0)
    mu_d, s_d = feature_statistics(_features_direct(det, imgs))
    np.testing.assert_allclose(mu11, mu_d, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s11, s_d, rtol=1e-9, atol=1e-12)


# --- command line ---------------------------------------------------------------------------------------------
def test_cli_student_fid_equals_direct_frechet_distance(detector_path, tiny_run, tmp_path):
    from dmd2.train import load_generator

    det = fid.load_detector(detector_path)
    ref_feats = _features_direct(det, _random_uint8(40, 3))
    ref_mu, ref_sigma = _write_ref(tmp_path / "ref.npz", ref_feats)
    out = tmp_path / "res" / "fid.json"
    rc = fid.main(["--detector", str(detector_path), "--ref", str(tmp_path / "ref.npz"), "--ckpt", str(tiny_run),
                   "--num", "30", "--batch", "8", "--seed", "7", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    # the same 30 images, generated directly: seeds 7..36, classes i mod 10, one step at sigma 80
    gen = load_generator(tiny_run, weights="generator")
    noise = fid.sample_seeds_noise(range(7, 37), (3, 16, 16))
    with torch.no_grad():
        x0 = gen.denoiser(80.0 * noise, torch.full((30,), 80.0), torch.arange(30) % 10)
    feats = _features_direct(det, fid.images_to_uint8(x0))
    expect = frechet_distance(*feature_statistics(feats), ref_mu, ref_sigma)
    assert res["fid"] == pytest.approx(expect, rel=1e-6)
    assert res["fid"] > 0
    assert (res["num_samples"], res["mode"], res["sampler"], res["nfe"], res["weights"]) == (30, "edm", "student", 1, "generator")
    assert len(res["detector_sha256"]) == 64


def test_cli_heun_baseline_and_ref_command(detector_path, tmp_path):
    from safetensors.torch import save_file

    from dmd2.eval.samplers import edm_heun
    from dmd2.models.adm import ADMConfig, build_edm_adm
    from dmd2.models.edm_pickle import load_edm_adm

    # a tiny EDM teacher in the converted format (the metadata load_edm_adm reads)
    cfg = ADMConfig(img_resolution=8, img_channels=3, label_dim=3, model_channels=16, channel_mult=(1, 2),
                    num_blocks=1, attn_resolutions=(4,), channels_per_head=16, dropout=0.0)
    torch.manual_seed(0)
    net = build_edm_adm(cfg)
    kwargs = {k: v for k, v in cfg.to_dict().items() if k not in ("img_channels",)}
    kwargs.update(in_channels=3, out_channels=3)
    teacher_path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(teacher_path),
              metadata={"model_class_name": "DhariwalUNet", "model_init_kwargs": json.dumps(kwargs), "sigma_data": "0.5"})

    # reference from an EDM-format zip through the `ref` command
    zpath = tmp_path / "data.zip"
    imgs = _random_uint8(12, 9, size=8)
    with zipfile.ZipFile(zpath, "w") as z:
        for i, im in enumerate(imgs):
            buf = __import__("io").BytesIO()
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(buf, format="PNG")
            z.writestr(f"{i:05d}.png", buf.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": [[f"{i:05d}.png", i % 3] for i in range(12)]}))
    ref = tmp_path / "ref.npz"
    assert fid.main(["ref", "--detector", str(detector_path), "--data", str(zpath), "--dest", str(ref),
                     "--batch", "12", "--device", "cpu", "--no-progress"]) == 0
    det = fid.load_detector(detector_path)
    ref_mu, ref_sigma = fid.load_reference(ref)
    mu_d, s_d = feature_statistics(_features_direct(det, imgs))
    np.testing.assert_allclose(ref_mu, mu_d, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref_sigma, s_d, rtol=1e-9, atol=1e-12)

    out = tmp_path / "heun.json"
    assert fid.main(["--sampler", "heun18", "--teacher", str(teacher_path), "--detector", str(detector_path),
                     "--ref", str(ref), "--num", "9", "--batch", "4", "--device", "cpu", "--no-progress",
                     "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert (res["sampler"], res["steps"], res["nfe"]) == ("heun18", 18, 35)
    teacher = load_edm_adm(teacher_path).eval()
    noise = fid.sample_seeds_noise(range(9), (3, 8, 8))
    x = edm_heun(teacher, noise, torch.arange(9) % 3, num_steps=18)
    expect = frechet_distance(*feature_statistics(_features_direct(det, fid.images_to_uint8(x))), ref_mu, ref_sigma)
    assert res["fid"] == pytest.approx(expect, rel=1e-6)


def test_cli_errors(detector_path, tmp_path, capsys):
    np.savez(tmp_path / "ref.npz", mu=np.zeros(24), sigma=np.eye(24))
    base = ["--detector", str(detector_path), "--device", "cpu", "--no-progress"]
    assert fid.main(base + ["--ref", str(tmp_path / "ref.npz")]) == 2
    assert "needs --ckpt" in capsys.readouterr().err
    assert fid.main(base + ["--ref", str(tmp_path / "ref.npz"), "--sampler", "euler"]) == 2
    assert "heunN" in capsys.readouterr().err
    assert fid.main(base + ["--ref", str(tmp_path / "ref.npz"), "--sampler", "heun18"]) == 2
    assert "needs --teacher" in capsys.readouterr().err
    assert fid.main(base) == 2
    assert "needs --ref" in capsys.readouterr().err
    assert fid.main(base + ["--ref", str(tmp_path / "nope.npz"), "--ckpt", "x"]) == 2
    assert "reference statistics not found" in capsys.readouterr().err
    assert fid.main(base + ["ref", "--data", str(tmp_path)]) == 2
    assert "--dest" in capsys.readouterr().err
