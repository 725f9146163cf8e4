"""LAR-Gen's RefineNet: the concatenation kernel, the file format, the loader and apply nodes, and sampling through
ComfyUI with tiny random models built under inference mode (as the executor builds them)."""
import json
import logging

import pytest
import torch

import comfy.clip_vision
import comfy.sample

from faithful_inpaint.kernels import refinenet as krn
from faithful_inpaint.kernels.painta import sdpa
from faithful_inpaint.nodes import refinenet as nrn
from faithful_inpaint.patching import refinenet as prn
from faithful_inpaint.patching.image_prompt import clip_vision_from_config
from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.devtools.random_models import build_vae
from faithful_inpaint.devtools.random_models import randomise, build_model, model_config
from helpers import forward

CLIP_WIDTH = 64


# ------------------------------------------------------------------------------------------------ builders

@pytest.fixture(scope="module")
def clip_vision():
    """A ComfyUI CLIP_VISION with 2 layers, 64 wide, 28 px input (5 tokens)."""
    config = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "image_size": 28,
              "hidden_size": CLIP_WIDTH, "projection_dim": 32, "intermediate_size": 64, "layer_norm_eps": 1e-5,
              "model_type": "clip_vision_model", "num_attention_heads": 4, "num_channels": 3,
              "num_hidden_layers": 2, "patch_size": 14}
    with torch.inference_mode():
        cv = clip_vision_from_config(config)
        randomise(cv.model, 0)
    return cv


@pytest.fixture(scope="module")
def vae():
    with torch.inference_mode():
        return build_vae("tiny")


@pytest.fixture(scope="module")
def sd15():
    return build_model("sd15", inpaint=True)


def refinenet_file(path, model, context_dim=768, in_channels=9, seed=0):
    """A RefineNet file for ``model``: random MLP, random cross-attention weights (stage-2 layout)."""
    g = torch.Generator().manual_seed(seed)
    config = krn.RefineNetConfig(clip_dim=CLIP_WIDTH, hidden_dim=48, context_dim=context_dim,
                                 unet_in_channels=in_channels)
    torch.manual_seed(seed)
    encoder = krn.DetailEncoder(config).state_dict()
    unet = {k: torch.randn(v.shape, generator=g) / (v.shape[-1] ** 0.5 if v.dim() > 1 else 10)
            for k, v in model.model.diffusion_model.state_dict().items() if krn.is_trained_in_stage2(k)}
    krn.save(path, config, encoder, unet)
    return path


@pytest.fixture(scope="module")
def refinenet(tmp_path_factory, sd15):
    path = refinenet_file(tmp_path_factory.mktemp("refinenet") / "r.safetensors", sd15)
    with torch.inference_mode():
        return nrn.load_refinenet(str(path))


def subject_image(batch=1, size=64, seed=1):
    return torch.rand(batch, size, size, 3, generator=torch.Generator().manual_seed(seed))


def apply(model, refinenet, clip_vision, vae, subject=None, **kw):
    args = dict(strength=1.0, start_percent=0.0, end_percent=1.0, uncond=nrn.UNCOND_NONE, at_h8=True, at_h16=True,
                at_h32=True, at_h64=True)
    args.update(kw)
    with torch.inference_mode():
        return nrn.RefineNetApply.execute(model=model, refinenet=refinenet, clip_vision=clip_vision, vae=vae,
                                          subject=subject_image() if subject is None else subject, **args).result[0]


def sample(model, batch=1, seed=1, steps=1, context_dim=768, size=8):
    ctx = torch.randn(1, 77, context_dim, generator=torch.Generator().manual_seed(7))
    cond = {}
    if context_dim == 2048:
        cond = {"pooled_output": torch.zeros(1, 1280), "width": 64, "height": 64}
    positive, negative = [[ctx, dict(cond)]], [[torch.zeros_like(ctx), dict(cond)]]
    latent = torch.zeros(batch, 4, size, size)
    noise = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent,
                                   seed=seed, disable_pbar=True)


class Recorder:
    """An attn1_patch that records (layer, query tokens, key tokens, sigma) of every self-attention call."""

    def __init__(self):
        self.calls = []

    def __call__(self, n, context, value, extra_options):
        self.calls.append((prn.key_of(extra_options), n.shape[1], context.shape[1], value.shape[1],
                           float(extra_options["sigmas"].max())))
        return n, context, value


