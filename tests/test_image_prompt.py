"""Decoupled image-prompt attention (LAR-Gen eq. 5-7, IP-Adapter): the public file layout and its detection, the
attention as installed on real ComfyUI UNets (tiny random SD1.5 / SDXL built under inference mode, like a loader
node's), its schedule window, mask, modes and cond/uncond rows, chaining, mismatch errors, gradient passes and PILOT.

CLIP vision models here are two-layer encoders with the real widths of ViT-H-14 / ViT-bigG-14 (the adapters' checks
read the widths); adapters for the tiny UNets are written in the public IP-Adapter layout and go through the loader.
The full-size public layouts are checked on their key/shape headers (and the SD1.5 files through the loader node).
"""

import pytest
import torch
from safetensors.torch import save_file

import comfy.clip_vision
import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.samplers
from faithful_inpaint.kernels import image_prompt as kip
from faithful_inpaint.kernels.painta import sdpa
from faithful_inpaint.nodes import image_prompt as nip
from faithful_inpaint.patching import image_prompt as ip
from faithful_inpaint.patching import pilot
from faithful_inpaint.patching.blocks import host_attention
from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.patching.gradients import enable_gradients, gradient_pass
from faithful_inpaint.patching.schedule import ScheduleWindow
from faithful_inpaint.devtools import smoke_checkpoints as sc
from faithful_inpaint.devtools.random_models import randomise, build_model, model_config
from helpers import forward

VIT_H = {"hidden_size": 1280, "projection_dim": 1024}
VIT_G = {"hidden_size": 1664, "projection_dim": 1280}
ALWAYS = ScheduleWindow(float("inf"), 0.0)


# ------------------------------------------------------------------------------------------------ builders

def clip_vision(widths, seed=0):
    """A ComfyUI CLIP_VISION with two layers and the real widths of an encoder (28 px input: 5 tokens)."""
    config = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "image_size": 28,
              "intermediate_size": 64, "layer_norm_eps": 1e-5, "model_type": "clip_vision_model",
              "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 2, "patch_size": 14, **widths}
    with torch.inference_mode():
        cv = ip.clip_vision_from_config(config)
        randomise(cv.model, seed)
    return cv


