"""ModelPatcher-facing machinery shared by the pack's nodes: model family, prompt tokens from a CLIP, the UNet's
attention layers, schedule windows, attention capture and gradient passes. Everything here goes through ComfyUI's
public hooks on a clone of the model; the math lives in ``kernels/``."""
