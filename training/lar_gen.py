"""Train LAR-Gen's two stages (sec. 4.4) on the pack's training core (training/core.py) and export the files the
nodes load.

    # stage 1: the image-prompt adapter (projection + W'_k, W'_v of every cross-attention layer), beta 1
    accelerate launch -m faithful_inpaint.training.lar_gen --stage 1 --base sd-v1-5-inpainting.safetensors \\
        --clip-vision CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors --data quads/ --output-dir runs/lar1
    # stage 2: RefineNet's cross-attention + the detail-encoder MLP, main UNet and adapter frozen, beta 0.3
    accelerate launch -m faithful_inpaint.training.lar_gen --stage 2 --adapter runs/lar1/lar_gen-adapter.safetensors \\
        --base sd-v1-5-inpainting.safetensors --clip-vision CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors \\
        --data quads/ --output-dir runs/lar2

Accelerate (DDP / DeepSpeed / FSDP, several machines), mixed precision, gradient accumulation and checkpointing,
EMA, exact resume after a kill, logging: as ``training.train_branch`` (the same core; same option names).

What each stage trains (a model of the paper's Fig. 2; the main UNet is an SD *inpainting* UNet: Locate):
  * stage 1: every cross-attention layer of the frozen main UNet becomes Z + beta Z' (eq. 5-7) with beta = 1; the
    adapter's ``image_proj`` (the projection f of eq. 4: IP-Adapter-plus's 16-token Resampler by default, or the
    linear 4-token one) and its ``to_k_ip`` / ``to_v_ip`` are trained. W'_k, W'_v start as copies of the layer's
    W_k, W_v (IP-Adapter's initialisation). ``--adapter FILE`` starts from an existing adapter instead; the paper
    freezes the pre-trained projection then (``--freeze-projection``).
  * stage 2: the main UNet and the stage-1 adapter are frozen (beta 0.3); RefineNet, a copy of the main UNet, denoises
    the subject latent noised at the scene's t with its own noise, conditioned on MLP(CLIP(subject)) (eq. 8); its
    decoder self-attention inputs are appended to the main UNet's keys/values (eq. 9-10) through the nodes' own
    patches (patching.refinenet.capture_options / concat_options). Only RefineNet's ``attn2`` weights and the MLP
    learn (kernels.refinenet.is_trained_in_stage2).
  Both: epsilon (or v) MSE (eq. 11) on uniform timesteps; text and image prompts dropped independently
  (``--text-dropout``, ``--image-dropout``, default 0.1 each; the paper gives no value) for classifier-free guidance
  (eq. 12): a dropped text is the empty prompt, a dropped image the null image the node's unconditional rows see
  (zero embeddings for a linear projection, the CLIP hidden states of all-zero pixels for plus); with RefineNet, a
  row whose image is dropped gets strength 0 (plain self-attention), as the node's unconditional rows.

Exports (``<output-dir>/lar_gen-adapter.safetensors`` / ``lar_gen-refinenet.safetensors``): stage 1 writes the
public IP-Adapter key layout (``image_proj.*``, ``ip_adapter.{2n+1}.to_k_ip.weight`` / ``to_v_ip.weight``) that
``ImagePromptAdapterLoader`` reads (copy it to models/ipadapter); stage 2 the RefineNet file ``RefineNetLoader``
reads (models/refinenet; kernels/refinenet.py's format: the MLP + RefineNet's attn2 weights).

Data: sharded tar files, training/data.py's format with one more member per sample (:class:`QuadrupleWriter`)::

    000123.image.png     the source (scene) image
    000123.mask.png      the region to inpaint (8-bit, white = inpaint): the subject's mask in the scene
    000123.subject.png   the image prompt: the subject on its own (e.g. cut out on white)
    000123.local.txt     the local text prompt, what the masked region shows ("a red ceramic vase")
    000123.global.txt    the whole image's caption (kept for the shared reader; may equal the local text)

``python -m faithful_inpaint.training.lar_gen --make-synthetic DIR --count 64 --size 64`` writes a tiny synthetic set: the coloured
shapes of training/make_synthetic_data.py, the subject being the object cut out of the scene onto white.
Per sample (drawn from (seed, epoch, index), so a resumed run sees the same): the scene is resized (shorter side
to ``--resolution``) and square-cropped around the mask (the zoom-in of sec. 6.2), the mask turned into a user-like
mask (segmentation or box, training/masks.py) and eroded/dilated with probability ``--morph-prob``, the subject
augmented (flip, scale 0.8-1.0, shift) and resized to ``--resolution``, and the prompts dropped.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from faithful_inpaint.kernels import branch_losses as L
from faithful_inpaint.kernels import image_prompt as kip
from faithful_inpaint.kernels import refinenet as krn
from faithful_inpaint.kernels import toy_world as ktw
from faithful_inpaint.kernels.painta import sdpa
from faithful_inpaint.patching import blocks
from faithful_inpaint.patching import image_prompt as ip
from faithful_inpaint.patching import refinenet as prn
from faithful_inpaint.training import masks as M
from faithful_inpaint.training.base import FrozenBase, checkpoint_blocks
from faithful_inpaint.training.core import CoreConfig, Task, add_core_options, core_config_from_args, train
from faithful_inpaint.training.data import IMAGE_EXTENSIONS, KEY, ShardDataset, ShardError, ShardWriter

META_RECIPE = "faithful_inpaint.recipe"
STAGE_BETA = {1: 1.0, 2: 0.3}                 # sec. 4.4 / 6.2
OBJECT_MASK_KINDS = ("segmentation", "box")   # the mask prompt: the subject's region, exact or a box around it
SUBJECT_MEMBER = "subject.png"
# IP-Adapter-plus SD1.5's Resampler (dim, depth, queries; 64-wide heads): the projection the paper uses, N = 16.
PLUS_RESAMPLER = {"dim": 768, "depth": 4, "queries": 16}
TINY_CLIP_VISION = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "image_size": 28,
                    "hidden_size": 64, "projection_dim": 32, "intermediate_size": 64, "layer_norm_eps": 1e-5,
                    "model_type": "clip_vision_model", "num_attention_heads": 4, "num_channels": 3,
                    "num_hidden_layers": 2, "patch_size": 14}


# ------------------------------------------------------------------------------------------------ data

class QuadrupleWriter(ShardWriter):
    """training.data.ShardWriter plus the subject image: (source image, mask, subject image, local text)."""

    def write_quadruple(self, image: Image.Image, mask: Image.Image, subject: Image.Image, local_caption: str,
                        global_caption: str | None = None) -> None:
        key = f"{self.count:09d}"
        self.write(image, local_caption if global_caption is None else global_caption, mask=mask,
                   local_caption=local_caption, key=key)
        self.add_image(f"{key}.{SUBJECT_MEMBER}", subject.convert("RGB"))


class QuadrupleDataset(ShardDataset):
    """Map-style: ``dataset[epoch * len + i]`` (the core's key) is sample i as seen in ``epoch``.

    An item: ``image`` [3, R, R] and ``subject`` [3, R, R] in [0, 1], ``mask`` [1, R, R] (1 = inpaint), ``caption``
    (the local text, "" when dropped), ``drop_image`` (bool: the image prompt is null for this sample)."""

    def __init__(self, folder, resolution: int, seed: int = 0, text_dropout: float = 0.1,
                 image_dropout: float = 0.1, morph_prob: float = 0.3):
        super().__init__(folder, resolution, seed=seed)
        for shard, members in self.entries:
            missing = [m for m in ("mask.png", SUBJECT_MEMBER, "local.txt") if m not in members]
            if missing:
                raise ShardError(f"{self.shards[shard]}: sample {members[KEY]} lacks {missing} (LAR-Gen needs "
                                 "quadruples: image, mask, subject, local text)")
        self.text_dropout, self.image_dropout, self.morph_prob = text_dropout, image_dropout, morph_prob

    def __getitem__(self, key: int) -> dict:
        epoch, index = divmod(int(key), len(self.entries))
        rng = np.random.default_rng([self.seed, epoch, index])
        shard, members = self.entries[index]
        image = self._image(shard, members, next(e for e in IMAGE_EXTENSIONS if e in members), "RGB")
        obj = self._image(shard, members, "mask.png", "L")
        subject = self._image(shard, members, SUBJECT_MEMBER, "RGB")
        caption = self._text(shard, members, "local.txt")
        scene, obj = _zoom_in(image, obj, self.resolution, rng)
        mask = M.augment(M.object_mask(obj, rng, OBJECT_MASK_KINDS) if obj.any() else obj, rng, self.morph_prob)
        subject = _augment_subject(subject, self.resolution, rng)
        drop_text = rng.uniform() < self.text_dropout          # independent draws (sec. 4.5)
        drop_image = rng.uniform() < self.image_dropout
        return {"image": torch.from_numpy(scene).permute(2, 0, 1).contiguous(),
                "mask": torch.from_numpy((mask > 0.5).astype(np.float32))[None],
                "subject": torch.from_numpy(subject).permute(2, 0, 1).contiguous(),
                "caption": "" if drop_text else caption, "drop_image": bool(drop_image)}


def collate(items: list[dict]) -> dict:
    return {"image": torch.stack([it["image"] for it in items]), "mask": torch.stack([it["mask"] for it in items]),
            "subject": torch.stack([it["subject"] for it in items]), "caption": [it["caption"] for it in items],
            "drop_image": torch.tensor([it["drop_image"] for it in items])}


def _zoom_in(image: Image.Image, obj: Image.Image, size: int, rng: np.random.Generator):
    """Shorter side to ``size``, then a random ``size`` square that contains the centre of the mask's box."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image, obj = image.resize((nw, nh), Image.BICUBIC), obj.resize((nw, nh), Image.NEAREST)
    m = np.asarray(obj, dtype=np.float32) / 255.0 > 0.5
    box = M.bounding_box(m)
    cy, cx = ((box[0] + box[2]) // 2, (box[1] + box[3]) // 2) if box else (nh // 2, nw // 2)
    x0 = int(rng.integers(max(0, cx - size + 1), min(cx, nw - size) + 1))
    y0 = int(rng.integers(max(0, cy - size + 1), min(cy, nh - size) + 1))
    arr = np.asarray(image, dtype=np.float32)[y0:y0 + size, x0:x0 + size] / 255.0
    return arr, m[y0:y0 + size, x0:x0 + size].astype(np.float32)


def _augment_subject(subject: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random horizontal flip, scale 0.8-1.0 and shift on white, resized to ``size`` x ``size``."""
    if rng.uniform() < 0.5:
        subject = subject.transpose(Image.FLIP_LEFT_RIGHT)
    scale = rng.uniform(0.8, 1.0)
    inner = max(1, round(size * scale))
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    x0, y0 = (int(v) for v in rng.integers(0, size - inner + 1, size=2))
    canvas.paste(subject.resize((inner, inner), Image.BICUBIC), (x0, y0))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def write_quadruple_samples(out, samples, per_shard: int) -> Path:
    """Write (image, mask, subject, local caption, global caption) samples as quadruple shards."""
    with QuadrupleWriter(out, per_shard=per_shard) as writer:
        for sample in samples:
            writer.write_quadruple(*sample)
    return Path(out)


def synthetic_quadruple(rng: np.random.Generator, size: int):
    """One of make_synthetic_data's scenes as a quadruple, the subject = the object cut out onto white."""
    from faithful_inpaint.training.make_synthetic_data import make_sample

    image, mask, local, caption = make_sample(rng, size)
    m = np.asarray(mask) > 127
    y0, x0, y1, x1 = M.bounding_box(m.astype(np.float32)) or (0, 0, size, size)
    cut = np.where(m[..., None], np.asarray(image), 255).astype(np.uint8)[y0:y1, x0:x1]
    return image, mask, Image.fromarray(cut), local, caption


def write_synthetic(out, count: int, size: int = 64, per_shard: int = 64, seed: int = 0) -> Path:
    """A tiny quadruple set (:func:`synthetic_quadruple`)."""
    rng = np.random.default_rng(seed)
    return write_quadruple_samples(out, (synthetic_quadruple(rng, size) for _ in range(count)), per_shard)


# ------------------------------------------------------------------------------------------------ frozen models

class InpaintingBase(FrozenBase):
    """FrozenBase (text, VAE, schedule, gradient checkpointing) for an SD *inpainting* checkpoint (9 input
    channels: LAR-Gen's Locate mechanism), plus the inpainting UNet's extra input channels.
    ``random:<family>[:<size>]`` builds a random inpainting UNet."""

    def __init__(self, spec: str, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0):
        super().__init__(spec, device, dtype, seed, inpaint=True)

    @torch.no_grad()
    def masked_latent(self, images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The VAE latent (before ``process_in``) of ``images`` [B, 3, H, W] with the masked pixels grey, as
        InpaintModelConditioning encodes them (``mask`` None: the images as they are)."""
        if mask is not None:
            m = mask.round()
            images = images * (1 - m) + 0.5 * m
        return self.vae_encode(images)

    @torch.no_grad()
    def inpaint_channels(self, noisy: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None
                         ) -> torch.Tensor:
        """The extra input channels of the inpainting UNet through ComfyUI's own ``concat_cond`` (as sampling builds
        them): [mask, masked latent] from :meth:`masked_latent` and the pixel mask [B, 1, H, W]; ``mask`` None:
        ComfyUI's blank (mask 1 + the empty image's latent), as RefineNet's default ``inpaint_input``."""
        out = self._base.concat_cond(noise=noisy, device=noisy.device, concat_latent_image=latent,
                                     denoise_mask=mask)
        return out.to(noisy.device, noisy.dtype)


def load_clip_vision(spec: str, seed: int = 0):
    """ComfyUI's CLIP_VISION: a file (ComfyUI's CLIP vision files, or the toy world's ``toy_clip_vision.safetensors``),
    or ``random:tiny`` (2 layers, 64 wide) / ``random:h`` (ViT-H-14's config) with random weights, for tests and dry
    runs."""
    import comfy.clip_vision

    if not spec.startswith("random:"):
        if ktw.file_kind(spec) == "clip_vision":
            from faithful_inpaint.patching.toy_world import load_clip_vision as load_toy_clip_vision

            return load_toy_clip_vision(spec)
        return comfy.clip_vision.load(spec)
    from faithful_inpaint.devtools.random_models import randomise

    size = spec.split(":")[1]
    if size == "h":
        path = Path(comfy.clip_vision.__file__).resolve().parent / "clip_vision_config_h.json"
        model = comfy.clip_vision.ClipVisionModel(str(path))
    else:
        model = ip.clip_vision_from_config(TINY_CLIP_VISION)
    with torch.no_grad():
        randomise(model.model, seed)
    for p in model.model.parameters():
        p.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------------------ adapter

def new_adapter(unet, clip_vision, variant: str, resampler: dict) -> nn.Module:
    """A fresh image-prompt adapter for ``unet``: a trainable projection (standard initialisation; the Resampler's
    queries random) and W'_k, W'_v copied from each cross-attention layer's W_k, W_v."""
    embed_dim, hidden_dim = ip.clip_vision_widths(clip_vision, "lar_gen")
    layers = ip.cross_attention_layers(unet)
    context_dim = int(layers[0].module.attn2.to_k.in_features)
    widths = tuple(int(b.module.attn2.to_k.out_features) for b in layers)
    if variant == kip.PLUS:
        feature_dim = hidden_dim
        projection = kip.Resampler(dim=resampler["dim"], depth=resampler["depth"],
                                   heads=max(1, resampler["dim"] // kip.RESAMPLER_HEAD_WIDTH),
                                   queries=resampler["queries"], feature_dim=feature_dim, context_dim=context_dim)
        with torch.no_grad():
            projection.latents.copy_(torch.randn_like(projection.latents) / resampler["dim"] ** 0.5)
    else:
        feature_dim = embed_dim
        projection = kip.LinearProjection(feature_dim, context_dim, tokens=4)
    adapter = kip.ImagePromptAdapter(kip.AdapterSpec(variant, context_dim, feature_dim, widths), projection)
    with torch.no_grad():
        for n, info in enumerate(layers):
            adapter.to_k_ip[n].weight.copy_(info.module.attn2.to_k.weight.float())
            adapter.to_v_ip[n].weight.copy_(info.module.attn2.to_v.weight.float())
    return adapter


def load_adapter_file(path: str) -> nn.Module:
    """An adapter file (public layout) as a trainable fp32 module."""
    import comfy.utils

    adapter = kip.ImagePromptAdapter.from_state_dict(comfy.utils.load_torch_file(path, safe_load=True))
    for module in adapter.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(p.detach().float().clone())
    return adapter


def adapter_state_dict(adapter: nn.Module) -> dict:
    """The public IP-Adapter key layout: ``image_proj.*`` and ``ip_adapter.{2n+1}.to_k_ip/to_v_ip.weight``."""
    sd = {f"image_proj.{k}": v for k, v in adapter.projection.state_dict().items()}
    for n, (k, v) in enumerate(zip(adapter.to_k_ip, adapter.to_v_ip)):
        sd[f"ip_adapter.{2 * n + 1}.to_k_ip.weight"] = k.weight
        sd[f"ip_adapter.{2 * n + 1}.to_v_ip.weight"] = v.weight
    return sd


def attention_options(layers, image_kv, beta: float) -> dict:
    """Transformer options whose attn1 / attn2 are PyTorch attention (it has a backward) and whose cross-attention
    adds the image prompt per row: Z + beta * Attention(Q, K'_row, V'_row) (eq. 7). ``image_kv`` maps a layer key
    to (K' [B, T, w], V' [B, T, w]); ``layers`` are the keys of every transformer block."""

    def self_attention(q, k, v, extra_options):
        return sdpa(q, k, v, extra_options["n_heads"])

    def cross(key):
        def replace(q, k, v, extra_options):
            text = sdpa(q, k, v, extra_options["n_heads"])
            if key not in image_kv:
                return text
            k_image, v_image = image_kv[key]
            return kip.decoupled_attention(text, q, k_image.to(q.dtype), v_image.to(q.dtype),
                                           extra_options["n_heads"], beta)
        return replace

    return {"patches_replace": {"attn1": {key: self_attention for key in layers},
                                "attn2": {key: cross(key) for key in layers}}}


# ------------------------------------------------------------------------------------------------ the task

class LarGenTask(Task):
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.stage = args.stage
        self.beta = args.beta if args.beta is not None else STAGE_BETA[self.stage]
        self.name = "lar_gen-adapter" if self.stage == 1 else "lar_gen-refinenet"
        self.base = self.clip_vision = self.adapter = None

    def setup(self, device: torch.device, frozen_dtype: torch.dtype) -> None:
        a = self.args
        self.base = InpaintingBase(a.base, device, frozen_dtype, seed=a.seed)
        self.clip_vision = load_clip_vision(a.clip_vision, a.seed)
        unet = self.base.unet
        self.blocks = [b.key for b in blocks.transformer_blocks(unet)]
        self.cross_layers = [b.key for b in ip.cross_attention_layers(unet)]
        torch.manual_seed(a.seed)              # new modules' initialisation is the same on every process
        if self.stage == 1:
            adapter = (load_adapter_file(a.adapter) if a.adapter else
                       new_adapter(unet, self.clip_vision, a.projection, {"dim": a.resampler_dim,
                                   "depth": a.resampler_depth, "queries": a.resampler_queries}))
            ip.check_clip_vision(adapter.spec, self.clip_vision, "lar_gen --clip-vision")
            if a.freeze_projection:
                adapter.projection.requires_grad_(False)
            self.modules = nn.ModuleDict({"adapter": adapter}).to(device)
        else:
            if not a.adapter:
                raise ValueError("stage 2 needs --adapter: the stage-1 adapter file (frozen with the main UNet)")
            self.adapter = load_adapter_file(a.adapter).requires_grad_(False).to(device)
            ip.check_clip_vision(self.adapter.spec, self.clip_vision, "lar_gen --clip-vision")
            hidden = ip.clip_vision_widths(self.clip_vision, "lar_gen")[1]
            self.refine_config = krn.RefineNetConfig(
                clip_dim=hidden, hidden_dim=a.refinenet_hidden_dim or hidden,
                context_dim=int(self.base.unet_config["context_dim"]),
                unet_in_channels=int(self.base.unet_config.get("in_channels", 4)), inpaint_input=a.inpaint_input)
            refinenet = copy.deepcopy(unet).float()
            for name, p in refinenet.named_parameters():
                p.requires_grad_(krn.is_trained_in_stage2(name))
            self.decoder_layers = prn.decoder_layers(unet, (1, 2, 4, 8))
            self.modules = nn.ModuleDict({"refinenet": refinenet,
                                          "detail_encoder": krn.DetailEncoder(self.refine_config)}).to(device)
        self.modules.train()
        self.null_features = self._null_features().to(device)

    def _null_features(self) -> torch.Tensor:
        """The null image's CLIP features, as the node's unconditional rows get them."""
        spec = (self.modules["adapter"] if self.stage == 1 else self.adapter).spec
        if spec.variant == "linear":
            return torch.zeros(1, spec.feature_dim)
        return ip.zero_pixel_hidden_states(self.clip_vision).float()

    def dataset(self):
        a = self.args
        return QuadrupleDataset(a.data, a.resolution, seed=a.seed, text_dropout=a.text_dropout,
                                image_dropout=a.image_dropout, morph_prob=a.morph_prob)

    def collate(self, items):
        return collate(items)

    def enable_gradient_checkpointing(self) -> None:
        self.base.checkpoint_blocks()
        if self.stage == 2:
            unet = self.modules["refinenet"]
            checkpoint_blocks(list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks))

    @torch.no_grad()
    def prepare(self, batch: dict) -> dict:
        images, mask, subject = batch["image"], batch["mask"], batch["subject"]
        spec = (self.modules["adapter"] if self.stage == 1 else self.adapter).spec
        out = self.clip_vision.encode_image(subject.permute(0, 2, 3, 1))
        features = out[spec.feature].float().to(images.device)
        drop = batch["drop_image"].to(images.device)
        features = torch.where(drop.view(-1, *[1] * (features.dim() - 1)),
                               self.null_features.to(features).expand_as(features), features)
        prepared = {"latents": self.base.encode_images(images), "mask": mask,
                    "masked_latent": self.base.masked_latent(images, mask),
                    "context": self.base.encode_text(batch["caption"]).context, "image_features": features,
                    "drop_image": drop}
        if self.stage == 2:
            patches = out["penultimate_hidden_states" if self.refine_config.clip_layer == "penultimate"
                          else "last_hidden_state"]
            prepared.update(subject_latents=self.base.encode_images(subject),
                            subject_raw=self.base.masked_latent(subject, None),
                            subject_features=patches.float().to(images.device))
            if self.refine_config.inpaint_input == "subject":       # mask 0 + the clean subject
                prepared["subject_mask"] = torch.zeros_like(mask)
        return prepared

    def loss(self, modules: nn.ModuleDict, batch: dict) -> dict:
        base = self.base
        x0 = batch["latents"]
        noise, t, x_t = base.noise_latents(x0)
        adapter = modules["adapter"] if self.stage == 1 else self.adapter
        tokens = adapter.projection(batch["image_features"])
        image_kv = {key: (F.linear(tokens, k.weight), F.linear(tokens, v.weight))
                    for key, k, v in zip(self.cross_layers, adapter.to_k_ip, adapter.to_v_ip)}
        options = attention_options(self.blocks, image_kv, self.beta)
        if self.stage == 2:
            options = self._refinenet_options(modules, batch, t, options)
        concat = base.inpaint_channels(x_t, batch["masked_latent"], batch["mask"])
        x_in = torch.cat([x_t, concat], dim=1).to(base.dtype)
        pred = base.unet(x_in, t.float(), context=batch["context"].to(base.dtype), transformer_options=options)
        loss = L.noise_mse(pred, base.training_target(x0, noise, t))
        return {"loss": loss}

    def _refinenet_options(self, modules: nn.ModuleDict, batch: dict, t: torch.Tensor, options: dict) -> dict:
        """RefineNet's pass on the subject (noised at the scene's t with its own noise) and the main UNet's options
        that append its decoder features (eq. 9-10); rows whose image prompt is dropped get strength 0."""
        z = batch["subject_latents"]
        z_t = L.add_noise(z, torch.randn_like(z), t, self.base.alphas_cumprod)   # the same t, independent noise
        extra = self.base.inpaint_channels(z_t, batch["subject_raw"], batch.get("subject_mask"))
        x_in = torch.cat([z_t, extra], dim=1)
        refinenet, encoder = modules["refinenet"], modules["detail_encoder"]
        tokens = encoder(batch["subject_features"])                               # eq. 8
        store: dict = {}
        own = attention_options(self.blocks, {}, 0.0)
        refinenet(x_in.to(refinenet.input_blocks[0][0].weight.dtype), t.float(),
                  context=tokens.to(refinenet.input_blocks[0][0].weight.dtype),
                  transformer_options=prn.capture_options(self.decoder_layers, store, own))
        strength = (~batch["drop_image"]).float()
        return prn.concat_options(store, strength, options)

    def export(self, modules: nn.ModuleDict, path: Path) -> Path:
        from safetensors.torch import save_file

        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.args.export_dtype]
        recipe = {META_RECIPE: json.dumps({"recipe": "lar_gen", "stage": self.stage, "beta": self.beta,
                                           "base": self.args.base})}
        if self.stage == 1:
            sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in adapter_state_dict(modules["adapter"]).items()}
            save_file(sd, str(path), metadata=recipe)
            return Path(path)
        unet = {k: v.detach().to("cpu", dtype) for k, v in modules["refinenet"].state_dict().items()
                if krn.is_trained_in_stage2(k)}
        encoder = {k: v.detach().to("cpu", dtype) for k, v in modules["detail_encoder"].state_dict().items()}
        tensors, metadata = krn.state_dict_for_file(self.refine_config, encoder, unet)
        save_file(tensors, str(path), metadata={**metadata, **recipe})
        return Path(path)