def adapter_state_dict(model, variant, feature_dim, seed=0, context_dim=768):
    """Random weights in the public IP-Adapter layout for ``model``'s cross-attention layers."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    def b(dim):                                                     # biases not zero: the null image's tokens
        return 0.1 * torch.randn(dim, generator=g)                  # (zero embeddings, projected) are then not 0

    def norm(prefix, dim):
        return {f"{prefix}.weight": 1 + 0.02 * torch.randn(dim, generator=g), f"{prefix}.bias": b(dim)}

    sd = {}
    if variant == kip.LINEAR:
        sd.update({"image_proj.proj.weight": w(4 * context_dim, feature_dim),
                   "image_proj.proj.bias": b(4 * context_dim), **norm("image_proj.norm", context_dim)})
    elif variant == kip.PLUS:
        dim = 128                                                   # 2 heads of 64
        sd.update({"image_proj.latents": torch.randn(1, 16, dim, generator=g) / dim ** 0.5,
                   "image_proj.proj_in.weight": w(dim, feature_dim), "image_proj.proj_in.bias": b(dim),
                   "image_proj.proj_out.weight": w(context_dim, dim),
                   "image_proj.proj_out.bias": b(context_dim), **norm("image_proj.norm_out", context_dim)})
        for i in range(2):
            p = f"image_proj.layers.{i}."
            sd.update({**norm(p + "0.norm1", dim), **norm(p + "0.norm2", dim), p + "0.to_q.weight": w(dim, dim),
                       p + "0.to_kv.weight": w(2 * dim, dim), p + "0.to_out.weight": w(dim, dim),
                       **norm(p + "1.0", dim), p + "1.1.weight": w(4 * dim, dim), p + "1.3.weight": w(dim, 4 * dim)})
    unet = model.get_model_object("diffusion_model")
    for n, info in enumerate(ip.cross_attention_layers(unet)):
        width = info.module.attn2.to_k.out_features
        sd[f"ip_adapter.{2 * n + 1}.to_k_ip.weight"] = w(width, context_dim)
        sd[f"ip_adapter.{2 * n + 1}.to_v_ip.weight"] = w(width, context_dim)
    return sd


def write_adapter(tmp_path_factory, sd, name):
    """Save into a registered models/ipadapter folder and load through the loader node (real detection)."""
    import folder_paths

    folder = tmp_path_factory.mktemp("ipadapter")
    save_file({k: v.half().contiguous() for k, v in sd.items()}, str(folder / name))
    folder_paths.add_model_folder_path(nip.FOLDER, str(folder))
    with torch.inference_mode():
        (adapter,) = nip.ImagePromptAdapterLoader.execute(adapter_name=name).result
    return adapter


def meta_adapter(kind):
    """The adapter module of a full-size public layout, without weights (meta tensors)."""
    sd = {k: torch.empty(shape, device="meta") for k, (shape, _) in sc.layout(kind).items()}
    return kip.ImagePromptAdapter.from_state_dict(sd)


def meta_model(family):
    """A full-size UNet on the meta device (no memory) in a ModelPatcher, for architecture checks."""
    model = model_config(family, "full").get_model({}, device="meta")
    return comfy.model_patcher.ModelPatcher(model, load_device="cpu", offload_device="cpu")


def subject(seed=3, n=1):
    return torch.rand(n, 40, 40, 3, generator=torch.Generator().manual_seed(seed))


def apply(model, adapter, cv, beta=1.0, start=0.0, end=1.0, mode=ip.BOTH, attn_mask=None, clip=None, image=None):
    with torch.inference_mode():
        (out,) = nip.ImagePromptApply.execute(model=model, adapter=adapter, clip_vision=cv,
                                              image=subject() if image is None else image, beta=beta,
                                              start_percent=start, end_percent=end, mode=mode, attn_mask=attn_mask,
                                              clip=clip).result
    return out


def inputs(batch=2, side=16, context_dim=768, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        return torch.randn(batch, 4, side, side, generator=g), torch.randn(batch, 77, context_dim, generator=g)


@pytest.fixture(scope="module")
def sd15():
    return build_model("sd15")


@pytest.fixture(scope="module")
def vit_h():
    return clip_vision(VIT_H)


@pytest.fixture(scope="module")
def linear_adapter(sd15, tmp_path_factory):
    return write_adapter(tmp_path_factory, adapter_state_dict(sd15, kip.LINEAR, 1024), "tiny-ip-adapter.safetensors")


@pytest.fixture(scope="module")
def plus_adapter(sd15, tmp_path_factory):
    return write_adapter(tmp_path_factory, adapter_state_dict(sd15, kip.PLUS, 1280),
                         "tiny-ip-adapter-plus.safetensors")


# ------------------------------------------------------------------------------------------------ layouts

@pytest.mark.parametrize("kind,family,variant,feature,layers", [
    ("ipadapter_sd15", "sd15", kip.LINEAR, 1024, 16),
    ("ipadapter_sd15_plus", "sd15", kip.PLUS, 1280, 16),
    ("ipadapter_sdxl", "sdxl", kip.LINEAR, 1280, 70),
])
def test_public_layouts_are_detected_and_match_the_unet_in_diffusers_order(kind, family, variant, feature, layers):
    adapter = meta_adapter(kind)
    spec = adapter.spec
    assert (spec.variant, spec.feature_dim, len(spec.layer_widths)) == (variant, feature, layers)
    assert spec.context_dim == {"sd15": 768, "sdxl": 2048}[family]
    # Layer n of the file is the n-th cross-attention in diffusers' order (down, up, mid): the widths line up with
    # the real UNet's layers, and the mid block comes last.
    infos = ip.check_model(spec, meta_model(family), "test")
    if family == "sd15":
        assert [i.key[:2] for i in infos] == [("input", b) for b in (1, 2, 4, 5, 7, 8)] + \
            [("output", b) for b in range(3, 12)] + [("middle", 0)]
    else:
        assert infos[0].key == ("input", 4, 0) and infos[24].key == ("output", 0, 0) and infos[60].key == ("middle", 0, 0)
    if variant == kip.PLUS:
        attention = adapter.projection.layers[0][0]
        assert adapter.projection.latents.shape == (1, 16, 768) and attention.heads == 12


def test_nested_bin_layout_and_faceid_refusal():
    flat = {k: torch.empty(s, device="meta") for k, (s, _) in sc.layout("ipadapter_sd15").items()}
    nested = {"image_proj": {k[len("image_proj."):]: v for k, v in flat.items() if k.startswith("image_proj.")},
              "ip_adapter": {k[len("ip_adapter."):]: v for k, v in flat.items() if k.startswith("ip_adapter.")}}
    assert kip.inspect(nested) == kip.inspect(flat)
    faceid = dict(flat, **{"ip_adapter.0.to_q_lora.down.weight": torch.empty(128, 320, device="meta")})
    with pytest.raises(ValueError, match="FaceID"):
        kip.inspect(faceid)
    with pytest.raises(ValueError, match="not an IP-Adapter"):
        kip.inspect({"model.diffusion_model.x": torch.empty(1, device="meta")})


def test_full_and_sdxl_plus_projections_from_their_shapes():
    layers = {k: v for k, v in ((k, torch.empty(s, device="meta")) for k, (s, _) in sc.layout("ipadapter_sdxl").items())
              if k.startswith("ip_adapter.")}
    full = {"image_proj.proj.0.weight": torch.randn(64, 64), "image_proj.proj.0.bias": torch.zeros(64),
            "image_proj.proj.2.weight": torch.randn(32, 64), "image_proj.proj.2.bias": torch.zeros(32),
            "image_proj.proj.3.weight": torch.ones(32), "image_proj.proj.3.bias": torch.zeros(32),
            "ip_adapter.1.to_k_ip.weight": torch.randn(8, 32), "ip_adapter.1.to_v_ip.weight": torch.randn(8, 32)}
    adapter = kip.ImagePromptAdapter.from_state_dict(full)
    assert adapter.spec.variant == kip.FULL and adapter.spec.feature == "penultimate_hidden_states"
    assert adapter.project(torch.randn(2, 5, 64)).shape == (2, 5, 32)           # one token per patch token
    # plus_sdxl_vit-h: a 1280-wide Resampler with 20 heads over ViT-H hidden states, 2048-wide tokens
    plus = dict(layers)
    plus.update({"image_proj.latents": torch.empty(1, 16, 1280, device="meta"),
                 "image_proj.proj_in.weight": torch.empty(1280, 1280, device="meta"),
                 "image_proj.proj_in.bias": torch.empty(1280, device="meta"),
                 "image_proj.proj_out.weight": torch.empty(2048, 1280, device="meta"),
                 "image_proj.proj_out.bias": torch.empty(2048, device="meta"),
                 "image_proj.norm_out.weight": torch.empty(2048, device="meta"),
                 "image_proj.norm_out.bias": torch.empty(2048, device="meta")})
    for i in range(4):
        p = f"image_proj.layers.{i}."
        for name, shape in (("0.norm1.weight", (1280,)), ("0.norm1.bias", (1280,)), ("0.norm2.weight", (1280,)),
                            ("0.norm2.bias", (1280,)), ("0.to_q.weight", (1280, 1280)),
                            ("0.to_kv.weight", (2560, 1280)), ("0.to_out.weight", (1280, 1280)),
                            ("1.0.weight", (1280,)), ("1.0.bias", (1280,)), ("1.1.weight", (5120, 1280)),
                            ("1.3.weight", (1280, 5120))):
            plus[p + name] = torch.empty(shape, device="meta")
    adapter = kip.ImagePromptAdapter.from_state_dict(plus)
    assert (adapter.spec.variant, adapter.spec.feature_dim, adapter.spec.context_dim) == (kip.PLUS, 1280, 2048)
    assert adapter.projection.layers[0][0].heads == 20 and len(adapter.projection.layers) == 4


def test_resampler_attention_is_the_perceiver_formula():
    torch.manual_seed(0)
    attention = kip._PerceiverAttention(dim=32, heads=2, head_width=16)
    features, latents = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    f, lat = attention.norm1(features), attention.norm2(latents)
    q = attention.to_q(lat).view(2, 3, 2, 16).transpose(1, 2)
    k, v = attention.to_kv(torch.cat([f, lat], 1)).chunk(2, -1)
    k, v = (t.view(2, 8, 2, 16).transpose(1, 2) for t in (k, v))
    by_hand = ((q @ k.transpose(-1, -2)) / 4.0).softmax(-1) @ v
    expected = attention.to_out(by_hand.transpose(1, 2).reshape(2, 3, 32))
    torch.testing.assert_close(attention(features, latents), expected)


def test_public_sd15_files_load_through_the_loader():
    sc.register_model_folders(sc.default_models_dir(), ["ipadapter_sd15", "ipadapter_sd15_plus"])
    names = sc.ensure_smoke_models(sc.default_models_dir(), ["ipadapter_sd15", "ipadapter_sd15_plus"])
    with torch.inference_mode():
        linear = nip.ImagePromptAdapterLoader.execute(adapter_name=names["ipadapter_sd15"]).result[0]
        plus = nip.ImagePromptAdapterLoader.execute(adapter_name=names["ipadapter_sd15_plus"]).result[0]
    assert linear.spec.variant == kip.LINEAR and plus.spec.variant == kip.PLUS
    with torch.inference_mode():
        tokens = plus.project(torch.randn(2, 257, 1280))
    assert tokens.shape == (2, 16, 768) and torch.isfinite(tokens).all()
    ip.check_model(linear.spec, meta_model("sd15"), "test")


# ------------------------------------------------------------------------------------------------ attention

def test_beta_zero_is_exactly_the_text_only_model_and_beta_changes_it(sd15, linear_adapter, vit_h):
    x, ctx = inputs()
    plain = forward(sd15, x, 2.0, ctx)
    assert torch.equal(forward(apply(sd15, linear_adapter, vit_h, beta=0.0), x, 2.0, ctx), plain)
    changed = forward(apply(sd15, linear_adapter, vit_h, beta=1.0), x, 2.0, ctx)
    assert (changed - plain).abs().max() > 1e-3
    assert "patches_replace" not in sd15.model_options["transformer_options"]     # the original is untouched


def test_plus_adapter_changes_the_output_and_its_null_image_is_zero_pixels(sd15, plus_adapter, vit_h):
    x, ctx = inputs()
    patched = apply(sd15, plus_adapter, vit_h)
    assert (forward(patched, x, 2.0, ctx) - forward(sd15, x, 2.0, ctx)).abs().max() > 1e-3
    with torch.inference_mode():
        tokens, null = ip.encode_image_tokens(plus_adapter, vit_h, subject(n=2))
        zero_pixels = vit_h.model(pixel_values=torch.zeros(1, 3, 28, 28), intermediate_output=-2)[1]
        expected_null = plus_adapter.project(zero_pixels)
    assert tokens.shape == (1, 32, 768)                              # two images: 2 x 16 tokens side by side
    torch.testing.assert_close(null, expected_null.repeat(1, 2, 1))


def test_linear_null_image_is_the_projection_of_zero_embeddings(linear_adapter, vit_h):
    with torch.inference_mode():
        tokens, null = ip.encode_image_tokens(linear_adapter, vit_h, subject())
        expected = linear_adapter.project(torch.zeros(1, 1024))
    assert tokens.shape == null.shape == (1, 4, 768)
    torch.testing.assert_close(null, expected)


def _installed(model, adapter, cv, key, **kwargs):
    patched = apply(model, adapter, cv, **kwargs)
    return patched, patched.model_options["transformer_options"]["patches_replace"]["attn2"][key]


def _layer_call(cou, side=4, heads=4, width=64, sigma=2.0, seed=0, extra=None):
    g = torch.Generator().manual_seed(seed)
    b = 2 * len(cou)
    q, k, v = torch.randn(b, side * side, width, generator=g), torch.randn(b, 77, width, generator=g), \
        torch.randn(b, 77, width, generator=g)
    options = {"cond_or_uncond": list(cou), "sigmas": torch.full((b,), sigma), "n_heads": heads,
               "activations_shape": [b, width, side, side], "block": ("input", 3), "block_index": 0, **(extra or {})}
    return q, k, v, options


def test_layer_output_is_eq7_with_rows_from_cond_or_uncond(sd15, linear_adapter, vit_h):
    key = ("input", 3, 0)                                            # a 64-wide layer of the tiny UNet
    patched, replace = _installed(sd15, linear_adapter, vit_h, key, beta=0.7)
    hooks_layers = {}
    with torch.inference_mode():
        tokens, null = ip.encode_image_tokens(linear_adapter, vit_h, subject())
        layers = ip.cross_attention_layers(sd15.get_model_object("diffusion_model"))
        n = [i.key for i in layers].index(key)
        for name, t in (("image", tokens), ("null", null)):
            hooks_layers[name] = linear_adapter.layer_keys_values(t)[n]
        for cou in ([1, 0], [0], [1]):                              # uncond first, then split calls
            q, k, v, options = _layer_call(cou)
            out = replace(q, k, v, options)
            text = sdpa(q, k, v, 4)
            for i, kind in enumerate(cou):
                rows = slice(2 * i, 2 * i + 2)
                k_img, v_img = hooks_layers["image" if kind == 0 else "null"]
                expected = text[rows] + 0.7 * sdpa(q[rows], k_img.expand(2, -1, -1), v_img.expand(2, -1, -1), 4)
                torch.testing.assert_close(out[rows], expected, atol=1e-5, rtol=1e-5)
        # text only: every row sees the null image
        _, text_only = _installed(sd15, linear_adapter, vit_h, key, beta=0.7, mode=ip.TEXT_ONLY)
        q, k, v, options = _layer_call([0, 1])
        k0, v0 = hooks_layers["null"]
        expected = sdpa(q, k, v, 4) + 0.7 * sdpa(q, k0.expand(4, -1, -1), v0.expand(4, -1, -1), 4)
        torch.testing.assert_close(text_only(q, k, v, options), expected, atol=1e-5, rtol=1e-5)


def test_image_only_replaces_the_conditional_text_with_the_empty_prompt(sd15, linear_adapter, vit_h):
    key = ("input", 3, 0)
    infos = ip.cross_attention_layers(sd15.get_model_object("diffusion_model"))
    attn2 = {i.key: i.module for i in infos}[key].attn2
    with torch.inference_mode():
        empty = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(9))   # what CLIP gives for ""
        tokens, null = ip.encode_image_tokens(linear_adapter, vit_h, subject())
        hooks = ip.ImagePromptHooks.from_adapter(linear_adapter, infos, tokens, null, beta=0.0, window=ALWAYS,
                                                 mode=ip.IMAGE_ONLY, null_text=empty)
        replace = hooks.install(sd15).model_options["transformer_options"]["patches_replace"]["attn2"][key]
        q, k, v, options = _layer_call([1, 0])
        k, v = torch.cat([k, k.flip(1)], 1), torch.cat([v, v.flip(1)], 1)   # a two-window prompt: 154 tokens
        out = replace(q, k, v, options)
        null_k, null_v = attn2.to_k(empty), attn2.to_v(empty)
        torch.testing.assert_close(out[:2], sdpa(q[:2], k[:2], v[:2], 4), atol=1e-5, rtol=1e-5)  # uncond: own text
        torch.testing.assert_close(out[2:], sdpa(q[2:], null_k.expand(2, -1, -1), null_v.expand(2, -1, -1), 4),
                                   atol=1e-5, rtol=1e-5)                                      # cond: empty prompt
    with pytest.raises(NodeInputError, match="ImagePromptApply, input 'clip'"):
        apply(sd15, linear_adapter, vit_h, mode=ip.IMAGE_ONLY)


def test_schedule_window(sd15, linear_adapter, vit_h):
    key = ("input", 3, 0)
    patched, replace = _installed(sd15, linear_adapter, vit_h, key, start=0.5, end=1.0)
    window = ScheduleWindow.from_percent(sd15, 0.5, 1.0)
    with torch.inference_mode():
        for sigma, active in ((window.sigma_start * 1.5, False), (window.sigma_start * 0.5, True)):
            q, k, v, options = _layer_call([0, 1], sigma=sigma)
            same = torch.equal(replace(q, k, v, options), host_attention(q, k, v, options))
            assert same != active
    x, ctx = inputs()
    early = window.sigma_start * 2
    assert torch.equal(forward(patched, x, early, ctx), forward(sd15, x, early, ctx))


def test_attention_mask_confines_the_image_prompt(sd15, linear_adapter, vit_h):
    mask = torch.zeros(1, 64, 64)
    mask[:, :, 32:] = 1                                              # right half only
    key = ("input", 3, 0)
    _, replace = _installed(sd15, linear_adapter, vit_h, key, attn_mask=mask)
    with torch.inference_mode():
        q, k, v, options = _layer_call([0, 1], side=8)
        delta = (replace(q, k, v, options) - host_attention(q, k, v, options)).view(4, 8, 8, -1)
    assert delta[:, :, :4].abs().max() == 0 and (delta[:, :, 4:].abs().amax(-1) > 0).all()
    # end to end (effects spread through the convolutions of a tiny UNet): the left quarter of the output moves
    # less than the right quarter, and less than without the mask
    x, ctx = inputs()
    plain = forward(sd15, x, 2.0, ctx)
    masked = forward(apply(sd15, linear_adapter, vit_h, attn_mask=mask), x, 2.0, ctx) - plain
    full = forward(apply(sd15, linear_adapter, vit_h), x, 2.0, ctx) - plain
    left = masked[..., :4].abs().mean()
    assert left < masked[..., 12:].abs().mean() and left < full[..., :4].abs().mean()


def test_chaining_keeps_a_previous_attn2_replace(sd15, linear_adapter, vit_h):
    """A replace already on the key (IPAdapter_plus style: one callable per key that adds its own image attention)
    is called for Z, then eq. (7) is added: both effects are present."""
    class OtherPackReplace:
        calls = 0                     # on the class: ModelPatcher.clone() deep-copies replace objects

        def __call__(self, q, k, v, extra_options):
            OtherPackReplace.calls += 1
            return host_attention(q, k, v, extra_options) + 0.5

    other = OtherPackReplace()
    first = sd15.clone()
    for info in ip.cross_attention_layers(sd15.get_model_object("diffusion_model")):
        first.set_model_attn2_replace(other, info.key[0], info.key[1])          # the (block, id) key form
    key = ("input", 3, 0)
    both, replace = _installed(first, linear_adapter, vit_h, key)
    _, mine_only = _installed(sd15, linear_adapter, vit_h, key)
    with torch.inference_mode():
        q, k, v, options = _layer_call([0, 1])
        torch.testing.assert_close(replace(q, k, v, options), mine_only(q, k, v, options) + 0.5)
    x, ctx = inputs()
    OtherPackReplace.calls = 0
    outs = {name: forward(m, x, 2.0, ctx) for name, m in (("plain", sd15), ("other", first), ("both", both))}
    assert OtherPackReplace.calls == 10 * 2                                              # every layer, in both runs
    assert (outs["both"] - outs["other"]).abs().max() > 1e-3 and (outs["other"] - outs["plain"]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ errors

def test_mismatched_pairs_give_clear_errors(sd15, vit_h, linear_adapter):
    sdxl_adapter, sd15_full = meta_adapter("ipadapter_sdxl"), meta_adapter("ipadapter_sd15")
    sdxl = build_model("sdxl")
    with pytest.raises(NodeInputError, match=r"ImagePromptApply, input 'clip_vision'.*1280-wide image embeddings.*"
                                             r"ViT-bigG-14.*ViT-H-14"):
        apply(sdxl, sdxl_adapter, vit_h)
    vit_g = clip_vision(VIT_G)
    with pytest.raises(NodeInputError, match=r"input 'clip_vision'.*plus adapter reads 1280-wide penultimate.*"
                                             r"ViT-H-14.*ViT-bigG-14.*1664"):
        apply(sd15, meta_adapter("ipadapter_sd15_plus"), vit_g)
    with pytest.raises(NodeInputError, match=r"input 'adapter'.*for SD1.x.*the model is SDXL"):
        apply(sdxl, linear_adapter, vit_h)
    with pytest.raises(NodeInputError, match=r"input 'adapter'.*16 cross-attention layers.*has 10"):
        apply(sd15, sd15_full, vit_h)
    with pytest.raises(NodeInputError, match=r"input 'end_percent'"):
        apply(sd15, linear_adapter, vit_h, start=0.6, end=0.5)


def test_loader_refuses_other_files_by_name(tmp_path_factory):
    import folder_paths

    folder = tmp_path_factory.mktemp("ipadapter_bad")
    save_file({"model.diffusion_model.conv.weight": torch.zeros(2, 2)}, str(folder / "not-an-adapter.safetensors"))
    folder_paths.add_model_folder_path(nip.FOLDER, str(folder))
    with pytest.raises(NodeInputError, match=r"ImagePromptAdapterLoader, input 'adapter_name'.*not-an-adapter"):
        nip.ImagePromptAdapterLoader.execute(adapter_name="not-an-adapter.safetensors")


# ------------------------------------------------------------------------------------------------ gradients

def _grad(model, x, ctx):
    import comfy.sampler_helpers

    model = enable_gradients(model)
    with torch.inference_mode():               # what a sampling run does before its sampler starts
        options = comfy.model_patcher.create_model_options_clone(model.model_options)
        comfy.sampler_helpers.prepare_model_patcher(model, {}, options)
        comfy.sampler_helpers.prepare_sampling(model, x.shape, {}, options)
    with torch.inference_mode(), gradient_pass({"model_options": model.model_options}) as args:
        to = {**args["model_options"]["transformer_options"], "cond_or_uncond": [0, 1]}
        x_in = x.detach().clone().requires_grad_(True)
        sigmas = torch.full((x.shape[0],), 2.0)
        to["sigmas"] = sigmas
        out = model.model.apply_model(x_in, sigmas, c_crossattn=ctx.clone(), transformer_options=to)
        (grad,) = torch.autograd.grad(out.square().mean(), x_in)
    return grad


def test_gradient_wrt_x_flows_through_the_patch(sd15, plus_adapter, vit_h, tmp_path_factory):
    x, ctx = inputs()
    patched = apply(sd15, plus_adapter, vit_h, attn_mask=torch.ones(1, 32, 32))
    assert next(patched.model.parameters()).is_inference()
    grad = _grad(patched, x, ctx)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert (grad - _grad(sd15, x, ctx)).abs().max() > 0


def test_patch_is_active_inside_pilot_inner_steps(sd15, linear_adapter, vit_h):
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    _, ctx = inputs(batch=1)
    sigmas = comfy.samplers.calculate_sigmas(sd15.get_model_object("model_sampling"), "ddim_uniform", 1)
    sampler = comfy.samplers.KSAMPLER(pilot.sample_pilot, extra_options={"inner_steps": 1})

    def losses(model):
        prepared = pilot.install(model, [1, 2, 3])
        guide = prepared.model_options[pilot.GUIDE_KEY]
        with torch.inference_mode():
            comfy.sample.sample_custom(prepared, torch.zeros_like(latent), 5.0, sampler, sigmas, [[ctx, {}]],
                                       [[torch.zeros_like(ctx), {}]], latent, noise_mask=mask, seed=1,
                                       disable_pbar=True)
        return torch.stack([loss for _, _, loss in guide.last_losses])

    plain = losses(sd15)
    assert torch.equal(losses(apply(sd15, linear_adapter, vit_h, beta=0.0)), plain)
    with_image = losses(apply(sd15, linear_adapter, vit_h, beta=1.0))
    assert (with_image - plain).abs().max() > 0                     # the first gradient pass already differs
