"""Smoke model files (random weights, real layouts) are detected by the real ComfyUI loaders and run.

Generated files are cached across runs in ``<repo>/.smoke/models`` (or ``$FAITHFUL_SMOKE_DIR``); the first run writes
the files the tests load (about 1 min on 2 cores, 16.8 GB of disk), later runs only load them.
Every sampling run uses a tiny latent (8x8) and one step: the outputs are noise, only finiteness is checked.
SDXL and CLIP ViT-bigG are checked on their layouts by ComfyUI's detection rules, with no file written: their full
fp32 loads on a CPU (~20 GB / ~11 GB peak) do not fit the 24 GB test machines beside everything else, and their
files would add 10.6 GB of disk.
Cached run: ~1-2.5 min on 2 cores depending on load; first run adds ~1.5-2 min of file writing.
"""
from __future__ import annotations

import gc

import pytest
import torch

from faithful_inpaint.devtools import smoke_checkpoints as sc


@pytest.fixture(scope="module")
def smoke_dir():
    d = sc.default_models_dir()
    sc.register_model_folders(d)
    return d


@pytest.fixture(autouse=True)
def _release_models():
    yield
    import comfy.model_management as mm

    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()


def _ensure(smoke_dir, kind) -> str:
    name = sc.ensure_smoke_models(smoke_dir, [kind])[kind]
    assert (smoke_dir / sc.folder_for(kind) / name).is_file()
    return name


def _finite(t) -> bool:
    return bool(torch.isfinite(t).all())


def _sample(model, clip, vae, positive=None, negative=None, latent=None, cfg=2.0):
    """One Euler step at an 8x8 latent through ComfyUI's KSampler path, then VAE decode."""
    import nodes

    if positive is None:
        positive = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")[0]
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    for c in positive:
        assert _finite(c[0])
    if latent is None:
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
    out = nodes.common_ksampler(model, 0, 1, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]
    assert out.shape == latent["samples"].shape
    assert _finite(out)
    image = vae.decode(out)
    assert _finite(image)
    return out, image


def _load_checkpoint(smoke_dir, kind):
    import nodes

    name = _ensure(smoke_dir, kind)
    assert name in __import__("folder_paths").get_filename_list("checkpoints")
    return nodes.CheckpointLoaderSimple().load_checkpoint(name)


# ---------------------------------------------------------------------------------------------------------- API


def test_api_and_layouts_without_writing():
    assert sc.KINDS[:4] == ("sd15", "sd15_inpaint", "sdxl", "sd_x4_upscaler")
    assert sc.folder_for("sd15") == "checkpoints"
    assert sc.folder_for("controlnet_sd15") == "controlnet"
    assert sc.folder_for("clip_vision_h") == "clip_vision"
    assert sc.folder_for("ipadapter_sd15") == "ipadapter"
    assert sc.folder_for("brushnet_sd15") == "inpaint"
    with pytest.raises(ValueError):
        sc.folder_for("sd99")
    lay = sc.layout("sd15_inpaint")
    assert lay["model.diffusion_model.input_blocks.0.0.weight"][0] == (320, 9, 3, 3)
    assert lay["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"][0] == (49408, 768)
    assert lay["first_stage_model.decoder.conv_in.weight"][0] == (512, 4, 3, 3)
    assert all(dt == torch.float16 for k, (s, dt) in lay.items() if "position_ids" not in k)
    # Key-level architecture detection of every checkpoint layout, exactly as load_checkpoint_guess_config does it.
    import comfy.model_detection
    import comfy.supported_models as sm

    expected = {"sd15": (sm.SD15, 4), "sd15_inpaint": (sm.SD15, 9), "sdxl": (sm.SDXL, 4),
                "sd_x4_upscaler": (sm.SD_X4Upscaler, 7)}
    for kind, (cls, in_ch) in expected.items():
        meta_sd = {k: torch.empty(s, device="meta") for k, (s, _) in sc.layout(kind).items()}
        mc = comfy.model_detection.model_config_from_unet(meta_sd, "model.diffusion_model.")
        assert type(mc) is cls, kind
        assert mc.unet_config["in_channels"] == in_ch


