"""Shared test helpers: one forward pass of a ComfyUI model with explicit cond/uncond layout."""
from __future__ import annotations

import torch


def forward(model, x, sigma: float, context, cond_or_uncond=(0, 1), concat=None, y=None):
    """Run ``model`` (a ModelPatcher) once, the way calc_cond_batch does: its transformer_options (patches
    included) plus cond_or_uncond and sigmas. ``x``/``context`` hold all chunks stacked along the batch."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    to = model.model_options["transformer_options"].copy()
    to["cond_or_uncond"] = list(cond_or_uncond)
    sigmas = torch.full((x.shape[0],), float(sigma))
    to["sigmas"] = sigmas
    kwargs = {}
    if concat is not None:
        kwargs["c_concat"] = concat
    if y is not None:
        kwargs["y"] = y
    with torch.inference_mode():
        return model.model.apply_model(x, sigmas, c_crossattn=context, transformer_options=to, **kwargs).clone()