# ------------------------------------------------------------------------------------------------ command line

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make-synthetic", metavar="DIR", help="only write a synthetic quadruple set to DIR and exit")
    p.add_argument("--count", type=int, default=64, help="samples of --make-synthetic")
    p.add_argument("--size", type=int, default=64, help="image side of --make-synthetic")
    g = p.add_argument_group("what to train")
    g.add_argument("--stage", type=int, choices=(1, 2), default=1)
    g.add_argument("--base", help="SD inpainting checkpoint, or random:<sd15|sd2|sdxl>[:tiny|full]")
    g.add_argument("--clip-vision", default="random:tiny",
                   help="ComfyUI CLIP vision file (ViT-H-14 for SD1.5), or random:tiny / random:h")
    g.add_argument("--adapter", help="stage 2: the stage-1 adapter file; stage 1: start from this adapter")
    g.add_argument("--projection", default="plus", choices=("plus", "linear"),
                   help="stage 1 without --adapter: the projection (paper: IP-Adapter-plus's, 16 tokens)")
    g.add_argument("--resampler-dim", type=int, default=PLUS_RESAMPLER["dim"])
    g.add_argument("--resampler-depth", type=int, default=PLUS_RESAMPLER["depth"])
    g.add_argument("--resampler-queries", type=int, default=PLUS_RESAMPLER["queries"])
    g.add_argument("--freeze-projection", action="store_true",
                   help="stage 1: train W'_k, W'_v only (the paper, starting from a pre-trained --adapter)")
    g.add_argument("--beta", type=float, default=None, help="image-prompt strength (default: 1 stage 1, 0.3 stage 2)")
    g.add_argument("--refinenet-hidden-dim", type=int, default=None, help="detail-encoder MLP width (default: CLIP's)")
    g.add_argument("--inpaint-input", default="blank", choices=("blank", "subject"),
                   help="what RefineNet's inpainting channels get (kernels/refinenet.py)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="folder of *.tar quadruple shards (format: this module's docstring)")
    g.add_argument("--resolution", type=int, default=512)
    g.add_argument("--text-dropout", type=float, default=0.1)
    g.add_argument("--image-dropout", type=float, default=0.1)
    g.add_argument("--morph-prob", type=float, default=0.3)
    add_core_options(p.add_argument_group("optimisation (as training.train_branch)"),
                     p.add_argument_group("checkpoints, export"), max_steps=20000, lr=1e-5,
                     lr_help="paper: 1e-5 in both stages",
                     max_steps_help="paper: 20k steps per stage at batch 128", output_dir_required=False)
    return p


def core_config(args: argparse.Namespace) -> CoreConfig:
    # RefineNet's attn2 after the last captured decoder layer cannot reach the loss: DDP must allow that
    return core_config_from_args(args, find_unused_parameters=args.stage == 2)

def main(argv=None, callbacks: tuple = ()):
    p = parser()
    args = p.parse_args(argv)
    if args.make_synthetic:
        path = write_synthetic(args.make_synthetic, args.count, args.size, seed=args.seed)
        print(f"wrote {args.count} quadruples to {path}")
        return None
    for name in ("base", "data", "output_dir"):
        if not getattr(args, name):
            p.error(f"--{name.replace('_', '-')} is required for training")
    return train(core_config(args), LarGenTask(args), callbacks)


if __name__ == "__main__":
    main(sys.argv[1:])
