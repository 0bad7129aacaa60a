r"""Memory plan of SDXL DMD2 training per memory mode, from a meta-device build of SDXL base's UNet (no weights).

``python -m dmd2.recipes.sdxl memory [--json]`` prints the table (``train.batch_size``, ``model.resolution`` and
``model.lora_rank`` apply). Counted per GPU, without FSDP sharding:

* **weights**: frozen networks in bf16 (2 B/param: teacher, LoRA bases), trained ones fp32 (4 B/param: master
  weights under bf16 autocast); the text encoders (``text_encoder_bytes`` per parameter: 4 = fp32, the paper
  preset) and VAE (fp32) are listed apart.
* **grads**: fp32, 4 B per trained parameter, for ONE network at a time (the trainer frees gradients after each
  optimizer step and freezes the other network during a phase): the larger of generator and critic.
* **Adam**: AdamW's two fp32 moments, 8 B per trained parameter, generator + critic (fake score and GAN head).
* **activations**: tensors saved for backward by one UNet forward at ``batch`` x ``resolution`` (latents at 1/8),
  measured with ``torch.autograd.graph.saved_tensors_hooks`` on the meta device in bf16, attention modelled as a
  fused kernel (saves q, k, v, output and the fp32 log-sum-exp, as flash / memory-efficient SDPA do). With gradient
  checkpointing (diffusers' per-block recomputation of ResNet and transformer blocks) the estimate is: what the
  forward saves outside those blocks + their inputs + the largest block's own activations (recomputed one at a time).
  The critic update keeps three fake-score forwards alive at once (denoising loss, GAN on fakes, GAN on reals), the
  generator update two (generator + fake score for the GAN term), so the peak is **3 forwards**. Norm layers under
  autocast keep fp32 outputs and the allocator adds fragmentation: read the activations as an estimate (+-30%).

Host memory (RAM) per rank, for the run each mode is made for: ``full`` under FSDP2 on ``world`` ranks, the LoRA
modes as one process (DDP ranks each hold the same). N = UNet parameters, G / C = trained generator / critic
parameters, T + V = text encoders + VAE:

* **load**: a rank that reads the weights holds the fp32 UNet as loaded, its fp32 trained copies (``full``: two,
  12 N bytes; ``lora``: the fake score, 8 N; ``shared-base``: 4 N) and the text encoders + VAE in fp32 (4 (T + V));
  under FSDP2 only rank 0 reads (:attr:`~dmd2.train.distributed.DistInfo.loads_weights`), the other ranks build the
  UNets on the meta device and receive their shards on the GPU: 4 (T + V).
* **checkpoint**: ``sharded`` (the FSDP2 default) writes each rank's shards of the fp32 weights and AdamW moments:
  12 (G + C) / world; ``full`` gathers them all on rank 0 and copies the file being written:
  12 (G + C) + 4 max(G, C).
* **resume**: ``sharded`` reads each rank's pieces, 12 (G + C) / world; ``full`` reads the whole checkpoint on every
  rank, 12 (G + C). (No EMA: the paper preset keeps none; an EMA adds 4 G, or 4 G / world sharded.)
"""
from __future__ import annotations

import json
from typing import Sequence

import torch
from torch import nn

from ..models.sdxl import DEFAULT_LORA_TARGETS, unet_config_path
from ..train.config import GANConfig

__all__ = ["sdxl_unet_meta", "lora_param_count", "activation_bytes", "memory_plan", "memory_table",
           "TEXT_ENCODER_CONFIGS", "VAE_CONFIG"]

#: CLIP ViT-L/14 text tower (SDXL's text_encoder) and OpenCLIP ViT-bigG/14 text tower with projection (text_encoder_2)
TEXT_ENCODER_CONFIGS = (
    dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
         max_position_embeddings=77, projection_dim=768),
    dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
         max_position_embeddings=77, projection_dim=1280),
)
#: SDXL's VAE
VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                  latent_channels=4, norm_num_groups=32, sample_size=1024)
GB = 1e9


