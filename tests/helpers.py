"""Shared test helpers: one forward pass of a ComfyUI model with explicit cond/uncond layout; the path of a file the
pack ships in toy/."""
from __future__ import annotations

import torch


def forward(model, x, sigma: float, context, cond_or_uncond=(0, 1), concat=None, y=None):
    """Run ``model`` (a ModelPatcher) once, the way sampling does: its transformer_options (patches included) with
    the patcher's wrappers merged in (sampler_helpers.prepare_model_patcher), plus cond_or_uncond and sigmas.
    ``x``/``context`` hold all chunks stacked along the batch."""
    import comfy.model_management
    import comfy.patcher_extension

    comfy.model_management.load_models_gpu([model])
    to = model.model_options["transformer_options"].copy()
    to["wrappers"] = comfy.patcher_extension.merge_nested_dicts(to.get("wrappers", {}), model.wrappers)
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


def toy_path(name: str):
    """The path of ``name`` in the pack's toy/ folder, which must hold it (the pack ships it)."""
    from faithful_inpaint.nodes.toy_world import PACK_TOY_DIR

    path = PACK_TOY_DIR / name
    assert path.is_file(), f"{path} is missing: the pack ships it (toy/README.md)"
    return path
