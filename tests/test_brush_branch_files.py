"""Branch files: public BrushNet / PowerPaint layouts (random-weight smoke files), the pack's own files, wrong files."""
import pytest
import torch

from faithful_inpaint.kernels import brush_files
from faithful_inpaint.kernels.brush_branch import BranchConfig, BrushBranch
from faithful_inpaint.nodes.brush_branch import BrushBranchApply, BrushBranchLoader
from faithful_inpaint.patching.brush_branch import (encode_task_prompt, inject_residuals, load_branch,
                                                    unet_state_dict_diffusers)
from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.devtools import random_models
from faithful_inpaint.devtools import smoke_checkpoints as sc
from faithful_inpaint.devtools.random_models import build_model


@pytest.fixture(scope="module")
def smoke_dir():
    d = sc.default_models_dir()
    sc.register_model_folders(d)
    return d


def smoke_path(smoke_dir, kind):
    name = sc.ensure_smoke_models(smoke_dir, [kind])[kind]
    return str(smoke_dir / sc.folder_for(kind) / name)


def meta_fit(family: str, config: BranchConfig):
    """Run the full-size UNet of ``family`` on the meta device with a full-size branch's residuals injected: every
    residual must have exactly the shape of the features at its point (``inject_residuals`` checks it)."""
    unet = random_models.model_config(family, "full").get_model({}, device="meta").diffusion_model
    with torch.device("meta"):
        branch = BrushBranch(config)
    x = torch.empty(1, 4, 64, 48, device="meta")
    t = torch.empty(1, device="meta")
    ctx = torch.empty(1, 77, config.context_dim, device="meta")
    y = torch.empty(1, 2816, device="meta") if family == "sdxl" else None
    out = branch(x, x, torch.empty(1, 1, 64, 48, device="meta"), t, ctx, y)
    seen = []
    options = {"optimized_attention_override": lambda func, q, *args, **kwargs: q}   # no attention math on meta
    with torch.inference_mode(), inject_residuals(unet, out, 1.0, options) as patched_options:
        patches = patched_options["patches"]
        for name in ("input_block_patch", "output_block_patch"):
            inner = patches[name][-1]
            patches[name][-1] = (lambda f: (lambda *a: (seen.append(a[0].shape), f(*a))[1]))(inner)
        assert unet(x, t, ctx, y, transformer_options=patched_options).shape == x.shape
    return seen


@pytest.mark.parametrize("kind,family,n_down,n_up", [("brushnet_sd15", "sd15", 12, 15),
                                                     ("brushnet_sdxl", "sdxl", 9, 11)])
def test_public_brushnet_file_loads_strictly_and_fits_the_unet(smoke_dir, kind, family, n_down, n_up):
    loaded = load_branch(smoke_path(smoke_dir, kind))
    assert (loaded.kind.kind, loaded.kind.family, loaded.kind.public) == ("brushnet", family, True)
    branch = loaded.patcher.model
    cfg = branch.config
    assert not cfg.cross_attention
    down, mid, up = cfg.residual_channels()
    assert (len(down), len(up)) == (n_down, n_up)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(1, 2816, generator=g) if family == "sdxl" else None
    with torch.inference_mode():
        out = branch(torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g),
                     torch.ones(1, 1, 16, 16), torch.tensor([500.0]), None, y)
    assert [r.shape[1] for r in out.down] == down and [r.shape[1] for r in out.up] == up and out.mid.shape[1] == mid
    assert all(torch.isfinite(r).all() for r in out.down + out.up + [out.mid])
    # Every residual point of the full-size UNet is reached with a residual of exactly its shape.
    seen = meta_fit(family, cfg)
    assert len(seen) == n_down + len(random_models.model_config(family, "full").get_model(
        {}, device="meta").diffusion_model.output_blocks)


def test_powerpaint_files_load_and_task_prompts_reach_the_branch(smoke_dir):
    loaded = load_branch(smoke_path(smoke_dir, "powerpaint_sd15"),
                         smoke_path(smoke_dir, "powerpaint_sd15_text_encoder"))
    assert loaded.kind.kind == "powerpaint" and loaded.patcher.model.config.cross_attention
    assert set(loaded.task_vectors) == {"P_ctxt", "P_shape", "P_obj"}
    assert all(v.shape == (10, 768) for v in loaded.task_vectors.values())
    clip = loaded.task_encoder
    # The task prompts are encoded by PowerPaint's own text encoder (the file's weights, not the checkpoint's CLIP).
    from safetensors import safe_open

    with safe_open(smoke_path(smoke_dir, "powerpaint_sd15_text_encoder"), "pt") as f:
        vocab = f.get_tensor("text_model.embeddings.token_embedding.wrapped.weight")
    assert torch.equal(clip.get_sd()["clip_l.transformer.text_model.embeddings.token_embedding.weight"].float(),
                       vocab.float())
    with torch.inference_mode():
        empty = encode_task_prompt(clip, loaded.task_vectors, "")
        obj = encode_task_prompt(clip, loaded.task_vectors, "P_obj")
        ctxt = encode_task_prompt(clip, loaded.task_vectors, "P_ctxt")
    assert empty.shape == obj.shape == (1, 77, 768)
    assert not torch.allclose(obj, empty) and not torch.allclose(obj, ctxt)
    # The start token's output is the same whatever follows (causal text encoder): the vectors sit after it.
    torch.testing.assert_close(obj[:, 0], empty[:, 0])
    meta_fit("sd15", loaded.patcher.model.config)


