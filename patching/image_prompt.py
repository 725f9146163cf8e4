"""Decoupled image-prompt attention (LAR-Gen eq. 5-7, IP-Adapter) installed on a ModelPatcher clone.

Every cross-attention layer of the UNet gets an attn2 *replace* (ComfyUI's public hook; q, k, v arrive projected and
the result goes through the layer's to_out). It calls whatever replace was installed for that layer before (e.g.
IPAdapter_plus's, PILOT's boundary control) or ComfyUI's own attention: that is Z, eq. (5). Inside the schedule
window it adds beta * Attention(q, K', V') (eq. 6-7), optionally times an attention mask resized to the layer.

Image tokens and their per-layer K', V' are computed once, when the node runs, for the conditional image and for the
unconditional ("null") image; each call picks the rows' tokens from ``cond_or_uncond`` (never from an assumed order).
Null image, as in the official IP-Adapter code: zero image embeddings for the linear projection; for the plus / full
projections, the CLIP-vision hidden states of an all-zero *normalised* pixel tensor (IPAdapter_plus instead encodes a
black image; both go through the adapter's projection).

Modes (LAR-Gen sec. 4.5: either prompt may be null):
  * both: conditional rows see the image tokens, unconditional rows the null image;
  * text only: every row sees the null image (the image prompt is dropped, as during training);
  * image only: the image prompt as in "both", and the conditional rows' text attention sees the empty prompt.
Nothing is left on the original model; state lives in this object, which every clone shares.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from faithful_inpaint.kernels import masks as mask_ops
from faithful_inpaint.kernels.batch import COND, chunks
from faithful_inpaint.kernels.image_prompt import LINEAR, AdapterSpec, ImagePromptAdapter, decoupled_attention
from faithful_inpaint.kernels.painta import sdpa
from faithful_inpaint.patching import family
from faithful_inpaint.patching.blocks import (BlockKey, TransformerBlockInfo, host_attention, previous_replace,
                                              transformer_blocks)
from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.patching.gradients import for_autograd
from faithful_inpaint.patching.schedule import ScheduleWindow

BOTH, IMAGE_ONLY, TEXT_ONLY = "text + image", "image only", "text only"
MODES = (BOTH, IMAGE_ONLY, TEXT_ONLY)
# CLIP-vision widths: (projected image embedding, hidden states) -> the encoder people know them by.
ENCODERS = {(768, 1024): "CLIP ViT-L-14", (1024, 1280): "CLIP ViT-H-14 (e.g. CLIP-ViT-H-14-laion2B-s32B-b79K)",
            (1280, 1664): "CLIP ViT-bigG-14 (e.g. CLIP-ViT-bigG-14-laion2B-39B-b160k)"}


def cross_attention_layers(unet) -> list[TransformerBlockInfo]:
    """The UNet's cross-attention blocks in diffusers' attention-processor order (down, up, mid), which numbers
    the adapter files' layers: layer n is ``ip_adapter.{2n+1}``."""
    blocks = [b for b in transformer_blocks(unet) if getattr(b.module, "attn2", None) is not None]
    order = {"input": 0, "output": 1, "middle": 2}
    return sorted(blocks, key=lambda b: order[b.key[0]])        # stable: forward order within each part


def check_model(spec: AdapterSpec, model, node: str, input_name: str = "adapter") -> list[TransformerBlockInfo]:
    """The model's cross-attention layers, after checking that the adapter was made for this architecture."""
    fam = family.detect(model, node)
    if fam.context_dim != spec.context_dim:
        made_for = family.FAMILY_BY_CONTEXT_WIDTH.get(spec.context_dim, f"{spec.context_dim}-wide text context")
        raise NodeInputError(node, input_name, f"this adapter is for {made_for} models (image tokens "
                             f"{spec.context_dim} wide) but the model is {fam.name} (text context "
                             f"{fam.context_dim} wide): load the adapter made for your model's family.")
    layers = cross_attention_layers(model.get_model_object("diffusion_model"))
    widths = tuple(int(b.module.attn2.to_k.out_features) for b in layers)
    if widths != spec.layer_widths:
        raise NodeInputError(node, input_name, f"the adapter has {len(spec.layer_widths)} cross-attention layers "
                             f"but this {fam.name} model has {len(widths)} (or their widths differ): the adapter "
                             "was trained for another UNet architecture.")
    return layers


def clip_vision_from_config(config: dict):
    """ComfyUI's CLIP_VISION object (comfy.clip_vision.ClipVisionModel) for a config dict (the JSON ComfyUI's
    config files hold), weights unset: toy and test encoders at sizes ComfyUI's loader does not recognise."""
    import json
    import tempfile
    from pathlib import Path

    import comfy.clip_vision

    with tempfile.TemporaryDirectory() as folder:        # ClipVisionModel reads its config from a JSON file
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(config))
        return comfy.clip_vision.ClipVisionModel(str(path))


