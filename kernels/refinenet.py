"""LAR-Gen's RefineNet (sec. 4.3, eq. 8-10), host-free: the detail encoder, the key/value concatenation and the
file format shared by the loader node and the stage-2 training recipe.

RefineNet is a copy of the base UNet that denoises the subject image, noised to the main UNet's noise level at every
step. Its cross-attention attends to *detail tokens* instead of text:

    c'_i = MLP(CLIP(x_obj))                                                   (eq. 8, the detail encoder)

and in each self-attention layer of its decoder the layer's input features (the normalised hidden states the layer
attends over, c_obj) are kept. The main UNet's self-attention in the same layer then attends over its own features
and the subject's:

    O_s = Softmax(Q_s K_s^T / sqrt(d)) V_s,  Q_s = c_ctx W_q,  K_s = [c_ctx; c_obj] W_k,  V_s = [c_ctx; c_obj] W_v
                                                                               (eq. 9-10)

Strength (not in the paper, whose knob is beta of the image-prompt attention): the appended tokens are
``c_ctx + s * (c_obj - c_ctx)``. At s = 1 this is eq. 10; at s = 0 every key/value appears twice, and attention over
duplicated keys equals attention over the originals (each weight halves, each value counts twice), so s = 0 is the
plain self-attention. Rows of a batch may have different s (the unconditional rows of classifier-free guidance use
0 when the image prompt is null for them). This needs c_obj and c_ctx to have the same token count, which holds when
the subject latent is resized to the latent being sampled (the patching does that).

File format (``.safetensors``): metadata ``faithful_inpaint.kind = "refinenet"`` and ``faithful_inpaint.config``
= the JSON of :class:`RefineNetConfig`; tensors ``detail_encoder.*`` (the MLP) and ``unet.<key>`` with ``<key>`` a
key of ComfyUI's UNet state dict (the LDM layout, e.g. ``output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight``).
The ``unet.*`` tensors replace the base UNet's at load time; every other weight of RefineNet is the base UNet's, so a
stage-2 export carries only what stage 2 trains: the cross-attention layers (:func:`is_trained_in_stage2`) and the MLP.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Mapping

import torch
import torch.nn as nn

KIND_KEY = "faithful_inpaint.kind"
CONFIG_KEY = "faithful_inpaint.config"
KIND = "refinenet"
DETAIL_ENCODER_PREFIX = "detail_encoder."
UNET_PREFIX = "unet."
FORMAT_VERSION = 1

CLIP_LAYERS = ("penultimate", "last")       # which CLIP-vision hidden states are the patch features
# What a 9-channel (inpainting) RefineNet gets in its extra input channels:
#   "blank":   mask 1 everywhere + the latent of an empty image (the whole subject is generated: pure denoising);
#   "subject": mask 0 + the clean subject latent (the subject is fully "known").
INPAINT_INPUTS = ("blank", "subject")


@dataclass(frozen=True)
class RefineNetConfig:
    clip_dim: int = 1280            # width of the CLIP-vision patch features (ViT-H-14 hidden states: 1280)
    hidden_dim: int = 1280          # MLP hidden width
    context_dim: int = 768          # MLP output = the UNet's cross-attention context width (768 SD1.x, 2048 SDXL)
    clip_layer: str = "penultimate"
    unet_in_channels: int = 9       # input channels of the UNet RefineNet was trained from (9 = inpainting)
    inpaint_input: str = "blank"
    version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.clip_layer not in CLIP_LAYERS:
            raise ValueError(f"clip_layer must be one of {CLIP_LAYERS}, not {self.clip_layer!r}")
        if self.inpaint_input not in INPAINT_INPUTS:
            raise ValueError(f"inpaint_input must be one of {INPAINT_INPUTS}, not {self.inpaint_input!r}")
        for name in ("clip_dim", "hidden_dim", "context_dim", "unet_in_channels"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.version > FORMAT_VERSION:
            raise ValueError(f"format version {self.version} is newer than this pack reads ({FORMAT_VERSION}); "
                             "update the node pack")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RefineNetConfig":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        return cls(**data)


class DetailEncoder(nn.Module):
    """The MLP of eq. 8: CLIP-vision patch features [B, T, clip_dim] -> detail tokens [B, T, context_dim]."""

    def __init__(self, config: RefineNetConfig):
        super().__init__()
        self.proj_in = nn.Linear(config.clip_dim, config.hidden_dim)
        self.act = nn.GELU()
        self.proj_out = nn.Linear(config.hidden_dim, config.context_dim)
        self.norm = nn.LayerNorm(config.context_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.to(self.proj_in.weight.dtype)
        return self.norm(self.proj_out(self.act(self.proj_in(x))))


def appended_tokens(context: torch.Tensor, subject: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """The tokens appended to a self-attention's keys/values: ``context + s * (subject - context)`` per row.

    context, subject: [B, N, C] (same N); strength: [B]. s = 1 gives the subject features (eq. 10)."""
    if context.shape != subject.shape:
        raise ValueError(f"subject features {tuple(subject.shape)} do not match the layer's {tuple(context.shape)}")
    s = strength.to(device=context.device, dtype=context.dtype).view(-1, 1, 1)
    return torch.lerp(context, subject.to(context), s)   # exact at s = 0 and s = 1


def concat_keys_values(n: torch.Tensor, keys_in: torch.Tensor, values_in: torch.Tensor, subject: torch.Tensor,
                       strength: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 10 on the inputs of a self-attention (before W_k, W_v): [keys_in; extra], [values_in; extra] with
    extra = :func:`appended_tokens` of the layer's own features ``n`` and the subject's."""
    extra = appended_tokens(n, subject, strength)
    return torch.cat([keys_in, extra], dim=1), torch.cat([values_in, extra], dim=1)


