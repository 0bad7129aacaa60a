r"""COCO-2014 text-to-image evaluation of an SDXL student (DMD2, Sec. 5.2 / Table 2: COCO-10k FID, Patch FID, CLIP).

* captions: a local COCO-2014 caption file (``captions_val2014.json``: one caption per image - the annotation with
  the smallest id - for ``num`` images chosen by a seeded permutation of the sorted image ids), or a ``.jsonl``
  (``{"caption": ..., "file_name": ...}``) / ``.txt`` list;
* FID (Heusel et al. 2017) between generated and real images, both resized (shorter side, bicubic) and centre-cropped
  to 512 px; Patch FID: centre 299 x 299 crops at full resolution (fine detail, after DMD2 / "Patch FID" of
  Lin et al. 2024). Features: clean-fid's Inception-v3 (``InceptionV3W``, "clean" resizing to 299) read from a LOCAL
  TorchScript file ``inception-2015-12-05.pt`` - clean-fid would download it; here a missing file is a ``ValueError``;
  the Frechet distance is :func:`dmd2.eval.metrics.frechet_distance_from_features` (the library's one
  implementation; it agrees with clean-fid's ``frechet_distance`` to 1e-9 relative, tested);
* CLIP score: mean cosine similarity of open_clip image and text embeddings (ViT-g-14 by default, weights from a
  local file) with text ``"A photo depicts " + caption`` (paper: 0.332 for the 4-step student).

``evaluate_images`` works on images in memory with any feature extractor / CLIP model (tests use tiny stand-ins);
``evaluate_pipeline`` generates with an exported diffusers pipeline (``python -m dmd2.recipes.sdxl eval``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .metrics import frechet_distance_from_features

__all__ = ["CLIP_PREFIX", "INCEPTION_FILE", "read_coco_captions", "center_crop", "load_inception",
           "inception_features", "clip_score", "load_clip", "evaluate_images",
           "evaluate_pipeline"]

CLIP_PREFIX = "A photo depicts "
INCEPTION_FILE = "inception-2015-12-05.pt"


def read_coco_captions(path: str | Path, num: int | None = 10000, seed: int = 0) -> list[dict]:
    """``[{"image_id", "file_name", "caption"}, ...]`` (see the module docstring); ``num=None`` keeps all."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"caption file {str(p)!r} does not exist (expected COCO's captions_val2014.json, a .jsonl or a .txt)")
    if p.suffix.lower() == ".json":
        data = json.loads(p.read_text())
        if not isinstance(data, dict) or "annotations" not in data:
            raise ValueError(f"{p}: expected a COCO caption file with 'annotations' (and 'images')")
        files = {im["id"]: im.get("file_name", "") for im in data.get("images", [])}
        first: dict[int, tuple[int, str]] = {}
        for a in data["annotations"]:
            iid, aid = a["image_id"], a.get("id", 0)
            if iid not in first or aid < first[iid][0]:
                first[iid] = (aid, a["caption"].strip())
        items = [{"image_id": i, "file_name": files.get(i, ""), "caption": first[i][1]} for i in sorted(first)]
    elif p.suffix.lower() == ".jsonl":
        items = []
        for i, line in enumerate(p.read_text().splitlines()):
            if line.strip():
                obj = json.loads(line)
                if "caption" not in obj:
                    raise ValueError(f"{p}:{i + 1}: expected a 'caption' field")
                items.append({"image_id": obj.get("image_id", i), "file_name": obj.get("file_name", ""), "caption": obj["caption"]})
    elif p.suffix.lower() == ".txt":
        items = [{"image_id": i, "file_name": "", "caption": s.strip()} for i, s in enumerate(p.read_text().splitlines()) if s.strip()]
    else:
        raise ValueError(f"caption file {str(p)!r}: expected .json (COCO), .jsonl or .txt")
    if not items:
        raise ValueError(f"{p}: no captions")
    if num is not None:
        if num > len(items):
            raise ValueError(f"{p}: asked for {num} captions but the file has {len(items)} images")
        perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:num].tolist()
        items = [items[i] for i in perm]
    return items