def test_writer_is_deterministic_cached_and_valid(tmp_path):
    import safetensors

    kind = "ipadapter_sd15"  # the smallest file (45 MB)
    a = sc.write_model_file(kind, tmp_path / "a.safetensors", seed=1)
    b = sc.write_model_file(kind, tmp_path / "b.safetensors", seed=1)
    c = sc.write_model_file(kind, tmp_path / "c.safetensors", seed=2)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    lay = sc.layout(kind)
    with safetensors.safe_open(str(a), framework="pt") as f:
        assert set(f.keys()) == set(lay)
        assert f.metadata()["kind"] == kind
        for k in f.keys():
            t = f.get_tensor(k)
            assert tuple(t.shape) == lay[k][0] and t.dtype == torch.float16 and _finite(t), k
    # Cache: an existing current file is reused, a truncated one is rewritten.
    names = sc.ensure_smoke_models(tmp_path, [kind])
    path = tmp_path / "ipadapter" / names[kind]
    mtime = path.stat().st_mtime_ns
    assert sc.ensure_smoke_models(tmp_path, [kind]) == names
    assert path.stat().st_mtime_ns == mtime
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 10)
    assert not sc.is_current(kind, path)
    sc.ensure_smoke_models(tmp_path, kind)
    assert sc.is_current(kind, path)


def test_layout_file_has_the_real_header_zero_weights_and_no_disk(tmp_path):
    import safetensors

    kind = "controlnet_sd15"
    path = sc.write_layout_file(kind, tmp_path / "c.safetensors")
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == {k: s for k, (s, _) in
                                                                             sc.layout(kind).items()}
        assert not f.get_tensor("control_model.input_blocks.0.0.weight").any()
    assert path.stat().st_size > 700e6 and path.stat().st_blocks * 512 < 8e6      # 723 MB long, a sparse hole


# ------------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("kind,in_channels", [("sd15", 4), ("sd15_inpaint", 9)])
def test_sd15_checkpoints_load_and_sample(smoke_dir, kind, in_channels):
    import comfy.model_base
    import comfy.supported_models as sm

    model, clip, vae = _load_checkpoint(smoke_dir, kind)
    assert type(model.model.model_config) is sm.SD15
    assert model.model.model_config.unet_config["in_channels"] == in_channels
    assert model.model.model_config.unet_config["model_channels"] == 320
    assert model.model.model_type == comfy.model_base.ModelType.EPS
    assert clip.cond_stage_model.clip_l is not None
    _sample(model, clip, vae)


def _layout_meta_sd(kind) -> dict:
    """The tensors a kind's file holds, as meta tensors, from its layout alone: nothing is written. The writer puts
    exactly these keys and shapes in the file (test_writer_is_deterministic_cached_and_valid), so detection on the
    layout is detection on the file, without 6.9 GB (SDXL) and 3.7 GB (ViT-bigG) of disk."""
    return {k: torch.empty(shape, device="meta") for k, (shape, _) in sc.layout(kind).items()}


def test_sdxl_checkpoint_detected():
    """The SDXL layout is detected from its keys as SDXL, with text-encoder keys that ComfyUI's SDXL CLIP loads
    without missing or unexpected keys. Checked on the layout (no 6.9 GB file written)."""
    import comfy.model_detection
    import comfy.sdxl_clip
    import comfy.supported_models as sm

    sd = _layout_meta_sd("sdxl")
    mc = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    assert type(mc) is sm.SDXL
    assert mc.unet_config["context_dim"] == 2048 and mc.unet_config["adm_in_channels"] == 2816
    assert mc.clip_target(sd).clip is comfy.sdxl_clip.SDXLClipModel
    te = mc.process_clip_state_dict(dict(sd))  # what load_state_dict_guess_config hands to the CLIP
    with torch.device("meta"):
        expected = comfy.sdxl_clip.SDXLClipModel(device="meta").state_dict()
    missing = set(expected) - set(te)
    assert missing <= {"clip_l.logit_scale", "clip_l.transformer.text_projection.weight", "clip_g.logit_scale"}, missing
    assert not set(te) - set(expected) - {"clip_l.transformer.text_model.embeddings.position_ids"}
    for k in te:
        if k in expected:
            assert te[k].shape == expected[k].shape, k


