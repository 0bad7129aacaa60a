"""Tiny SDXL-shaped components, written to a diffusers folder: the download-free stand-in of the ``tiny`` preset.

Same classes and wiring as SDXL base (``UNet2DConditionModel`` with the ``text_time`` addition embedding and a
cross-attention mid-block, ``CLIPTextModel`` + ``CLIPTextModelWithProjection``, ``CLIPTokenizer`` x 2,
``AutoencoderKL``, the scaled-linear scheduler), only narrow: text widths 32 + 32 = 64 = the UNet's
``cross_attention_dim``, a 2-level UNet (channels 32, 64), a 2-level VAE (latents at 1/2 of the image size).

The tokenizers get a byte-level vocabulary written here (``vocab.json`` + ``merges.txt`` in CLIP's BPE format:
the 256 byte symbols, each also with the end-of-word marker ``</w>``, a few merges, and the two special tokens).

:func:`write_tiny_fixtures` writes everything the ``tiny`` preset reads into its run folder ``OUT``
(:class:`TinyFixtures`): this model at ``OUT/tiny-base``, eight prompts at ``OUT/tiny-data/prompts.txt`` and eight
captioned images at ``OUT/tiny-data/images`` (an :class:`~dmd2.data.sdxl_images.ImageCaptionFolder`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["write_tiny_sdxl", "TinyFixtures", "tiny_fixtures", "write_tiny_fixtures", "TINY_TEXT_DIM",
           "TINY_RESOLUTION", "TINY_PROMPTS"]

TINY_TEXT_DIM = 32
TINY_RESOLUTION = 32
_MERGES = ["t h", "th e</w>", "o f</w>", "i n", "a n", "an d</w>", "o n</w>"]
#: the prompts of ``tiny-data/prompts.txt``; image ``i`` of ``tiny-data/images`` has caption ``TINY_PROMPTS[i % 8]``
TINY_PROMPTS = ("a red cube", "a blue ball", "the green tree", "a cat on a mat", "an old car", "the sea at night",
                "a small house", "two yellow birds")


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte -> printable-unicode table (the 256 base symbols of its BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _write_tokenizer(folder: Path, max_length: int, pad_token: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _bytes_to_unicode()
    vocab_list = symbols + [s + "</w>" for s in symbols]
    for m in _MERGES:
        vocab_list.append(m.replace(" ", ""))
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token,
        "do_lower_case": True, "errors": "replace"}))


def write_tiny_sdxl(out: str | Path, seed: int = 0, max_length: int = 77) -> Path:
    """Write a tiny SDXL base in the diffusers layout to ``out`` (random weights from ``seed``); returns ``out``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(out / "tokenizer", max_length, "<|endoftext|>")
    _write_tokenizer(out / "tokenizer_2", max_length, "!")
    vocab = len(json.loads((out / "tokenizer" / "vocab.json").read_text()))
    bos, eos = vocab - 2, vocab - 1
    torch.manual_seed(seed)
    d = TINY_TEXT_DIM
    common = dict(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=max_length, hidden_act="gelu", bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    CLIPTextModel(CLIPTextConfig(projection_dim=d, **common)).save_pretrained(out / "text_encoder")
    CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=d, **common)).save_pretrained(out / "text_encoder_2")
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2DCrossAttn",
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1), cross_attention_dim=2 * d, norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + d)
    with torch.no_grad():  # a non-zero output layer, so the tiny teacher's predictions depend on its inputs
        unet.conv_out.weight.normal_(0, 0.05)
    unet.save_pretrained(out / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=8, sample_size=TINY_RESOLUTION, scaling_factor=0.13025).save_pretrained(out / "vae")
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                           prediction_type="epsilon", timestep_spacing="leading", steps_offset=1).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    return out


@dataclass(frozen=True)
class TinyFixtures:
    """Where the ``tiny`` preset's stand-ins lie inside its run folder ``OUT``.

    Attributes:
        base: ``OUT/tiny-base``, the model of :func:`write_tiny_sdxl` (what ``model.path`` names otherwise).
        prompts: ``OUT/tiny-data/prompts.txt``, :data:`TINY_PROMPTS` one per line (``data.prompts``).
        images: ``OUT/tiny-data/images``, PNGs + ``captions.jsonl`` (``data.real`` with ``data.real_kind=folder``).
    """

    base: Path
    prompts: Path
    images: Path


def tiny_fixtures(out: str | Path) -> TinyFixtures:
    """The paths of :class:`TinyFixtures` in the run folder ``out`` (nothing is written)."""
    out = Path(out)
    return TinyFixtures(out / "tiny-base", out / "tiny-data" / "prompts.txt", out / "tiny-data" / "images")


def _write_tiny_images(folder: Path, resolution: int, n: int = 8, seed: int = 0) -> None:
    """``n`` random smooth colour images (a 4 x 4 uniform-random RGB grid, bilinearly upsampled to ``resolution``)
    as PNGs, and their ``captions.jsonl``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(n):
        coarse = torch.rand(3, 4, 4, generator=g)
        img = torch.nn.functional.interpolate(coarse[None], size=(resolution, resolution), mode="bilinear")[0]
        arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
        lines.append(json.dumps({"file": f"{i:03d}.png", "caption": TINY_PROMPTS[i % len(TINY_PROMPTS)]}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")


def write_tiny_fixtures(out: str | Path, resolution: int, seed: int = 0) -> TinyFixtures:
    """Write the ``tiny`` preset's model (weights from ``seed``) and data (images at ``resolution`` px) into the run
    folder ``out``, each part only when it is missing, and return their :class:`TinyFixtures`.

    In a ``torch.distributed`` job rank 0 writes and every rank then waits at a barrier, so each rank returns with
    the files in place: call it on every rank (alone, the process writes and returns).
    """
    import torch.distributed as dist

    f = tiny_fixtures(out)
    group = dist.is_available() and dist.is_initialized()
    if not group or dist.get_rank() == 0:
        if not (f.base / "model_index.json").is_file():
            write_tiny_sdxl(f.base, seed=seed)
        f.prompts.parent.mkdir(parents=True, exist_ok=True)
        if not f.prompts.is_file():
            f.prompts.write_text("\n".join(TINY_PROMPTS) + "\n")
        if not (f.images / "captions.jsonl").is_file():
            _write_tiny_images(f.images, resolution)
    if group:
        dist.barrier()  # the other ranks read what rank 0 wrote
    return f
