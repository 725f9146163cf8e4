"""LAR-Gen's RefineNet (sec. 4.3) on a ModelPatcher clone, through ComfyUI's public hooks.

Per model call of the main UNet (an APPLY_MODEL wrapper), inside the schedule window:
  1. the subject latent (VAE-encoded when the node ran, resized to the latent being sampled) is noised to the
     call's sigma with one Gaussian noise drawn per sampling run from the sampler's seed (the model's own
     ``noise_scaling``: for SD, z + sigma * eps);
  2. the auxiliary UNet (RefineNet: a copy of the base UNet whose cross-attention weights come from the RefineNet
     file) denoises it once, conditioned on the detail tokens MLP(CLIP(subject)) (eq. 8); an attn1_patch on *its*
     transformer options keeps the input of each chosen decoder self-attention layer;
  3. the main UNet runs with an attn1_patch that appends those features to the keys/values of the same layers
     (eq. 9-10, kernels.refinenet.concat_keys_values); other layers, and the auxiliary UNet itself, are untouched.
Rows are matched from ``transformer_options["cond_or_uncond"]``: conditional rows get the subject at ``strength``;
unconditional rows get it too, or (default) strength 0, i.e. plain self-attention (the null image prompt of CFG).
When cond and uncond run as separate calls at one step, the second call reuses the first's features.

The auxiliary UNet is an additional model of the clone (``set_additional_models``): ComfyUI loads and offloads it
with the main model. Nothing is left on the original model.

Training (stage 2) reuses the two patches: :func:`capture_options` on RefineNet's forward, :func:`concat_options` on
the main UNet's, with ordinary tensors so the gradient reaches RefineNet's cross-attention and the MLP.
"""
from __future__ import annotations

import uuid
import weakref
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from faithful_inpaint.kernels.batch import COND, chunks
from faithful_inpaint.kernels.refinenet import DetailEncoder, RefineNetConfig, concat_keys_values
from faithful_inpaint.patching.blocks import BlockKey, key_of, transformer_blocks
from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.patching.gradients import for_autograd
from faithful_inpaint.patching.schedule import ScheduleWindow

KEY = "faithful_inpaint_refinenet"        # prefix of the keys of the wrappers and the additional model on a clone
SUBJECT_NOISE_SEED_OFFSET = 0x5EED        # the subject's noise differs from the sampler's own initial noise


# ------------------------------------------------------------------------------------------------ the two patches

def decoder_layers(unet, downsamples) -> list[BlockKey]:
    """Keys of the decoder (output-block) self-attention layers at the given latent downsample factors."""
    return [b.key for b in transformer_blocks(unet)
            if b.key[0] == "output" and b.downsample in downsamples and not b.module.disable_self_attn]


def capture_patch(layers, store: dict) -> Callable:
    """attn1_patch that keeps, in ``store[key]``, the self-attention input of every layer in ``layers``."""
    layers = frozenset(layers)

    def attn1_patch(n, context_attn1, value_attn1, extra_options):
        key = key_of(extra_options)
        if key in layers:
            store[key] = n
        return n, context_attn1, value_attn1

    return attn1_patch


def concat_patch(lookup: Callable) -> Callable:
    """attn1_patch appending subject features to the keys/values (eq. 10). ``lookup(extra_options)`` gives
    (features [B, N, C], strength [B]) for the running layer, or None to leave it alone."""

    def attn1_patch(n, context_attn1, value_attn1, extra_options):
        found = lookup(extra_options)
        if found is None:
            return n, context_attn1, value_attn1
        subject, strength = found
        context_attn1, value_attn1 = concat_keys_values(n, context_attn1, value_attn1, subject, strength)
        return n, context_attn1, value_attn1

    return attn1_patch


def _with_attn1_patch(transformer_options: Mapping | None, patch) -> dict:
    options = dict(transformer_options or {})
    patches = {k: list(v) for k, v in options.get("patches", {}).items()}
    patches["attn1_patch"] = patches.get("attn1_patch", []) + [patch]
    options["patches"] = patches
    return options


