"""COCO evaluation plumbing with tiny stand-ins (no Inception / CLIP download): captions, crops, Frechet distance,
CLIP score, the result JSON, and generation through an exported tiny pipeline."""
import json

import numpy as np
import pytest
import scipy.linalg
import torch

from dmd2.eval.metrics import frechet_distance_from_features
from dmd2.eval.coco import (CLIP_PREFIX, center_crop, clip_score, evaluate_images,
                            inception_features, load_clip, load_inception, read_coco_captions)


def _coco(tmp_path, n=6):
    images = [{"id": 100 + i, "file_name": f"COCO_val2014_{100 + i:012d}.jpg"} for i in range(n)]
    anns = []
    for i in range(n):  # two captions per image; the one with the smaller annotation id comes second in the file
        anns.append({"image_id": 100 + i, "id": 50 + 2 * i, "caption": f"second {i}"})
        anns.append({"image_id": 100 + i, "id": 10 + i, "caption": f" first {i} "})
    f = tmp_path / "captions_val2014.json"
    f.write_text(json.dumps({"images": images, "annotations": anns}))
    return f


def test_read_coco_captions_one_per_image_seeded_subset(tmp_path):
    f = _coco(tmp_path)
    allc = read_coco_captions(f, num=None)
    assert [c["caption"] for c in allc] == [f"first {i}" for i in range(6)]
    assert allc[2]["file_name"] == "COCO_val2014_000000000102.jpg"
    a, b, c = read_coco_captions(f, 4, seed=0), read_coco_captions(f, 4, seed=0), read_coco_captions(f, 4, seed=1)
    assert a == b and len({x["image_id"] for x in a}) == 4 and a != c
    with pytest.raises(ValueError, match="asked for 7"):
        read_coco_captions(f, 7)
    with pytest.raises(ValueError, match="does not exist"):
        read_coco_captions(tmp_path / "none.json")


def test_center_crop_resize_and_patch():
    arr = np.random.default_rng(0).integers(0, 256, (400, 600, 3), dtype=np.uint8)
    patch = center_crop(arr, 299, resize=False)
    assert patch.shape == (299, 299, 3)
    assert np.array_equal(patch, arr[50:349, 150:449])
    big = center_crop(arr, 512, resize=True)
    assert big.shape == (512, 512, 3)
    with pytest.raises(ValueError, match="smaller"):
        center_crop(arr[:100, :100], 299, resize=False)


def test_frechet_distance_closed_form_and_clean_fid():
    """The one Frechet distance (dmd2.eval.metrics) gives the closed form and clean-fid's number on the same features."""
    from cleanfid.fid import frechet_distance as clean_frechet

    g = np.random.default_rng(1)
    a = g.normal(size=(4000, 3)) @ np.diag([1.0, 2.0, 0.5])
    b = g.normal(size=(4000, 3)) + np.array([1.0, -1.0, 0.0])
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * scipy.linalg.sqrtm(s_a @ s_b).real)
    assert frechet_distance_from_features(a, b) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance_from_features(a, b) == pytest.approx(clean_frechet(mu_a, s_a, mu_b, s_b), rel=1e-9)
    assert frechet_distance_from_features(a, a) == pytest.approx(0.0, abs=1e-6)


class _TinyFeatures(torch.nn.Module):
    """Stand-in for Inception: per-channel mean and std over 4x4 blocks' means (16-dim features)."""

    def forward(self, x):
        assert x.shape[1:] == (3, 299, 299) and x.min() >= 0 and x.max() <= 255
        p = torch.nn.functional.adaptive_avg_pool2d(x / 255, 2).flatten(1)
        return torch.cat([p, x.std(dim=(2, 3)) / 255, x.mean(dim=(2, 3)) / 255], 1)


def test_inception_features_use_clean_resize_of_crops():
    from cleanfid.resize import build_resizer

    imgs = [np.random.default_rng(i).integers(0, 256, (300, 340, 3), dtype=np.uint8) for i in range(3)]
    f = _TinyFeatures()
    feats = inception_features(imgs, f, 64, True, batch=2)
    resize = build_resizer("clean")
    ref = f(torch.from_numpy(resize(center_crop(imgs[2], 64, True))).permute(2, 0, 1)[None].float())
    assert feats.shape == (3, 18) and np.allclose(feats[2], ref[0].double().numpy())


def test_load_inception_requires_a_local_file(tmp_path):
    with pytest.raises(ValueError, match="inception-2015-12-05.pt"):
        load_inception(tmp_path / "inception-2015-12-05.pt")
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="must be named"):
        load_inception(tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="clip_weights"):
        load_clip("ViT-g-14", tmp_path / "missing.bin")


class _TinyClip:
    """Stand-in CLIP: image embedding = mean RGB; text embedding = RGB vector named by the caption's last word."""

    COLOURS = {"red": [1.0, 0, 0], "green": [0, 1.0, 0], "blue": [0, 0, 1.0]}

    def __init__(self):
        self.texts = []

    def preprocess(self, pil):
        return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)

    def tokenizer(self, texts):
        self.texts += list(texts)
        return torch.tensor([self.COLOURS[t.split()[-1]] for t in texts])

    def encode_image(self, x):
        return x.mean(dim=(2, 3))

    def encode_text(self, toks):
        return toks


def _solid(rgb, size=320):
    return np.broadcast_to(np.array(rgb, np.uint8), (size, size, 3)).copy()


def test_clip_score_cosine_with_prefix():
    m = _TinyClip()
    imgs = [_solid([255, 0, 0]), _solid([0, 0, 255]), _solid([255, 255, 0])]
    caps = ["something red", "something red", "something green"]
    s = clip_score(imgs, caps, m, m.preprocess, m.tokenizer, batch=2)
    assert s == pytest.approx((1.0 + 0.0 + 1 / np.sqrt(2)) / 3, rel=1e-6)
    assert m.texts == [CLIP_PREFIX + c for c in caps]


def test_evaluate_images_result_json(tmp_path):
    g = np.random.default_rng(0)
    real = [g.integers(0, 256, (300, 320, 3), dtype=np.uint8) for _ in range(6)]
    fake = [np.clip(r.astype(int) // 2 + 60, 0, 255).astype(np.uint8) for r in real]
    caps = ["x red"] * 6
    m = _TinyClip()
    out = tmp_path / "res" / "coco.json"
    r_same = evaluate_images(real, caps, real, _TinyFeatures(), batch=4)
    r = evaluate_images(fake, caps, real, _TinyFeatures(), clip=(m, m.preprocess, m.tokenizer), out=out, batch=4)
    assert r_same["fid"] == pytest.approx(0.0, abs=1e-6) and r_same["patch_fid"] == pytest.approx(0.0, abs=1e-6)
    assert r["fid"] > 1e-3 and r["patch_fid"] > 1e-3 and 0 < r["clip_score"] <= 1
    assert json.loads(out.read_text()) == r and r["num_generated"] == 6