def is_trained_in_stage2(unet_key: str) -> bool:
    """Stage 2 (sec. 4.4) trains RefineNet's cross-attention layers only: every parameter of an ``attn2``."""
    return ".attn2." in unet_key


def state_dict_for_file(config: RefineNetConfig, detail_encoder: Mapping[str, torch.Tensor],
                        unet: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a RefineNet file; ``unet`` holds the RefineNet UNet weights that differ from the base
    (for a stage-2 export: the keys for which :func:`is_trained_in_stage2` is true)."""
    tensors = {DETAIL_ENCODER_PREFIX + k: v.detach().contiguous() for k, v in detail_encoder.items()}
    tensors.update({UNET_PREFIX + k: v.detach().contiguous() for k, v in unet.items()})
    return tensors, {KIND_KEY: KIND, CONFIG_KEY: config.to_json()}


def save(path, config: RefineNetConfig, detail_encoder: Mapping[str, torch.Tensor],
         unet: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tensors, metadata = state_dict_for_file(config, detail_encoder, unet)
    save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


def split_file(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
               ) -> tuple[RefineNetConfig, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config, detail-encoder state dict, UNet overrides) of a RefineNet file's tensors and metadata.
    ValueError, saying what is wrong, for anything else."""
    metadata = metadata or {}
    if metadata.get(KIND_KEY) != KIND:
        raise ValueError(f"not a RefineNet file (its metadata {KIND_KEY!r} is {metadata.get(KIND_KEY)!r}, expected "
                         f"{KIND!r}); export one with the LAR-Gen stage-2 training recipe")
    try:
        config = RefineNetConfig.from_json(metadata[CONFIG_KEY])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"the file's {CONFIG_KEY!r} metadata is missing or invalid: {err}") from err
    encoder, unet, other = {}, {}, []
    for k, v in tensors.items():
        if k.startswith(DETAIL_ENCODER_PREFIX):
            encoder[k[len(DETAIL_ENCODER_PREFIX):]] = v
        elif k.startswith(UNET_PREFIX):
            unet[k[len(UNET_PREFIX):]] = v
        else:
            other.append(k)
    if other:
        raise ValueError(f"unexpected tensors {sorted(other)[:3]} (keys start with {DETAIL_ENCODER_PREFIX!r} or "
                         f"{UNET_PREFIX!r})")
    expected = DetailEncoder(config).state_dict()
    bad = [k for k in expected if k not in encoder or tuple(encoder[k].shape) != tuple(expected[k].shape)]
    if bad or set(encoder) - set(expected):
        raise ValueError(f"the detail encoder's tensors do not match its config (clip_dim {config.clip_dim}, "
                         f"hidden_dim {config.hidden_dim}, context_dim {config.context_dim}); first mismatch: "
                         f"{(bad or sorted(set(encoder) - set(expected)))[0]}")
    return config, encoder, unet


def load(path) -> tuple[RefineNetConfig, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return split_file(tensors, metadata)