def test_sd_x4_upscaler_checkpoint_loads_and_samples(smoke_dir):
    import nodes

    import comfy.model_base
    import comfy.supported_models as sm

    model, clip, vae = _load_checkpoint(smoke_dir, "sd_x4_upscaler")
    assert type(model.model.model_config) is sm.SD_X4Upscaler
    assert isinstance(model.model, comfy.model_base.SD_X4Upscaler)
    assert model.model.model_type == comfy.model_base.ModelType.V_PREDICTION
    assert model.model.model_config.unet_config["in_channels"] == 7
    assert vae.upscale_ratio == 4  # the x4 VAE (3 levels) was detected
    positive = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    cond_node = nodes.NODE_CLASS_MAPPINGS["SD_4XUpscale_Conditioning"]
    res = cond_node.execute(torch.rand(1, 8, 8, 3), positive, negative, 4.0, 0.1)
    positive, negative, latent = res.result if hasattr(res, "result") else res
    assert latent["samples"].shape == (1, 4, 8, 8)
    _, image = _sample(model, clip, vae, positive, negative, latent, cfg=1.0)
    assert image.shape[1:3] == (32, 32)


# -------------------------------------------------------------------------------------------------- controlnet


def test_controlnet_sd15_loads_and_applies(smoke_dir):
    import nodes

    import comfy.controlnet

    name = _ensure(smoke_dir, "controlnet_sd15")
    cn = nodes.ControlNetLoader().load_controlnet(name)[0]
    assert isinstance(cn, comfy.controlnet.ControlNet)
    assert cn.control_model.model_channels == 320
    assert cn.control_model.input_hint_block[0].in_channels == 3
    model, clip, vae = _load_checkpoint(smoke_dir, "sd15")
    positive = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(
        positive, negative, cn, torch.rand(1, 64, 64, 3), 1.0, 0.0, 1.0)
    _sample(model, clip, vae, positive, negative)


# ------------------------------------------------------------------------------------- CLIP vision, IP-Adapter


def _ip_image_tokens(sd: dict, out, ctx: int) -> torch.Tensor:
    """Project CLIP-vision output to IP-Adapter image tokens from the documented layout (linear or Resampler)."""
    ln = torch.nn.functional.layer_norm
    f = {k[len("image_proj."):]: v.float() for k, v in sd.items() if k.startswith("image_proj.")}
    if "latents" not in f:
        emb = out["image_embeds"].float()
        x = torch.nn.functional.linear(emb, f["proj.weight"], f["proj.bias"]).reshape(emb.shape[0], -1, ctx)
        return ln(x, (ctx,), f["norm.weight"], f["norm.bias"])
    x = torch.nn.functional.linear(out["penultimate_hidden_states"].float(), f["proj_in.weight"], f["proj_in.bias"])
    lat = f["latents"].expand(x.shape[0], -1, -1)
    dim = lat.shape[-1]
    heads = 12
    i = 0
    while f"layers.{i}.0.to_q.weight" in f:
        p = f"layers.{i}."
        xn = ln(x, (dim,), f[p + "0.norm1.weight"], f[p + "0.norm1.bias"])
        ln_ = ln(lat, (dim,), f[p + "0.norm2.weight"], f[p + "0.norm2.bias"])
        q = ln_ @ f[p + "0.to_q.weight"].T
        k, v = (torch.cat([xn, ln_], 1) @ f[p + "0.to_kv.weight"].T).chunk(2, -1)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        a = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        lat = lat + a.transpose(1, 2).reshape(lat.shape[0], lat.shape[1], -1) @ f[p + "0.to_out.weight"].T
        h = ln(lat, (dim,), f[p + "1.0.weight"], f[p + "1.0.bias"])
        lat = lat + torch.nn.functional.gelu(h @ f[p + "1.1.weight"].T) @ f[p + "1.3.weight"].T
        i += 1
    assert i == 4
    x = torch.nn.functional.linear(lat, f["proj_out.weight"], f["proj_out.bias"])
    return ln(x, (ctx,), f["norm_out.weight"], f["norm_out.bias"])


def _unet_cross_attn_widths(family: str) -> list[int]:
    """Inner widths of ComfyUI's attn2 layers in IP-Adapter numbering order (input, output, middle blocks)."""
    from faithful_inpaint.devtools import random_models

    cfg = random_models.unet_config(family, "full")
    mc = random_models.model_config(family, "full")
    unet = mc.get_model({}, device="meta").diffusion_model
    groups = {"input_blocks": [], "output_blocks": [], "middle_block": []}
    for name, mod in unet.named_modules():
        if name.endswith("attn2"):
            groups[name.split(".")[0]].append(mod.to_k.out_features)
            assert mod.to_k.in_features == cfg["context_dim"]
    return groups["input_blocks"] + groups["output_blocks"] + groups["middle_block"]