def capture_options(layers, store: dict, transformer_options: Mapping | None = None) -> dict:
    """Transformer options for a RefineNet forward that fills ``store`` {layer key: [B, N, C]}."""
    return _with_attn1_patch(transformer_options, capture_patch(layers, store))


def concat_options(features: Mapping[BlockKey, torch.Tensor], strength: torch.Tensor,
                   transformer_options: Mapping | None = None) -> dict:
    """Transformer options for a main-UNet forward whose layers in ``features`` attend to them too (rows aligned
    with the batch; ``strength`` [B])."""

    def lookup(extra_options):
        key = key_of(extra_options)
        return (features[key], strength) if key in features else None

    return _with_attn1_patch(transformer_options, concat_patch(lookup))


# ------------------------------------------------------------------------------------------------ the loaded file

@dataclass(eq=False)
class RefineNet:
    """A loaded RefineNet file: the detail encoder and the UNet weights that replace the base UNet's."""
    config: RefineNetConfig
    detail_encoder: DetailEncoder
    unet_overrides: dict
    name: str = "RefineNet"
    _auxiliary: tuple = field(default=(None, None), repr=False)   # (weakref to a base BaseModel, its auxiliary)

    @classmethod
    def from_parts(cls, config: RefineNetConfig, encoder_sd: Mapping, unet_overrides: Mapping, name: str):
        encoder = DetailEncoder(config)
        encoder.load_state_dict({k: v.float() for k, v in encoder_sd.items()}, assign=True)
        return cls(config, encoder.eval().requires_grad_(False), dict(unet_overrides), name)

    def detail_tokens(self, clip_vision, image: torch.Tensor, node: str) -> torch.Tensor:
        """MLP(CLIP(subject)) (eq. 8): [S, T, context_dim] in fp32, one row per subject image."""
        out = clip_vision.encode_image(image)
        name = "penultimate_hidden_states" if self.config.clip_layer == "penultimate" else "last_hidden_state"
        features = out[name]
        if features.shape[-1] != self.config.clip_dim:
            raise NodeInputError(node, "clip_vision", f"this RefineNet reads {self.config.clip_dim}-wide CLIP-vision "
                                 f"features (ViT-H-14: 1280) but the CLIP vision model given has {features.shape[-1]}"
                                 "-wide hidden states: load the CLIP vision model it was trained with.")
        with torch.no_grad():
            return self.detail_encoder(features.float().cpu())

    def auxiliary_for(self, model, node: str, input_name: str = "refinenet"):
        """The auxiliary UNet (a ModelPatcher) for ``model``'s base UNet; built once per base model."""
        base_ref, auxiliary = self._auxiliary
        if base_ref is not None and base_ref() is model.model:
            return auxiliary
        auxiliary = build_auxiliary(model, self.unet_overrides, self.config, node, input_name)
        self._auxiliary = (weakref.ref(model.model), auxiliary)
        return auxiliary


