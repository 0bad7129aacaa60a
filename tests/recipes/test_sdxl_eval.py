"""``python -m dmd2.recipes.sdxl eval`` plumbing: generate with an exported tiny pipeline, evaluate with stand-ins."""
import json

import numpy as np
import torch

from dmd2.eval.coco import evaluate_pipeline


class _TinyFeatures(torch.nn.Module):
    """Stand-in for Inception: 2x2 pooled colours (12-dim features) of the 299 px input."""

    def forward(self, x):
        assert x.shape[1:] == (3, 299, 299)
        return torch.nn.functional.adaptive_avg_pool2d(x / 255, 2).flatten(1)


class _ConstClip:
    """Stand-in CLIP: image embedding = mean RGB, every text embedding = (1, 1, 1)."""

    def preprocess(self, pil):
        return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)

    def tokenizer(self, texts):
        return torch.ones(len(texts), 3)

    def encode_image(self, x):
        return x.mean(dim=(2, 3))

    def encode_text(self, toks):
        return toks


def test_evaluate_pipeline_on_tiny_export(sdxl_tiny_runs, tmp_path):
    from PIL import Image

    from dmd2.recipes.sdxl import RECIPE
    from dmd2.train import main

    pipe_dir = tmp_path / "pipe"
    assert main(RECIPE, ["export", str(sdxl_tiny_runs("shared-base")), str(pipe_dir)]) == 0
    images = [{"id": 100 + i, "file_name": f"COCO_val2014_{100 + i:012d}.jpg"} for i in range(4)]
    anns = [{"image_id": 100 + i, "id": i, "caption": f"a red cube {i}"} for i in range(4)]
    caps = tmp_path / "captions_val2014.json"
    caps.write_text(json.dumps({"images": images, "annotations": anns}))
    img_dir = tmp_path / "val2014"
    img_dir.mkdir()
    g = np.random.default_rng(0)
    for im in images:
        Image.fromarray(g.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(img_dir / im["file_name"])
    m = _ConstClip()
    r = evaluate_pipeline(pipe_dir, str(caps), str(img_dir), num=4, feature_fn=_TinyFeatures(),
                          clip=(m, m.preprocess, m.tokenizer), batch=2, out=str(tmp_path / "r.json"), device="cpu",
                          fid_size=32, patch_size=24)
    assert r["num_generated"] == 4 and r["timesteps"] == [999, 499]
    assert np.isfinite(r["fid"]) and r["fid"] > 0 and np.isfinite(r["patch_fid"]) and -1 <= r["clip_score"] <= 1
    assert json.loads((tmp_path / "r.json").read_text()) == r