def _check_ipadapter(smoke_dir, kind, family, ctx, n_tokens, clip_out):
    import comfy.utils

    name = _ensure(smoke_dir, kind)
    sd = comfy.utils.load_torch_file(str(smoke_dir / "ipadapter" / name), safe_load=True)
    assert all(k.startswith(("image_proj.", "ip_adapter.")) for k in sd)
    ip = {k[len("ip_adapter."):]: v for k, v in sd.items() if k.startswith("ip_adapter.")}
    assert ip["1.to_k_ip.weight"].shape[1] == ctx
    widths = _unet_cross_attn_widths(family)
    assert len(ip) == 2 * len(widths)
    tokens = _ip_image_tokens(sd, clip_out, ctx)
    assert tokens.shape == (1, n_tokens, ctx) and _finite(tokens)
    for n, width in enumerate(widths):
        for kv in ("k", "v"):
            w = ip[f"{2 * n + 1}.to_{kv}_ip.weight"]
            assert tuple(w.shape) == (width, ctx)
            assert _finite(tokens @ w.float().T)


def _clip_vision(smoke_dir, kind):
    import nodes

    name = _ensure(smoke_dir, kind)
    assert name in __import__("folder_paths").get_filename_list("clip_vision")
    return nodes.CLIPVisionLoader().load_clip(name)[0]


def test_clip_vision_h_and_ipadapters_sd15(smoke_dir):
    cv = _clip_vision(smoke_dir, "clip_vision_h")
    assert cv.model.vision_model.encoder.layers.__len__() == 32
    out = cv.encode_image(torch.rand(1, 64, 64, 3))
    assert out["image_embeds"].shape == (1, 1024) and _finite(out["image_embeds"])
    assert out["penultimate_hidden_states"].shape == (1, 257, 1280) and _finite(out["penultimate_hidden_states"])
    _check_ipadapter(smoke_dir, "ipadapter_sd15", "sd15", 768, 4, out)
    _check_ipadapter(smoke_dir, "ipadapter_sd15_plus", "sd15", 768, 16, out)


def test_clip_vision_g_and_ipadapter_sdxl(smoke_dir):
    """ViT-bigG (1.8 B parameters): its layout (ComfyUI's own model on the meta device) is detected from its keys by
    ComfyUI's rule; no 3.7 GB file is written. A full fp32 load needs ~11 GB, so the adapter's projection is checked
    on a random tensor of the encoder output's real shape."""
    sd = _layout_meta_sd("clip_vision_g")
    assert "vision_model.encoder.layers.47.layer_norm1.weight" in sd  # comfy.clip_vision's test for ViT-bigG
    out = {"image_embeds": torch.randn(1, 1280), "penultimate_hidden_states": torch.randn(1, 257, 1664)}
    _check_ipadapter(smoke_dir, "ipadapter_sdxl", "sdxl", 2048, 4, out)


# ---------------------------------------------------------------------------------------------------- BrushNet


@pytest.mark.parametrize("kind,family,counts,n_keys", [
    ("brushnet_sd15", "sd15", (24, 2, 30), 322),
    ("brushnet_sdxl", "sdxl", (18, 2, 22), None),
])
def test_brushnet_layout(smoke_dir, kind, family, counts, n_keys):
    """Diffusers-format BrushNet: the zero-conv key counts its loaders detect by, a 9-channel conv_in, and every
    copied UNet weight has the shape of the matching ComfyUI UNet weight."""
    import comfy.utils
    from faithful_inpaint.devtools import random_models

    name = _ensure(smoke_dir, kind)
    sd = comfy.utils.load_torch_file(str(smoke_dir / "inpaint" / name), safe_load=True)
    found = tuple(sum(1 for k in sd if k.startswith(p)) for p in
                  ("brushnet_down_blocks.", "brushnet_mid_block.", "brushnet_up_blocks."))
    assert found == counts
    if n_keys is not None:
        assert len(sd) == n_keys
    assert tuple(sd["conv_in_condition.weight"].shape) == (320, 9, 3, 3)   # BrushNetModel's name for it
    assert not any(".attentions." in k for k in sd)
    cfg = random_models.unet_config(family, "full", inpaint=True)
    unet = random_models.model_config(family, "full", inpaint=True).get_model({}, device="meta").diffusion_model
    usd = unet.state_dict()
    d2l = comfy.utils.unet_to_diffusers(cfg)
    for k, v in sd.items():
        assert v.dtype == torch.float16 and _finite(v), k
        if not k.startswith("brushnet_"):
            assert tuple(usd[d2l[k.replace("conv_in_condition.", "conv_in.")]].shape) == tuple(v.shape), k