def build_auxiliary(model, unet_overrides: Mapping, config: RefineNetConfig, node: str, input_name: str):
    """A new model of the same class and config as ``model``'s, holding a copy of its UNet's weights (without
    LoRA or other weight patches) with ``unet_overrides`` in place, wrapped in a ModelPatcher."""
    import comfy.model_patcher

    base = model.model
    in_channels = int(base.model_config.unet_config.get("in_channels", 4))
    if in_channels != config.unet_in_channels:
        raise NodeInputError(node, input_name, f"this RefineNet was trained from a UNet with {config.unet_in_channels} "
                             f"input channels ({_kind(config.unet_in_channels)}) but the model has {in_channels} "
                             f"({_kind(in_channels)}).")
    prefix = "diffusion_model."
    weights = {k[len(prefix):]: patches[0][0] for k, patches in model.get_key_patches(prefix).items()}
    for k, v in unet_overrides.items():
        if k not in weights:
            raise NodeInputError(node, input_name, f"the RefineNet file has UNet weight {k!r}, which this model's "
                                 "UNet does not have: it was trained for another architecture.")
        if tuple(v.shape) != tuple(weights[k].shape):
            raise NodeInputError(node, input_name, f"the RefineNet weight {k!r} is {tuple(v.shape)} but the model's "
                                 f"is {tuple(weights[k].shape)}: it was trained for another model family.")
    weights.update(unet_overrides)
    try:
        aux = type(base)(base.model_config, model_type=base.model_type, device=model.offload_device)
    except TypeError as err:
        raise NodeInputError(node, "model", f"{type(base).__name__} models cannot host a RefineNet ({err}).")
    if tuple(getattr(base, "concat_keys", ())) == ("mask", "masked_image"):
        aux.set_inpaint()
    aux.diffusion_model.load_state_dict(weights, strict=True)
    return comfy.model_patcher.ModelPatcher(aux, load_device=model.load_device, offload_device=model.offload_device)


def _kind(in_channels: int) -> str:
    return "an inpainting model" if in_channels == 9 else "a text-to-image model"


# ------------------------------------------------------------------------------------------------ sampling hooks