def clip_vision_widths(clip_vision, node: str) -> tuple[int, int]:
    """(image-embedding width, hidden-state width) of a ComfyUI CLIP_VISION."""
    weight = getattr(getattr(getattr(clip_vision, "model", None), "visual_projection", None), "weight", None)
    if weight is None:
        raise NodeInputError(node, "clip_vision", "this vision model has no CLIP image projection (SigLIP, DINOv2, "
                             "...); IP-Adapters need CLIP ViT-H-14 or ViT-bigG-14.")
    return int(weight.shape[0]), int(weight.shape[1])


def check_clip_vision(spec: AdapterSpec, clip_vision, node: str) -> None:
    """A clear error when the CLIP vision model does not give the feature width the adapter's projection reads."""
    embed, hidden = clip_vision_widths(clip_vision, node)
    got = embed if spec.variant == LINEAR else hidden
    if got == spec.feature_dim:
        return
    index = 0 if spec.variant == LINEAR else 1
    wanted = [name for dims, name in ENCODERS.items() if dims[index] == spec.feature_dim]
    have = ENCODERS.get((embed, hidden), f"a CLIP vision model with widths {embed}/{hidden}")
    what = "image embeddings" if spec.variant == LINEAR else "penultimate hidden states"
    raise NodeInputError(node, "clip_vision", f"this {spec.variant} adapter reads {spec.feature_dim}-wide {what}, "
                         f"i.e. {wanted[0] if wanted else 'another CLIP vision model'}; the CLIP vision model given "
                         f"is {have}, whose {what} are {got} wide. Load the CLIP vision model the adapter was "
                         "trained with.")


def encode_image_tokens(adapter: ImagePromptAdapter, clip_vision, image: torch.Tensor):
    """(image tokens, null-image tokens), each [1, T, C] in fp32. Several images give their tokens side by side
    (one prompt made of all of them); the null tokens are repeated to the same length (attention over repeated keys
    is unchanged), so conditional and unconditional rows stack in one batch."""
    out = clip_vision.encode_image(image)
    features = out[adapter.spec.feature]
    tokens = adapter.project(features)
    if adapter.spec.variant == LINEAR:
        null_features = torch.zeros_like(features[:1])
    else:
        null_features = zero_pixel_hidden_states(clip_vision)
    null = adapter.project(null_features)
    count = tokens.shape[0]
    return tokens.reshape(1, -1, tokens.shape[-1]), null.repeat(1, count, 1)


def zero_pixel_hidden_states(clip_vision) -> torch.Tensor:
    """The penultimate hidden states of an all-zero image (the null image of IP-Adapter-plus), [1, T, C]."""
    import comfy.model_management

    comfy.model_management.load_model_gpu(clip_vision.patcher)
    size = getattr(clip_vision, "image_size", 224)
    pixels = torch.zeros(1, 3, size, size, device=clip_vision.load_device)
    hidden = clip_vision.model(pixel_values=pixels, intermediate_output=-2)[1]
    return hidden.to(comfy.model_management.intermediate_device())