# ------------------------------------------------------------------------------------------------ kernel and file

def test_strength_zero_is_plain_attention_and_one_is_eq_10():
    g = torch.Generator().manual_seed(0)
    n, subject = torch.randn(2, 16, 32, generator=g), torch.randn(2, 16, 32, generator=g)
    w_q, w_k, w_v = (torch.randn(32, 32, generator=g) / 6 for _ in range(3))
    plain = sdpa(n @ w_q, n @ w_k, n @ w_v, heads=4)
    keys, values = krn.concat_keys_values(n, n, n, subject, torch.tensor([0.0, 1.0]))
    out = sdpa(n @ w_q, keys @ w_k, values @ w_v, heads=4)
    # strength 0: every key and value twice, so the softmax weights halve and the output is the plain one
    torch.testing.assert_close(out[0], plain[0], atol=1e-6, rtol=1e-5)
    # strength 1: [c_ctx; c_obj] (eq. 10)
    assert torch.equal(keys[1], torch.cat([n[1], subject[1]])) and torch.equal(values[1], keys[1])
    assert (out[1] - plain[1]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="do not match"):
        krn.appended_tokens(n, subject[:, :8], torch.ones(2))


def test_file_round_trip_and_clear_errors(tmp_path):
    config = krn.RefineNetConfig(clip_dim=8, hidden_dim=12, context_dim=16, unet_in_channels=4)
    encoder = krn.DetailEncoder(config).state_dict()
    unet = {"output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight": torch.randn(32, 16)}
    krn.save(tmp_path / "r.safetensors", config, encoder, unet)
    got_config, got_encoder, got_unet = krn.load(tmp_path / "r.safetensors")
    assert got_config == config and set(got_unet) == set(unet)
    assert all(torch.equal(got_encoder[k], encoder[k]) for k in encoder)
    tensors, metadata = krn.state_dict_for_file(config, encoder, unet)
    assert metadata[krn.KIND_KEY] == "refinenet" and json.loads(metadata[krn.CONFIG_KEY])["context_dim"] == 16
    with pytest.raises(ValueError, match="not a RefineNet file"):
        krn.split_file(tensors, {})
    with pytest.raises(ValueError, match="unknown config fields"):
        krn.split_file(tensors, {**metadata, krn.CONFIG_KEY: json.dumps({"clip_dim": 8, "colour": 1})})
    wrong = krn.RefineNetConfig(clip_dim=9, hidden_dim=12, context_dim=16).to_json()
    with pytest.raises(ValueError, match="detail encoder's tensors do not match"):
        krn.split_file(tensors, {**metadata, krn.CONFIG_KEY: wrong})
    assert krn.is_trained_in_stage2("input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight")
    assert not krn.is_trained_in_stage2("input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight")


def test_loader_lists_models_refinenet_and_rejects_other_files(tmp_path, sd15):
    import folder_paths
    from safetensors.torch import save_file

    refinenet_file(tmp_path / "mine.safetensors", sd15)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    folder_paths.add_model_folder_path(nrn.FOLDER, str(tmp_path))
    assert {"mine.safetensors", "other.safetensors"} <= set(folder_paths.get_filename_list(nrn.FOLDER))
    with torch.inference_mode():
        (loaded,) = nrn.RefineNetLoader.execute("mine.safetensors").result
        assert isinstance(loaded, prn.RefineNet) and loaded.name == "mine.safetensors"
        with pytest.raises(NodeInputError, match=r"RefineNetLoader, input 'refinenet_name': other.safetensors: "
                                                 r"not a RefineNet file"):
            nrn.RefineNetLoader.execute("other.safetensors")


# ------------------------------------------------------------------------------------------------ sampling

def test_removing_refinenet_restores_the_plain_output_exactly(sd15, refinenet, clip_vision, vae):
    plain = sample(sd15)
    patched = apply(sd15, refinenet, clip_vision, vae)
    assert patched is not sd15 and len(patched.get_additional_models()) == 1
    refined = sample(patched)
    assert (refined - plain).abs().max() > 1e-3
    assert torch.equal(sample(sd15), plain)                      # nothing was left on the original
    assert not sd15.get_additional_models() and not sd15.wrappers
    assert "patches" not in sd15.model_options["transformer_options"]
    assert torch.equal(sample(patched), refined)                 # deterministic: the subject noise follows the seed