@dataclass(eq=False)
class RefineNetHooks:
    auxiliary: object                  # ModelPatcher of the RefineNet UNet
    detail_tokens: torch.Tensor        # [S, T, C] (eq. 8)
    subject_latent: torch.Tensor       # [S, 4, h, w], the VAE's latent (before process_latent_in)
    layers: frozenset                  # decoder layers whose keys/values get the subject features
    strength: float
    uncond_sees_subject: bool
    window: ScheduleWindow
    inpaint_input: str = "blank"
    node: str = "RefineNetApply"
    _seed: int = 0
    _noise: dict = field(default_factory=dict)
    _cached: tuple = (None, None)       # ((sigma, h, w, y from a cond row), {layer: [S, N, C]})
    _current: dict | None = None        # {layer: ([B, N, C], strength [B])} while the main UNet runs

    def install(self, model) -> None:
        """Register everything on ``model`` (a ModelPatcher clone)."""
        # Closures, not bound methods: clone() deep-copies model_options and would copy this object with them.
        def outer_sample(executor, *args, **kwargs):
            return self._outer_sample(executor, *args, **kwargs)

        def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                        **kwargs):
            return self._apply_model(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

        def lookup(extra_options):
            if self._current is None or "block" not in extra_options:
                return None
            return self._current.get(key_of(extra_options))

        import comfy.patcher_extension as ext

        # One key per installation, so two RefineNets on one model keep both auxiliary UNets.
        key = f"{KEY}:{uuid.uuid4().hex[:8]}"
        model.set_additional_models(key, [self.auxiliary])
        model.add_wrapper_with_key(ext.WrappersMP.OUTER_SAMPLE, key, outer_sample)
        model.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, key, apply_model)
        model.set_model_attn1_patch(concat_patch(lookup))

    def _outer_sample(self, executor, *args, **kwargs):
        seed = kwargs.get("seed", args[7] if len(args) > 7 else None)
        self._seed = int(seed or 0) + SUBJECT_NOISE_SEED_OFFSET
        self._noise.clear()
        self._cached = (None, None)
        return executor(*args, **kwargs)

    def _row_strengths(self, cond_or_uncond, batch: int, device) -> torch.Tensor:
        strength = torch.zeros(batch)
        for kind, rows in chunks(cond_or_uncond, batch):
            if kind == COND or self.uncond_sees_subject:
                strength[rows] = self.strength
        return strength.to(device)

    def _apply_model(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        def plain():
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

        if not self.window.contains(t):
            return plain()
        cond_or_uncond = transformer_options.get("cond_or_uncond") or [COND]
        strength = self._row_strengths(cond_or_uncond, x.shape[0], x.device)
        if not bool((strength != 0).any()):
            return plain()
        features = self._subject_features(x, t, cond_or_uncond, kwargs)
        rows = self._subject_rows(x.shape[0], len(cond_or_uncond))
        if not torch.is_inference_mode_enabled():   # a gradient pass (RASG, PILOT): no inference tensors
            features, strength = for_autograd(features), for_autograd(strength)
        self._current = {key: (f[rows.to(f.device)], strength) for key, f in features.items()}
        try:
            return plain()
        finally:
            self._current = None

    def _subject_rows(self, batch: int, n_chunks: int) -> torch.Tensor:
        """Subject index of every row: sample i of each cond/uncond chunk gets subject i % S."""
        per_chunk, subjects = batch // n_chunks, self.subject_latent.shape[0]
        if subjects != 1 and per_chunk % subjects:
            raise NodeInputError(self.node, "subject", f"{subjects} subject images for a batch of {per_chunk}: give "
                                 f"one subject, or one per image ({per_chunk}).")
        return (torch.arange(per_chunk) % subjects).repeat(n_chunks)

    def _subject_features(self, x, t, cond_or_uncond, kwargs) -> dict:
        """{layer: [S, N, C]} from one RefineNet pass at this call's sigma (reused by a second call at the same
        sigma and size)."""
        sigma = t[:1].float()
        height, width = x.shape[-2:]
        # SDXL's y comes from a conditional row when the call has one: calls with and without differ
        y_from_cond = kwargs.get("y") is not None and COND in cond_or_uncond
        cache_key = (float(sigma), height, width, y_from_cond)
        if self._cached[0] == cache_key:
            return self._cached[1]
        aux = self.auxiliary.model
        subjects = self.subject_latent.shape[0]
        raw = self.subject_latent.float()
        if tuple(raw.shape[-2:]) != (height, width):   # the latent being sampled decides the token count
            raw = F.interpolate(raw, size=(height, width), mode="bilinear", align_corners=False)
        raw = raw.to(x.device)
        latent = aux.process_latent_in(raw)
        sigmas = sigma.to(x.device).expand(subjects)
        noisy = aux.model_sampling.noise_scaling(sigmas, self._noise_like(latent), latent)
        extra = {}
        y = kwargs.get("y")
        if y is not None:                              # SDXL: the size/pooled-text vector of a conditional row
            parts = chunks(cond_or_uncond, y.shape[0])
            rows = next((rows for kind, rows in parts if kind == COND), parts[0][1])
            extra["y"] = y[rows][torch.arange(subjects) % (rows.stop - rows.start)]
        store: dict = {}
        options = capture_options(self.layers, store, self.auxiliary.model_options.get("transformer_options"))
        options.update(cond_or_uncond=[COND], sigmas=sigmas)
        with torch.no_grad():
            aux.apply_model(noisy, sigmas, c_concat=self._concat_input(aux, noisy, raw),
                            c_crossattn=self.detail_tokens.to(x.device), transformer_options=options, **extra)
        self._cached = (cache_key, store)
        return store

    def _concat_input(self, aux, noisy, raw):
        """The extra input channels of an inpainting RefineNet (ComfyUI's own concat_cond), else None."""
        if not getattr(aux, "concat_keys", ()):
            return None
        mask = None
        if self.inpaint_input == "subject":
            mask = torch.zeros_like(noisy[:, :1])
        return aux.concat_cond(noise=noisy, device=noisy.device, concat_latent_image=raw, denoise_mask=mask)

    def _noise_like(self, latent: torch.Tensor) -> torch.Tensor:
        key = tuple(latent.shape)
        if key not in self._noise:
            gen = torch.Generator().manual_seed(self._seed)
            self._noise[key] = torch.randn(latent.shape, generator=gen)
        return self._noise[key].to(device=latent.device, dtype=latent.dtype)
