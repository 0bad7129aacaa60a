"""Prompt readers (txt / jsonl / parquet) and real-image sources (folder, webdataset shards, latent cache)."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch

from dmd2.data.prompts import PromptNoise, read_prompts
from dmd2.data.sdxl_images import (ImageCaptionFolder, LatentCache, LatentCollate, PosteriorSamples, WebDatasetShards,
                                   cache_latents, load_image, open_image_source, sample_posterior, vae_moments)

PROMPTS = ["a red cube", "the cat, on a mat", "ünïcode \"quoted\" prompt"]


def test_txt_prompts_skip_blank_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red cube\n\n  the cat, on a mat  \nünïcode \"quoted\" prompt\n", encoding="utf-8")
    assert read_prompts(f) == PROMPTS
    assert read_prompts(f, limit=2) == PROMPTS[:2]


def test_jsonl_prompts_default_and_explicit_key(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"caption": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)), encoding="utf-8")
    assert read_prompts(f) == PROMPTS
    assert read_prompts(f, key="caption") == PROMPTS
    with pytest.raises(ValueError, match="'prompt'"):
        read_prompts(f, key="prompt")


def test_parquet_prompts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": PROMPTS, "n": [1, 2, 3]}), f)
    assert read_prompts(f) == PROMPTS
    with pytest.raises(ValueError, match="not a string"):
        read_prompts(f, key="n")  # not strings


def test_prompt_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "p.csv").write_text("a\n")
    with pytest.raises(ValueError, match="suffix"):
        read_prompts(tmp_path / "p.csv")
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "e.txt")
    (tmp_path / "b.jsonl").write_text('{"prompt": "x"}\nnot json\n')
    with pytest.raises(ValueError, match=r"b.jsonl:2"):
        read_prompts(tmp_path / "b.jsonl")


def _png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _images(n=3, h=12, w=20):
    g = np.random.default_rng(0)
    return [g.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_load_image_resizes_shorter_side_and_centre_crops():
    arr = np.zeros((8, 16, 3), np.uint8)
    arr[:, 4:12] = 255  # the centre 8x8 square is white, the sides black
    x = load_image(_png_bytes(arr), 8)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert torch.equal(x, torch.ones(3, 8, 8))  # exactly the white centre, mapped to +1
    y = load_image(_png_bytes(arr[:, :8].copy()), 4)  # black/white halves, downscaled
    assert y.min() >= -1 and y.max() <= 1


def test_image_caption_folder(tmp_path):
    arrs = _images()
    lines = []
    for i, a in enumerate(arrs):
        (tmp_path / f"{i}.png").write_bytes(_png_bytes(a))
        lines.append(json.dumps({"file": f"{i}.png", "caption": PROMPTS[i]}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines))
    ds = ImageCaptionFolder(tmp_path, 8)
    assert len(ds) == 3 and ds.captions() == PROMPTS[:3]
    x, c = ds[1]
    assert x.shape == (3, 8, 8) and c == PROMPTS[1]
    assert torch.equal(x, load_image(tmp_path / "1.png", 8))
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "nope.png", "caption": "x"}))
    with pytest.raises(ValueError, match="nope.png"):
        ImageCaptionFolder(tmp_path, 8)


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path):
    arrs = _images(4)
    _write_tar(tmp_path / "000.tar", [("s0.png", _png_bytes(arrs[0])), ("s0.txt", PROMPTS[0].encode()),
                                      ("s1.png", _png_bytes(arrs[1])), ("s1.json", json.dumps({"caption": PROMPTS[1]}).encode()),
                                      ("s2.png", _png_bytes(arrs[2]))])  # s2: no caption -> skipped
    _write_tar(tmp_path / "001.tar", [("dir/s3.txt", PROMPTS[2].encode()), ("dir/s3.png", _png_bytes(arrs[3]))])
    ds = WebDatasetShards(tmp_path, 8)
    assert len(ds) == 3
    assert [ds[i][1] for i in range(3)] == PROMPTS == ds.captions()
    assert torch.equal(ds[2][0], load_image(_png_bytes(arrs[3]), 8))
    assert torch.equal(ds[0][0], load_image(_png_bytes(arrs[0]), 8))
    with pytest.raises(ValueError, match="not found"):
        WebDatasetShards(tmp_path / "none.tar", 8)


class _TinyVAE(torch.nn.Module):
    """Stand-in with diffusers' interface: latent_dist.mean = 2x2 average pool of the first 2 channels, latent_dist.std
    = 0.1 + |that of the third|."""

    class config:  # noqa: N801
        scaling_factor = 0.5

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def encode(self, x):
        class D:
            pass

        d = D()
        d.latent_dist = D()
        d.latent_dist.mean = torch.nn.functional.avg_pool2d(x[:, :2], 2) * self.w
        d.latent_dist.std = 0.1 + torch.nn.functional.avg_pool2d(x[:, 2:3], 2).abs().expand(-1, 2, -1, -1)
        return d


def test_vae_moments_and_latent_cache_round_trip(tmp_path):
    vae = _TinyVAE()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    m = vae_moments(vae, x)
    assert m.shape == (2, 2, 2, 4, 4)
    assert torch.equal(m[:, 0], 0.5 * torch.nn.functional.avg_pool2d(x[:, :2], 2))
    assert torch.equal(m[:, 1], 0.5 * (0.1 + torch.nn.functional.avg_pool2d(x[:, 2:3], 2).abs()).expand(-1, 2, -1, -1))
    ds = [(x[i], PROMPTS[i]) for i in range(2)] + [(-x[0], PROMPTS[2])]
    cache_latents(ds, vae, tmp_path / "cache", batch=2)
    cache = LatentCache(tmp_path / "cache")
    assert len(cache) == 3 and cache.captions() == PROMPTS[:3]
    for i, (img, cap) in enumerate(ds):
        moments, c = cache[i]
        # stored in fp16 (the default), read back as fp32
        assert c == cap and moments.dtype == torch.float32
        assert torch.equal(moments, vae_moments(vae, img[None])[0].half().float())
    assert isinstance(open_image_source("latents", tmp_path / "cache", 8), LatentCache)
    with pytest.raises(ValueError, match="real_kind"):
        open_image_source("lmdb", tmp_path, 8)
    with pytest.raises(ValueError, match="latents.safetensors"):
        LatentCache(tmp_path)
    with pytest.raises(IndexError, match="out of range"):
        cache[3]


def test_old_latent_cache_of_means_is_refused_with_the_rebuild_command(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "captions.jsonl").write_text('{"caption": "a"}\n')
    save_file({"latents": torch.zeros(1, 4, 2, 2)}, str(tmp_path / "latents.safetensors"))
    with pytest.raises(ValueError, match=r"holds \['latents'\].*rebuild it: python -m dmd2.recipes.sdxl cache-latents"):
        LatentCache(tmp_path)


def test_sample_posterior_is_keyed_and_has_the_posterior_moments():
    mean = torch.tensor([0.5, -2.0]).view(1, 2, 1, 1).expand(4000, 2, 3, 3)
    std = torch.tensor([0.1, 1.5]).view(1, 2, 1, 1).expand(4000, 2, 3, 3)
    moments = torch.stack([mean, std], dim=1)
    z = sample_posterior(moments, torch.Generator().manual_seed(3))
    assert torch.equal(z, sample_posterior(moments, torch.Generator().manual_seed(3)))
    assert not torch.equal(z, sample_posterior(moments, torch.Generator().manual_seed(4)))
    # 36,000 draws per channel: the sample mean is within 4 standard errors, the sample std within 2 %
    emp_mean, emp_std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))
    assert ((emp_mean - torch.tensor([0.5, -2.0])).abs() < 4 * torch.tensor([0.1, 1.5]) / 36_000 ** 0.5).all()
    assert ((emp_std / torch.tensor([0.1, 1.5]) - 1).abs() < 0.02).all()
    with pytest.raises(ValueError, match=r"\(B, 2, C, h, w\)"):
        sample_posterior(mean, torch.Generator())


def test_latent_collate_encodes_images_keeps_cached_moments_and_refuses_another_shape():
    vae = _TinyVAE()
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    moments, cond = LatentCollate(list, (2, 4, 4), vae=vae)([(x[i], PROMPTS[i]) for i in range(3)])
    assert torch.equal(moments, vae_moments(vae, x)) and cond == PROMPTS
    cached = [(moments[i], PROMPTS[i]) for i in range(3)]  # LatentCache items: the moments themselves
    again, _ = LatentCollate(list, (2, 4, 4))(cached)
    assert torch.equal(again, moments)
    with pytest.raises(ValueError, match=r"real latents have shape \(2, 4, 4\); the run expects \(2, 8, 8\)"):
        LatentCollate(list, (2, 8, 8))(cached)


def test_posterior_samples_draw_from_the_batch_key():
    moments = torch.stack([torch.zeros(2, 2, 3, 3), torch.ones(2, 2, 3, 3)], dim=1)
    calls = []

    def moments_of(step, shard, batch, device):
        calls.append((step, shard, batch, device))
        return moments, "cond"

    draw = PosteriorSamples(moments_of, lambda step, shard: 100 * step + shard)
    z, cond = draw(2, 1, 2, "cpu")
    assert cond == "cond" and calls == [(2, 1, 2, "cpu")]
    assert torch.equal(z, sample_posterior(moments, torch.Generator().manual_seed(201)))
    assert torch.equal(draw(2, 1, 2, "cpu")[0], z)  # the same read, the same sample
    assert not torch.equal(draw(2, 0, 2, "cpu")[0], z) and not torch.equal(draw(3, 1, 2, "cpu")[0], z)


def test_prompt_noise_draws_prompts_then_noise_from_the_callers_generator():
    noise, cond = PromptNoise(PROMPTS, list, (2, 3, 3))(5, torch.Generator().manual_seed(7), torch.device("cpu"))
    g = torch.Generator().manual_seed(7)
    assert cond == [PROMPTS[i] for i in torch.randint(3, (5,), generator=g).tolist()]
    assert torch.equal(noise, torch.randn((5, 2, 3, 3), generator=g))
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        PromptNoise([], list, (2, 3, 3))