def sdxl_unet_meta(dtype: torch.dtype = torch.float32) -> nn.Module:
    """SDXL base's ``UNet2DConditionModel`` on the meta device (2,567,463,684 parameters, no memory)."""
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in json.loads(unet_config_path().read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel(**cfg).to(dtype)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_param_count(unet: nn.Module, rank: int, targets: Sequence[str] = DEFAULT_LORA_TARGETS) -> int:
    """Parameters of a rank-``rank`` LoRA on the modules whose names end with one of ``targets``:
    ``r (in + out)`` per Linear, ``r (in k_h k_w + out)`` per Conv2d (peft: A is a conv with the layer's kernel, B 1x1)."""
    total = 0
    for name, m in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(m, nn.Linear):
            total += rank * (m.in_features + m.out_features)
        elif isinstance(m, nn.Conv2d):
            total += rank * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
    return total


class _FusedAttention(torch.autograd.Function):
    """Shape model of flash / memory-efficient attention: saves q, k, v, out and an fp32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, g):  # pragma: no cover - never run (meta estimate)
        raise RuntimeError("shape model only")


def activation_bytes(unet: nn.Module, batch: int, resolution: int, text_len: int = 77) -> dict[str, int]:
    """Bytes saved for backward by one forward of ``unet`` (meta, its dtype) at ``batch`` x ``resolution`` px.

    Returns ``{"full": ..., "checkpointed": ...}`` (module docstring).
    """
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    cfg = unet.config
    dtype = unet.conv_in.weight.dtype
    h = resolution // 8
    dev = torch.device("meta")
    x = torch.empty(batch, cfg.in_channels, h, h, device=dev, dtype=dtype, requires_grad=True)
    t = torch.full((batch,), 500, device=dev, dtype=torch.long)
    ehs = torch.empty(batch, text_len, cfg.cross_attention_dim, device=dev, dtype=dtype)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    added = {"text_embeds": torch.empty(batch, pooled, device=dev, dtype=dtype),
             "time_ids": torch.empty(batch, 6, device=dev, dtype=dtype)}
    seen: dict[int, int] = {}
    keep = []
    unit_stack: list[int] = []
    unit_bytes: dict[int, int] = {}
    unit_inputs: dict[int, int] = {}

    def pack(tensor):
        if id(tensor) not in seen:
            keep.append(tensor)
            nbytes = tensor.numel() * tensor.element_size()
            seen[id(tensor)] = nbytes
            if unit_stack:
                unit_bytes[unit_stack[0]] = unit_bytes.get(unit_stack[0], 0) + nbytes
        return tensor

    units = [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]
    handles = []
    for u in units:
        def pre(mod, args, kwargs):
            if not unit_stack:
                first = args[0] if args else kwargs.get("hidden_states")
                unit_inputs[id(mod)] = first.numel() * first.element_size()
            unit_stack.append(id(mod))

        def post(mod, args, kwargs, out):
            unit_stack.pop()

        handles.append(u.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(u.register_forward_hook(post, with_kwargs=True))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fused(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        return _FusedAttention.apply(q, k, v)

    torch.nn.functional.scaled_dot_product_attention = fused
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
            unet(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added, return_dict=False)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for hd in handles:
            hd.remove()
    full = sum(seen.values())
    inside = sum(unit_bytes.values())
    ckpt = full - inside + sum(unit_inputs.values()) + max(unit_bytes.values(), default=0)
    return {"full": full, "checkpointed": ckpt}


def _frozen_extras() -> dict[str, int]:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        te1 = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIGS[0]))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_CONFIGS[1]))
        vae = AutoencoderKL(**VAE_CONFIG)
    return {"text_encoders": _count(te1) + _count(te2), "vae": _count(vae)}


def host_memory(unet_params: int, gen: int, critic: int, loaded_copies: int, text_vae_params: int, world: int) -> dict:
    """Host bytes per rank at load, checkpoint and resume (module docstring); ``loaded_copies``: fp32 UNet-sized
    tensors a reading rank holds at the peak of the build (3 for ``full``), ``world``: ranks sharding the trained
    networks (1: unsharded)."""
    extras = 4 * text_vae_params
    trained = 12 * (gen + critic)  # fp32 weights + two fp32 AdamW moments
    return {
        "world": world,
        "load_rank0": 4 * loaded_copies * unet_params + extras,
        "load_other_ranks": extras if world > 1 else 4 * loaded_copies * unet_params + extras,
        "checkpoint_sharded": trained // world,
        "checkpoint_full_rank0": trained + 4 * max(gen, critic),
        "resume_sharded": trained // world,
        "resume_full": trained,
    }


def memory_plan(gan: GANConfig, batch: int = 2, resolution: int = 1024, lora_rank: int = 64,
                targets: Sequence[str] = DEFAULT_LORA_TARGETS, forwards_alive: int = 3, text_encoder_bytes: int = 4,
                world: int = 64, ranks_per_node: int = 8) -> dict:
    """Bytes per GPU for each memory mode (module docstring) with the GAN head ``gan`` (a run's ``cfg.gan``);
    ``forwards_alive`` UNet forwards' activations at once; host bytes per rank with ``full`` sharded over ``world``
    ranks, ``ranks_per_node`` to a host."""
    from ..core import GANHead

    unet = sdxl_unet_meta(torch.bfloat16)
    n = _count(unet)
    lora = lora_param_count(unet, lora_rank, targets)
    with torch.device("meta"):
        head = _count(GANHead([unet.config.block_out_channels[-1]], hidden=gan.hidden, depth=gan.depth,
                              final_conv=gan.final_conv))
    act = activation_bytes(unet, batch, resolution)
    extras = _frozen_extras()
    other = text_encoder_bytes * extras["text_encoders"] + 4 * extras["vae"]
    modes = {
        # (frozen params, generator trained, critic trained, fp32 UNet copies at the build's peak, ranks sharding)
        "full": (n, n, n + head, 3, world),
        "lora": (2 * n, lora, n + head, 2, 1),
        "shared-base": (n, lora, lora + head, 1, 1),
    }
    out = {"unet_params": n, "lora_params": lora, "gan_head_params": head, "batch": batch, "resolution": resolution,
           "lora_rank": lora_rank, "text_encoder_params": extras["text_encoders"], "vae_params": extras["vae"],
           "activations_per_forward": act, "forwards_alive": forwards_alive, "world": world,
           "ranks_per_node": ranks_per_node, "modes": {}}
    for mode, (frozen, gen, critic, copies, ranks) in modes.items():
        weights = 2 * frozen + 4 * (gen + critic)
        grads = 4 * max(gen, critic)
        adam = 8 * (gen + critic)
        a_ckpt, a_full = forwards_alive * act["checkpointed"], forwards_alive * act["full"]
        out["modes"][mode] = {
            "trained_params": gen + critic, "weights": weights, "grads": grads, "adam": adam, "text_encoders_vae": other,
            "ema_fp32": 4 * gen, "activations_checkpointed": a_ckpt, "activations_full": a_full,
            "total_checkpointed": weights + grads + adam + other + a_ckpt,
            "total_full": weights + grads + adam + other + a_full,
            "host": host_memory(n, gen, critic, copies, extras["text_encoders"] + extras["vae"], ranks),
        }
    return out


def memory_table(plan: dict) -> str:
    """Markdown table of a :func:`memory_plan` (GB = 1e9 bytes)."""
    g = lambda b: f"{b / GB:.1f}"  # noqa: E731
    rows = [
        f"SDXL UNet {plan['unet_params']:,} params; LoRA rank {plan['lora_rank']}: {plan['lora_params']:,} params; "
        f"GAN head {plan['gan_head_params']:,}; batch {plan['batch']} at {plan['resolution']} px; "
        f"activations per UNet forward: {g(plan['activations_per_forward']['full'])} GB "
        f"({g(plan['activations_per_forward']['checkpointed'])} GB with gradient checkpointing), "
        f"{plan['forwards_alive']} forwards alive at the peak.",
        "",
        "| mode | trained params | weights | grads | AdamW | text enc. + VAE | activations (ckpt) | total (ckpt) | total (no ckpt) | + EMA "
        "| host/rank at load (rank 0 / others) | host/rank at checkpoint: sharded (full, rank 0) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, r in plan["modes"].items():
        h = r["host"]
        rows.append(f"| `{mode}` | {r['trained_params'] / 1e6:,.0f} M | {g(r['weights'])} | {g(r['grads'])} | {g(r['adam'])} | "
                    f"{g(r['text_encoders_vae'])} | {g(r['activations_checkpointed'])} | **{g(r['total_checkpointed'])}** | "
                    f"{g(r['total_full'])} | {g(r['ema_fp32'])} | {g(h['load_rank0'])} / {g(h['load_other_ranks'])} | "
                    f"{g(h['checkpoint_sharded'])} ({g(h['checkpoint_full_rank0'])}) |")
    rows.append("")
    rows.append("GB = 1e9 bytes, per GPU without sharding; FSDP2 (`full` mode under torchrun) divides weights, grads "
                "and AdamW by the number of GPUs.")
    h, w, k = plan["modes"]["full"]["host"], plan["world"], plan["ranks_per_node"]
    rows.append(f"Host RAM per rank: `full` sharded over {w} ranks, the LoRA modes as one process. `full` at {w} "
                f"ranks ({w // k} nodes x {k}): a node holds {g(h['load_rank0'] + (k - 1) * h['load_other_ranks'])} GB "
                f"at load on rank 0's node and {g(k * h['load_other_ranks'])} GB on the others "
                f"(every rank reading the weights: {g(k * h['load_rank0'])} GB); a resume reads "
                f"{g(h['resume_sharded'])} GB per rank sharded, {g(h['resume_full'])} GB per rank from a `full` checkpoint.")
    return "\n".join(rows)