def test_concatenated_keys_reach_only_the_chosen_decoder_layers_never_refinenets_own(
        sd15, tmp_path, clip_vision, vae):
    with torch.inference_mode():   # an auxiliary UNet of its own: the recorder below is added to it
        own = nrn.load_refinenet(str(refinenet_file(tmp_path / "r.safetensors", sd15)))
    patched = apply(sd15, own, clip_vision, vae, at_h8=False, at_h16=True, at_h32=False)
    main, aux = Recorder(), Recorder()
    patched.set_model_attn1_patch(main)                          # runs after RefineNet's patch
    patched.get_additional_models()[0].set_model_attn1_patch(aux)
    sample(patched, steps=2)
    chosen = set(prn.decoder_layers(sd15.model.diffusion_model, (2,)))
    assert chosen and all(key[0] == "output" for key in chosen)
    every_layer = {b.key for b in prn.transformer_blocks(sd15.model.diffusion_model)}
    assert {c[0] for c in main.calls} == every_layer
    for key, queries, keys, values, _ in main.calls:
        assert (keys, values) == ((2 * queries,) * 2 if key in chosen else (queries,) * 2), key
    assert aux.calls and all(keys == queries and values == queries for _, queries, keys, values, _ in aux.calls)
    # one RefineNet pass per step (cond and uncond batched), at the noise level of that step's main call
    main_sigmas = sorted({c[4] for c in main.calls}, reverse=True)
    aux_sigmas = [c[4] for c in aux.calls if c[0] == sorted(chosen)[0]]
    assert aux_sigmas == main_sigmas and len(aux_sigmas) == 2


def test_two_refinenets_stack(sd15, refinenet, clip_vision, vae):
    twice = apply(apply(sd15, refinenet, clip_vision, vae, at_h32=False), refinenet, clip_vision, vae, at_h32=False)
    assert len(twice.get_additional_models()) == 2
    recorder = Recorder()
    twice.set_model_attn1_patch(recorder)
    forward(twice, torch.randn(1, 4, 8, 8), 5.0, torch.randn(1, 77, 768), (0,), torch.randn(1, 5, 8, 8))
    chosen = set(prn.decoder_layers(sd15.model.diffusion_model, (1, 2)))
    for key, queries, keys, _, _ in recorder.calls:
        assert keys == (3 * queries if key in chosen else queries), key


def test_unconditional_rows_get_plain_attention_unless_asked(sd15, refinenet, clip_vision, vae):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ctx = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(4))
    concat = torch.randn(2, 5, 8, 8, generator=torch.Generator().manual_seed(5))
    plain = forward(sd15, x, 5.0, ctx, cond_or_uncond=(0, 1), concat=concat)
    none = forward(apply(sd15, refinenet, clip_vision, vae), x, 5.0, ctx, (0, 1), concat)
    both = forward(apply(sd15, refinenet, clip_vision, vae, uncond=nrn.UNCOND_SUBJECT), x, 5.0, ctx, (0, 1), concat)
    assert (none[0] - plain[0]).abs().max() > 1e-3               # conditional row: the subject is attended
    torch.testing.assert_close(none[1], plain[1], atol=1e-5, rtol=1e-5)  # duplicated keys: plain attention
    assert (both[1] - plain[1]).abs().max() > 1e-3
    torch.testing.assert_close(both[0], none[0])
    # order read from cond_or_uncond, never assumed: the same rows swapped give the same per-row results
    swapped = forward(apply(sd15, refinenet, clip_vision, vae), x.flip(0), 5.0, ctx.flip(0), (1, 0), concat.flip(0))
    torch.testing.assert_close(swapped.flip(0), none, atol=1e-5, rtol=1e-5)


def test_separate_cond_and_uncond_calls_share_one_refinenet_pass(sd15, tmp_path, clip_vision, vae):
    with torch.inference_mode():
        own = nrn.load_refinenet(str(refinenet_file(tmp_path / "r.safetensors", sd15)))
    patched = apply(sd15, own, clip_vision, vae, uncond=nrn.UNCOND_SUBJECT)
    aux = Recorder()
    patched.get_additional_models()[0].set_model_attn1_patch(aux)
    x, ctx, concat = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 768), torch.randn(1, 5, 8, 8)
    forward(patched, x, 5.0, ctx, (0,), concat)
    passes = len(aux.calls)
    forward(patched, x, 5.0, ctx, (1,), concat)
    assert passes and len(aux.calls) == passes                   # same sigma: the features are reused
    forward(patched, x, 3.0, ctx, (1,), concat)
    assert len(aux.calls) == 2 * passes                          # a new step: a new pass