def _to_pil(img):
    from PIL import Image

    if isinstance(img, Image.Image):
        return img.convert("RGB")
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a PIL image or a uint8 (H, W, 3) array, got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)


def center_crop(img, size: int, resize: bool = True) -> np.ndarray:
    """uint8 ``(size, size, 3)``: with ``resize`` the shorter side is first resized to ``size`` (bicubic) - FID at
    512; without, a centre ``size`` crop at full resolution - Patch FID at 299 (the image must be >= ``size``)."""
    from PIL import Image

    im = _to_pil(img)
    w, h = im.size
    if resize:
        s = size / min(w, h)
        w, h = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((w, h), Image.BICUBIC)
    elif min(w, h) < size:
        raise ValueError(f"center_crop: image {w}x{h} is smaller than the {size} px crop")
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def load_inception(path: str | Path, device="cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """clean-fid's TorchScript Inception from a local file: ``f(images (B, 3, 299, 299) float in [0, 255]) -> (B, 2048)``."""
    from cleanfid.inception_torchscript import InceptionV3W

    p = Path(path) if path else None
    if p is None or not p.is_file():
        raise ValueError(f"eval.inception: expected the local file {INCEPTION_FILE} (clean-fid's / StyleGAN2-ADA's "
                         f"TorchScript Inception-v3), got {str(path)!r}; nothing is downloaded")
    if p.name != INCEPTION_FILE:
        raise ValueError(f"eval.inception: the file must be named {INCEPTION_FILE} (clean-fid loads it by that name), got {p.name}")
    model = InceptionV3W(path=str(p.parent), download=False, resize_inside=False).to(device).eval()

    @torch.no_grad()
    def features(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(device))

    return features


def inception_features(images: Sequence, feature_fn: Callable, size: int, resize: bool, batch: int = 32) -> np.ndarray:
    """Features ``(N, D)`` float64 of centre crops (``size``, ``resize``) of ``images``, each crop brought to 299 px
    with clean-fid's "clean" resize (PIL bicubic per channel in float) as clean-fid does before its Inception."""
    from cleanfid.resize import build_resizer

    fn_resize = build_resizer("clean")
    out = []
    for i in range(0, len(images), batch):
        crops = [fn_resize(center_crop(im, size, resize)) for im in images[i:i + batch]]
        x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float()
        out.append(feature_fn(x).detach().double().cpu().numpy())
    return np.concatenate(out)


def load_clip(model_name: str, weights: str | Path, device="cpu"):
    """``(model, preprocess, tokenizer)`` of open_clip from a LOCAL weights file (``ValueError`` when absent)."""
    import open_clip

    if not weights or not Path(weights).is_file():
        raise ValueError(f"eval.clip_weights: expected a local open_clip weights file for {model_name} "
                         f"(e.g. ViT-g-14 laion2b_s34b_b88k open_clip_pytorch_model.bin), got {str(weights)!r}")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(weights), device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


@torch.no_grad()
def clip_score(images: Sequence, captions: Sequence[str], model, preprocess, tokenizer, prefix: str = CLIP_PREFIX,
               batch: int = 32, device="cpu") -> float:
    r"""Mean over pairs of :math:`\cos(E_I(\text{image}), E_T(\text{prefix} + \text{caption}))`."""
    if len(images) != len(captions) or not images:
        raise ValueError(f"clip_score: need as many images as captions (> 0), got {len(images)} and {len(captions)}")
    total = 0.0
    for i in range(0, len(images), batch):
        ims = torch.stack([preprocess(_to_pil(im)) for im in images[i:i + batch]]).to(device)
        toks = tokenizer([prefix + c for c in captions[i:i + batch]]).to(device)
        fi = torch.nn.functional.normalize(model.encode_image(ims).float(), dim=-1)
        ft = torch.nn.functional.normalize(model.encode_text(toks).float(), dim=-1)
        total += float((fi * ft).sum(-1).sum())
    return total / len(images)


def evaluate_images(generated: Sequence, captions: Sequence[str], real: Sequence, feature_fn: Callable,
                    clip: tuple | None = None, out: str | Path | None = None, batch: int = 32, extra: dict | None = None,
                    fid_size: int = 512, patch_size: int = 299) -> dict:
    """FID (512 px resize + centre crop), Patch FID (299 px centre crops at full resolution) and CLIP score.

    Args:
        generated: images (PIL or uint8 ``(H, W, 3)``) generated for ``captions``.
        real: reference images (COCO val2014).
        feature_fn: ``(B, 3, 299, 299) in [0, 255] -> (B, D)`` (:func:`load_inception`).
        clip: ``(model, preprocess, tokenizer)`` (:func:`load_clip`); None skips the CLIP score.
        out: write the result JSON here.
        fid_size, patch_size: the crop sizes (paper: 512 and 299).
    """
    if len(generated) != len(captions):
        raise ValueError(f"evaluate_images: {len(generated)} generated images for {len(captions)} captions")
    result = {
        "num_generated": len(generated), "num_real": len(real),
        "fid": frechet_distance_from_features(inception_features(generated, feature_fn, fid_size, True, batch),
                                   inception_features(real, feature_fn, fid_size, True, batch)),
        "patch_fid": frechet_distance_from_features(inception_features(generated, feature_fn, patch_size, False, batch),
                                         inception_features(real, feature_fn, patch_size, False, batch)),
        "fid_size": fid_size, "patch_size": patch_size,
    }
    if clip is not None:
        result["clip_score"] = clip_score(generated, captions, *clip, batch=batch)
        result["clip_prefix"] = CLIP_PREFIX
    result.update(extra or {})
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
    return result


def evaluate_pipeline(pipeline_dir: str | Path, captions: str, images: str, num: int = 10000, inception: str = "",
                      clip_model: str = "ViT-g-14", clip_weights: str = "", batch: int = 8, seed: int = 0,
                      out: str | None = None, feature_fn: Callable | None = None, clip: tuple | None = None,
                      device: str | None = None, fid_size: int = 512, patch_size: int = 299) -> dict:
    """Generate one image per COCO caption with an exported pipeline (``dmd2.json`` gives the student's timesteps;
    image ``i`` uses seed ``seed + i``) and evaluate against the real images in ``images/<file_name>``."""
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    feature_fn = feature_fn or load_inception(inception, dev)
    clip = clip or load_clip(clip_model, clip_weights, dev)
    items = read_coco_captions(captions, num, seed)
    root = Path(images)
    missing = [it["file_name"] for it in items if not (root / it["file_name"]).is_file()]
    if missing:
        raise ValueError(f"eval.images {str(root)!r}: {len(missing)} reference images are missing, e.g. {missing[0]!r}")
    info = json.loads((Path(pipeline_dir) / "dmd2.json").read_text())
    dtype = torch.float16 if dev == "cuda" else torch.float32
    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline_dir, dtype=dtype).to(dev)
    if info.get("lora_format") == "lora":
        pipe.load_lora_weights(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    from tqdm.auto import tqdm

    generated = []
    for i in tqdm(range(0, len(items), batch), desc="eval: generating", unit="batch", dynamic_ncols=True):
        chunk = items[i:i + batch]
        gens = [torch.Generator(device=dev).manual_seed(seed + i + j) for j in range(len(chunk))]
        res = info["resolution"]
        generated += pipe([it["caption"] for it in chunk], timesteps=info["timesteps"], guidance_scale=0.0,
                          height=res, width=res, generator=gens).images
    real = [Image.open(root / it["file_name"]).convert("RGB") for it in items]
    return evaluate_images(generated, [it["caption"] for it in items], real, feature_fn, clip, out, batch,
                           extra={"pipeline": str(pipeline_dir), "timesteps": info["timesteps"], "seed": seed},
                           fid_size=fid_size, patch_size=patch_size)