@dataclass(eq=False)
class ImagePromptHooks:
    layers: dict                         # block key -> (K', V' of the image, K', V' of the null image), [1, T, w] fp32
    beta: float
    window: ScheduleWindow
    mode: str = BOTH
    mask: torch.Tensor | None = None     # [b, 1, H, W], where the image prompt acts (soft values scale it)
    null_text: torch.Tensor | None = None  # [1, L, C] the empty prompt's context (mode "image only")
    node: str = "ImagePromptApply"
    _cache: dict = field(default_factory=dict)

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options: every clone shares these hooks and their cache.
        return self

    @classmethod
    def from_adapter(cls, adapter: ImagePromptAdapter, layers: list[TransformerBlockInfo], tokens, null_tokens,
                     **kwargs) -> "ImagePromptHooks":
        per_layer = {}
        for info, (k, v), (k0, v0) in zip(layers, adapter.layer_keys_values(tokens),
                                           adapter.layer_keys_values(null_tokens)):
            per_layer[info.key] = (k, v, k0, v0)
        return cls(per_layer, **kwargs)

    def install(self, model):
        """A clone of ``model`` with an attn2 replace on every cross-attention layer the hooks hold."""
        clone = model.clone()
        unet = clone.get_model_object("diffusion_model")
        for info in cross_attention_layers(unet):
            if info.key not in self.layers:
                continue
            previous = previous_replace(clone, "attn2", info.key)
            clone.set_model_attn2_replace(_replace(self, info.key, info.module.attn2, previous), *info.key)
        return clone

    # -- per call ---------------------------------------------------------------------------------------------
    def image_keys_values(self, key: BlockKey, cond_or_uncond, like: torch.Tensor):
        """K', V' for every row of the call: the image's for conditional rows (unless text only), else the null's."""
        cache_key = ("kv", key, tuple(cond_or_uncond), like.shape[0], like.device, like.dtype)
        if cache_key not in self._cache:
            k, v, k0, v0 = self.layers[key]
            use_image = [kind == COND and self.mode != TEXT_ONLY for kind, _ in chunks(cond_or_uncond, like.shape[0])]
            size = like.shape[0] // len(cond_or_uncond)
            self._cache[cache_key] = tuple(
                torch.cat([(img if on else null).expand(size, -1, -1) for on in use_image]).to(like.device, like.dtype)
                for img, null in ((k, k0), (v, v0)))
        return self._cache[cache_key]

    def strength(self, extra_options: dict, like: torch.Tensor):
        """beta, or beta times the attention mask at this layer's resolution as [B, N, 1]."""
        if self.mask is None:
            return self.beta
        height, width = extra_options["activations_shape"][-2:]
        cou = extra_options["cond_or_uncond"]
        cache_key = ("mask", height, width, tuple(cou), like.shape[0], like.device, like.dtype)
        if cache_key not in self._cache:
            per_chunk = like.shape[0] // len(cou)
            m = mask_ops.resize(self.mask, height, width).flatten(1)
            try:
                m = mask_ops.match_batch(m, per_chunk)
            except ValueError as err:
                raise NodeInputError(self.node, "attn_mask", f"{err} (the latent being sampled has {per_chunk}).")
            self._cache[cache_key] = (self.beta * m.repeat(len(cou), 1))[..., None].to(like.device, like.dtype)
        return self._cache[cache_key]

    def empty_prompt_keys_values(self, attn2, k: torch.Tensor, v: torch.Tensor, cond_or_uncond):
        """k, v with the conditional rows' text replaced by the empty prompt's (mode "image only"). Lengths are
        matched by repeating both to a common multiple, which leaves attention unchanged (as ComfyUI batches
        prompts of different lengths)."""
        context = _usable(self.null_text).to(k.device, k.dtype)
        null_k, null_v = attn2.to_k(context), attn2.to_v(context)
        length = math.lcm(k.shape[1], null_k.shape[1])
        k, v = k.repeat(1, length // k.shape[1], 1), v.repeat(1, length // v.shape[1], 1)
        null_k, null_v = null_k.repeat(1, length // null_k.shape[1], 1), null_v.repeat(1, length // null_v.shape[1], 1)
        parts = chunks(cond_or_uncond, k.shape[0])
        k = torch.cat([null_k.expand(sl.stop - sl.start, -1, -1) if kind == COND else k[sl] for kind, sl in parts])
        v = torch.cat([null_v.expand(sl.stop - sl.start, -1, -1) if kind == COND else v[sl] for kind, sl in parts])
        return k, v


def _usable(value):
    """Tensors made under inference mode, copied when a gradient pass (PILOT, RASG) will save them for backward."""
    if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        return for_autograd(value)
    return value


def _replace(hooks: ImagePromptHooks, key: BlockKey, attn2, previous):
    # A closure, not a bound method: ModelPatcher.clone() deep-copies model_options, functions are shared as they are.
    def replace(q, k, v, extra_options):
        active = hooks.window.contains(extra_options["sigmas"])
        cond_or_uncond = extra_options["cond_or_uncond"]
        if active and hooks.mode == IMAGE_ONLY and COND in cond_or_uncond:
            k, v = hooks.empty_prompt_keys_values(attn2, k, v, cond_or_uncond)
        text = previous(q, k, v, extra_options) if previous is not None else host_attention(q, k, v, extra_options)
        if not active or hooks.beta == 0:
            return text
        k_image, v_image = _usable(hooks.image_keys_values(key, cond_or_uncond, q))
        return decoupled_attention(text, q, k_image, v_image, extra_options["n_heads"],
                                   _usable(hooks.strength(extra_options, q)),
                                   attention=_few_keys_attention(extra_options.get("attn_precision")))

    return replace


def _few_keys_attention(precision):
    """Attention over the 4-16 image tokens: PyTorch's scaled-dot-product attention (it has a backward, for the
    gradient passes). ComfyUI's own choice on a CPU (sub-quadratic, chunked over queries) costs about half a text
    attention per call at 64x64 whatever the number of keys; here the scores are only N x T per head."""
    def attention(q, k, v, heads):
        if precision == torch.float32:
            return sdpa(q.float(), k.float(), v.float(), heads).to(q.dtype)
        return sdpa(q, k, v, heads)

    return attention