def test_exact_no_op_cases(sd15, refinenet, clip_vision, vae, caplog):
    with caplog.at_level(logging.WARNING):
        assert apply(sd15, refinenet, clip_vision, vae, strength=0.0) is sd15
        assert apply(sd15, refinenet, clip_vision, vae, at_h8=False, at_h16=False, at_h32=False,
                     at_h64=False) is sd15
    assert caplog.text.count("unchanged") == 2
    # outside the schedule window the call is the plain one, bit for bit
    late = apply(sd15, refinenet, clip_vision, vae, start_percent=0.9, end_percent=1.0)
    x, ctx, concat = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 768), torch.randn(2, 5, 8, 8)
    assert torch.equal(forward(late, x, 10.0, ctx, (0, 1), concat), forward(sd15, x, 10.0, ctx, (0, 1), concat))
    # only unconditional rows (and they see no subject): plain, bit for bit
    patched = apply(sd15, refinenet, clip_vision, vae)
    assert torch.equal(forward(patched, x, 5.0, ctx, (1, 1), concat), forward(sd15, x, 5.0, ctx, (1, 1), concat))


def test_batches_take_one_subject_or_one_per_image(sd15, refinenet, clip_vision, vae):
    x, ctx, concat = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 768), torch.randn(2, 5, 8, 8)
    two = apply(sd15, refinenet, clip_vision, vae, subject=torch.cat([subject_image(seed=1), subject_image(seed=2)]))
    one = apply(sd15, refinenet, clip_vision, vae, subject=subject_image(seed=1))
    out, ref = forward(two, x, 5.0, ctx, (0,), concat), forward(one, x, 5.0, ctx, (0,), concat)
    torch.testing.assert_close(out[0], ref[0])                   # image 0 has subject 0 in both
    assert (out[1] - ref[1]).abs().max() > 1e-4                   # image 1: another subject
    three = apply(sd15, refinenet, clip_vision, vae, subject=subject_image(batch=3))
    with pytest.raises(NodeInputError, match=r"RefineNetApply, input 'subject': 3 subject images for a batch of 2"):
        forward(three, x, 5.0, ctx, (0,), concat)


def test_subject_of_another_size_and_odd_latents(sd15, refinenet, clip_vision, vae):
    patched = apply(sd15, refinenet, clip_vision, vae, subject=torch.rand(1, 40, 72, 3))
    out = forward(patched, torch.randn(1, 4, 9, 11), 5.0, torch.randn(1, 77, 768), (0,), torch.randn(1, 5, 9, 11))
    assert out.shape == (1, 4, 9, 11) and bool(torch.isfinite(out).all())


def test_sdxl_inpainting_model(clip_vision, vae, tmp_path):
    sdxl = build_model("sdxl", inpaint=True)
    with torch.inference_mode():
        xl = nrn.load_refinenet(str(refinenet_file(tmp_path / "xl.safetensors", sdxl, context_dim=2048)))
    plain = sample(sdxl, context_dim=2048)
    refined = sample(apply(sdxl, xl, clip_vision, vae), context_dim=2048)
    assert bool(torch.isfinite(refined).all()) and (refined - plain).abs().max() > 1e-4


def test_mismatched_inputs_are_clear_errors(sd15, refinenet, clip_vision, vae, tmp_path):
    with pytest.raises(NodeInputError, match=r"RefineNetApply, input 'refinenet': .* 768-wide detail tokens but "
                                             r"SDXL models use 2048"):
        apply(build_model("sdxl", inpaint=True), refinenet, clip_vision, vae)
    with pytest.raises(NodeInputError, match=r"input 'refinenet': .*9 input channels \(an inpainting model\) but "
                                             r"the model has 4"):
        apply(build_model("sd15"), refinenet, clip_vision, vae)
    with pytest.raises(NodeInputError, match=r"input 'end_percent'"):
        apply(sd15, refinenet, clip_vision, vae, start_percent=0.5, end_percent=0.5)
    wide = krn.RefineNetConfig(clip_dim=80, hidden_dim=8, context_dim=768)
    krn.save(tmp_path / "wide.safetensors", wide, krn.DetailEncoder(wide).state_dict(), {})
    with torch.inference_mode():
        other = nrn.load_refinenet(str(tmp_path / "wide.safetensors"))
    with pytest.raises(NodeInputError, match=r"input 'clip_vision': this RefineNet reads 80-wide"):
        apply(sd15, other, clip_vision, vae)