def test_powerpaint_branch_without_its_text_encoder_is_a_clear_error(smoke_dir):
    with pytest.raises(NodeInputError, match="powerpaint_text_encoder.*task prompts"):
        load_branch(smoke_path(smoke_dir, "powerpaint_sd15"))
    with pytest.raises(NodeInputError, match="PowerPaint's text encoder; choose it as powerpaint_text_encoder"):
        load_branch(smoke_path(smoke_dir, "powerpaint_sd15_text_encoder"))


@pytest.mark.parametrize("kind,expected", [
    ("sd15", "this is an SD1.5 checkpoint: load it with Load Checkpoint"),
    ("sd15_inpaint", "this is an SD1.5 inpainting checkpoint"),
    ("sdxl", "this is an SDXL checkpoint"),
    ("controlnet_sd15", "this is a ControlNet"),
    ("ipadapter_sd15", "this is an IP-Adapter"),
])
def test_wrong_files_say_what_they_are(tmp_path, kind, expected):
    """The loader tells what a file is from its keys and shapes, so the files are layout files: real headers,
    all-zero weights, sparse on disk (the SDXL checkpoint would otherwise be 6.9 GB written for this test alone)."""
    path = str(sc.write_layout_file(kind, tmp_path / sc.filename_for(kind)))
    with pytest.raises(NodeInputError) as err:
        load_branch(path)
    assert "BrushBranchLoader" in str(err.value) and "branch_name" in str(err.value)
    assert expected in str(err.value)


def test_loader_node_lists_and_loads_the_inpaint_folder(smoke_dir):
    name = sc.ensure_smoke_models(smoke_dir, ["brushnet_sd15"])["brushnet_sd15"]
    schema = BrushBranchLoader.define_schema()
    assert name in schema.inputs[0].options
    loaded = BrushBranchLoader.execute(name).result[0]
    assert loaded.kind.label == "BrushNet SD1.5"


# --------------------------------------------------------------------------------------------------------------------
# The pack's own files (tiny) and the Apply node
# --------------------------------------------------------------------------------------------------------------------

def own_file(tmp_path, family="sd15", kind="brushnet"):
    model = build_model(family)
    cfg = BranchConfig.tiny(family)
    branch = BrushBranch.from_unet(unet_state_dict_diffusers(model), cfg)
    path = tmp_path / f"own_{family}.safetensors"
    brush_files.save_branch_file(str(path), branch.state_dict(), kind, cfg.to_json())
    return str(path), branch, model


def test_own_file_round_trip(tmp_path):
    path, branch, _ = own_file(tmp_path)
    loaded = load_branch(path)
    assert (loaded.kind.kind, loaded.kind.public, loaded.kind.family) == ("brushnet", False, "sd15")
    assert loaded.patcher.model.config == branch.config
    for k, v in branch.state_dict().items():
        assert torch.equal(loaded.patcher.model.state_dict()[k], v), k


def test_own_file_of_unknown_recipe_and_own_pickles_are_refused(tmp_path):
    path, branch, _ = own_file(tmp_path, kind="no_such_recipe")
    with pytest.raises(NodeInputError, match="'no_such_recipe' branch"):
        load_branch(path)
    pt = tmp_path / "own.pt"
    torch.save(branch.state_dict(), pt)
    with pytest.raises(NodeInputError, match="not a BrushNet/PowerPaint branch"):
        load_branch(str(pt))


def vae():
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = dict(random_models.SD_VAE_DDCONFIG)   # ComfyUI reads the SD VAE with this fixed shape
    with torch.inference_mode():
        ae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
        random_models.randomise(ae, 0)
        v = comfy.sd.VAE(sd=ae.state_dict())
    return v


def test_apply_node_runs_and_refuses_a_branch_of_another_family(tmp_path):
    import comfy.sample

    path, _, model = own_file(tmp_path)
    loaded = load_branch(path)
    image = torch.rand(1, 64, 64, 3)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    ctx = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0))
    positive, negative = [[ctx, {}]], [[torch.zeros_like(ctx), {}]]
    v = vae()
    with torch.inference_mode():
        patched, pos, neg, latent = BrushBranchApply.execute(model, loaded, v, image, mask, positive, negative,
                                                             1.0, 0.0, 1.0).result
    assert latent["samples"].shape == (1, 4, 8, 8) and pos is positive
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    run = [comfy.sample.sample(m, noise, 2, 5.0, "euler", "normal", positive, negative, latent["samples"], seed=1,
                               disable_pbar=True) for m in (model, patched)]
    assert torch.equal(run[0], run[1])   # a freshly initialised branch adds nothing
    xl_path, _, _ = own_file(tmp_path, "sdxl")
    with pytest.raises(NodeInputError, match="made for SDXL models, but the model is SD1.x"):
        BrushBranchApply.execute(model, load_branch(xl_path), v, image, mask, positive, negative, 1.0, 0.0, 1.0)
    with pytest.raises(NodeInputError, match="end"):
        BrushBranchApply.execute(model, loaded, v, image, mask, positive, negative, 1.0, 0.6, 0.4)