def test_stage2_gradient_reaches_refinenet_cross_attention_and_the_mlp_only():
    """The training path: the same two patches on plain UNet forwards with ordinary (trainable) tensors."""
    config = model_config("sd15", inpaint=False)
    main_unet = config.get_model({}).diffusion_model
    aux_unet = model_config("sd15", inpaint=False).get_model({}).diffusion_model
    with torch.no_grad():
        for unet in (main_unet, aux_unet):
            for p in unet.parameters():
                p.copy_(torch.randn_like(p) * 0.05)
    for name, p in list(main_unet.named_parameters()) + list(aux_unet.named_parameters()):
        p.requires_grad_(False)
    trained = [p for name, p in aux_unet.named_parameters() if krn.is_trained_in_stage2(name)]
    for p in trained:
        p.requires_grad_(True)
    encoder = krn.DetailEncoder(krn.RefineNetConfig(clip_dim=CLIP_WIDTH, hidden_dim=32, context_dim=768))
    layers = prn.decoder_layers(main_unet, (1, 2, 4, 8))
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    store = {}
    aux_unet(torch.randn(1, 4, 8, 8), t, context=encoder(torch.randn(1, 5, CLIP_WIDTH)),
             transformer_options=prn.capture_options(layers, store))
    assert set(store) == set(layers)
    out = main_unet(x, t, context=torch.randn(1, 77, 768),
                    transformer_options=prn.concat_options(store, torch.ones(1)))
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
    assert sum(p.grad is not None for p in trained) > 0
    assert all(p.grad is None for p in main_unet.parameters())


def test_smoke_kind_is_a_full_size_sd15_refinenet(sd15):
    from faithful_inpaint.devtools import smoke_checkpoints as sc

    lay = sc.layout("refinenet_sd15")
    assert sc.folder_for("refinenet_sd15") == nrn.FOLDER
    sd = model_config("sd15", size="full", inpaint=True).get_model({}, device="meta").diffusion_model.state_dict()
    unet = {k[len(krn.UNET_PREFIX):]: shape for k, (shape, _) in lay.items() if k.startswith(krn.UNET_PREFIX)}
    assert unet == {k: tuple(v.shape) for k, v in sd.items() if krn.is_trained_in_stage2(k)}
    metadata = sc._spec("refinenet_sd15").metadata()
    config = krn.RefineNetConfig.from_json(metadata[krn.CONFIG_KEY])
    assert metadata[krn.KIND_KEY] == "refinenet" and (config.clip_dim, config.context_dim) == (1280, 768)


def test_gradient_pass_of_rasg_on_a_refinenet_model(sd15, refinenet, clip_vision, vae):
    """RASG differentiates the main UNet inside sampling (outside inference mode): RefineNet's features, made under
    inference mode, must still enter that pass, and the result must differ from RASG alone."""
    import comfy.samplers
    from faithful_inpaint.patching import rasg

    prepared = rasg.install(sd15, [1, 2, 3, 4])
    both = apply(prepared, refinenet, clip_vision, vae)
    sampler = comfy.samplers.KSAMPLER(rasg.sample_rasg, extra_options={"eta": 0.15})
    sigmas = comfy.samplers.calculate_sigmas(sd15.get_model_object("model_sampling"), "ddim_uniform", 2)
    ctx = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(7))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    outs = []
    for model in (prepared, both):
        with torch.inference_mode():
            outs.append(comfy.sample.sample_custom(
                model, torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)), 5.0, sampler, sigmas,
                [[ctx, {}]], [[torch.zeros_like(ctx), {}]], torch.zeros(1, 4, 16, 16), noise_mask=mask, seed=1,
                disable_pbar=True))
    assert bool(torch.isfinite(outs[1]).all()) and (outs[1] - outs[0]).abs().max() > 1e-4
