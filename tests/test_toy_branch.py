"""A BrushNet branch trained beside the toy model: the toy base in FrozenBase, the toy-world shards, a few training
steps, and the exported file in BrushBranchLoader / BrushBranchApply on ToyWorldLoader's MODEL."""
import math
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from faithful_inpaint.kernels import toy_world as tw
from faithful_inpaint.training import train_branch
from faithful_inpaint.training.base import FrozenBase, is_toy_checkpoint
from faithful_inpaint.training.data import MaskPolicy, ShardDataset
from faithful_inpaint.training.make_toy_data import write_dataset

TOY_FILE = "toy_base.safetensors"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """A toy checkpoint as training/toy_world.py writes it, in a folder ToyWorldLoader reads. Untrained, but with
    a random last convolution: a fresh file's is zero (SD's initialisation), which would make the UNet's output,
    and so the branch's gradients, zero."""
    import folder_paths
    from faithful_inpaint.nodes.toy_world import FOLDER
    from faithful_inpaint.training.toy_world import TEXT_CONFIG, build_unet, save_checkpoint, unet_config

    folder = tmp_path_factory.mktemp("toy_world")
    torch.manual_seed(0)
    unet = build_unet(unet_config("plain"))
    torch.nn.Conv2d.reset_parameters(unet.out[-1])
    save_checkpoint(unet, tw.ToyTextEncoder(**TEXT_CONFIG), "plain", unet_config("plain"), folder / TOY_FILE,
                    {"seed": 0, "command": "test"})
    folder_paths.add_model_folder_path(FOLDER, str(folder), is_default=True)
    return folder


@pytest.fixture(scope="module")
def branch_dir(tmp_path_factory):
    import folder_paths
    from faithful_inpaint.nodes.brush_branch import FOLDER

    folder = tmp_path_factory.mktemp("inpaint")
    folder_paths.add_model_folder_path(FOLDER, str(folder), is_default=True)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("toy_shapes"), count=8, per_shard=4, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# The toy base in FrozenBase


def test_toy_checkpoint_loads_in_frozen_base(toy_dir, tmp_path):
    from faithful_inpaint.patching.toy_world import load_toy_world

    path = str(toy_dir / TOY_FILE)
    assert is_toy_checkpoint(path)
    other = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    assert not is_toy_checkpoint(str(other))

    base = FrozenBase(path, torch.device("cpu"))
    model, clip, vae, _ = load_toy_world(path)
    assert base.unet_config["in_channels"] == 4 and base.prediction == "eps" and not base.is_sdxl
    torch.testing.assert_close(base.alphas_cumprod, tw.sd_alphas_cumprod().float(), rtol=1e-5, atol=1e-6)

    text = base.encode_text(["a red circle", "a blue square and a green triangle", ""])
    assert text.context.shape == (3, 77, 768)
    assert text.actual_tokens.sum(1).tolist() == [3, 7, 0]
    tokens = clip.tokenize("a red circle")
    torch.testing.assert_close(text.context[0], clip.encode_from_tokens(tokens)[0].float())

    # The toy VAE's mapping, computed directly, is what the VAE itself computes (to float precision).
    scene = torch.from_numpy(np.stack([tw.make_scene(s).image() for s in range(2)]))       # [2, 256, 256, 3]
    scene[0, 100:140, 90:150] = 0.0                                                    # a masked image too
    latents = base.encode_images(scene.permute(0, 3, 1, 2))
    assert latents.shape == (2, 4, 32, 32)
    torch.testing.assert_close(latents, base.latent_format.process_in(vae.encode(scene)), atol=1e-4, rtol=0)
    torch.testing.assert_close(base.vae_encode(scene.permute(0, 3, 1, 2)), vae.encode(scene).float(), atol=1e-3,
                               rtol=0)                                        # the VAE's own scale (1 / 0.18215)
    decoded = base.decode_latents(latents)
    torch.testing.assert_close(decoded, vae.decode(base.latent_format.process_out(latents)).permute(0, 3, 1, 2),
                               atol=1e-4, rtol=0)
    cells = tw.to_cells(scene[1].numpy())
    torch.testing.assert_close(decoded[1].permute(1, 2, 0).numpy(), tw.render(cells), atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="inpainting checkpoint is needed"):
        FrozenBase(path, torch.device("cpu"), inpaint=True)


# ---------------------------------------------------------------------------------------------------------------
# Training data


def test_toy_data_is_deterministic_and_describes_its_objects(tmp_path):
    shards = lambda folder: [p.read_bytes() for p in sorted(folder.glob("*.tar"))]  # noqa: E731
    a = shards(write_dataset(tmp_path / "a", count=6, per_shard=4, seed=3))
    assert len(a) == 2 and a == shards(write_dataset(tmp_path / "b", count=6, per_shard=4, seed=3))
    assert a != shards(write_dataset(tmp_path / "c", count=6, per_shard=4, seed=4))

    # object masks with their local captions, no augmentation: the mask covers an object of the caption's colour
    policy = MaskPolicy(object_prob=1.0, morph_prob=0.0, caption_dropout=0.0, object_kinds=("segmentation",))
    data = ShardDataset(tmp_path / "a", 256, policy)
    for i in range(len(data)):
        item = data[i]
        assert item["image"].shape == (3, 256, 256) and item["object"]
        colour, shape = re.fullmatch(r"a (\w+) (\w+)", item["caption"]).groups()
        assert shape in tw.SHAPES and item["caption"] in item["global_caption"]
        inside = item["image"][:, item["mask"][0] > 0.5].mean(1).numpy()
        assert tw.COLOUR_NAMES[np.linalg.norm(tw.PALETTE - inside, axis=1).argmin()] == colour


# ---------------------------------------------------------------------------------------------------------------
# Training, export, the nodes


def train_args(data_dir, out, toy_dir, *extra):
    return ["--recipe", "brushnet", "--base", str(toy_dir / TOY_FILE), "--data", str(data_dir),
            "--output-dir", str(out), "--resolution", "256", "--batch-size", "2", "--num-workers", "0",
            "--lr", "1e-3", "--lr-warmup-steps", "0", "--log-every", "1", "--checkpoint-every", "0", *extra]


def sample_toy(model, clip, vae, branch=None, strength=1.0, steps=3, seed=1):
    """Inpaint a toy case with ComfyUI's sample_custom (BrushNet's setting: denoise 1, the branch holds the known
    region), with or without the branch applied through BrushBranchApply."""
    import comfy.sample
    import comfy.samplers
    from faithful_inpaint.nodes.brush_branch import BrushBranchApply

    case = tw.make_case(0, "nearby")
    image = torch.from_numpy(np.ascontiguousarray(case.scene.image()))[None]
    mask = torch.from_numpy(case.mask_image())[None]
    positive = [[clip.encode_from_tokens(clip.tokenize(case.prompt)), {}]]
    negative = [[clip.encode_from_tokens(clip.tokenize("")), {}]]
    latent = {"samples": vae.encode(image)}
    if branch is not None:
        model, positive, negative, latent = BrushBranchApply.execute(model, branch, vae, image, mask, positive,
                                                                     negative, strength, 0.0, 1.0).args
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    noise = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample_custom(model, noise, 4.0, comfy.samplers.sampler_object("euler"), sigmas, positive,
                                      negative, latent["samples"], disable_pbar=True, seed=seed)


def test_a_few_steps_train_and_export_a_branch_the_nodes_apply_to_the_toy_model(toy_dir, branch_dir, data_dir):
    from faithful_inpaint.nodes.brush_branch import BrushBranchLoader
    from faithful_inpaint.nodes.toy_world import ToyWorldLoader

    result = train_branch.main(train_args(data_dir, branch_dir / "run", toy_dir, "--max-steps", "3",
                                          "--num-validation", "1", "--validation-steps", "2"))
    assert [s for s, _ in result.losses] == [1, 2, 3]
    assert all(math.isfinite(v) for _, losses in result.losses for v in losses.values())
    assert (branch_dir / "run" / "validation" / "step-00000003.png").is_file()
    trained = load_file(result.export)
    assert all(trained[k].abs().sum() > 0 for k in trained if k.startswith("brushnet_"))     # gradients arrived
    name = "toy_brushnet.safetensors"
    result.export.rename(branch_dir / name)

    branch = BrushBranchLoader.execute(name).result[0]
    assert branch.kind.kind == "brushnet" and not branch.kind.public
    with torch.inference_mode():
        model, clip, vae = ToyWorldLoader.execute(checkpoint=TOY_FILE).result
        with_branch = sample_toy(model, clip, vae, branch)
        without = sample_toy(model, clip, vae, branch, strength=0.0)
    assert with_branch.shape == (1, 4, 32, 32) and torch.isfinite(with_branch).all()
    assert (with_branch - without).abs().max() > 1e-3


def test_a_zero_initialised_branch_leaves_the_toy_model_unchanged(toy_dir, branch_dir):
    from faithful_inpaint.nodes.brush_branch import BrushBranchLoader
    from faithful_inpaint.nodes.toy_world import ToyWorldLoader
    from faithful_inpaint.training.recipes import BRANCHES

    base = FrozenBase(str(toy_dir / TOY_FILE), torch.device("cpu"))
    name = "toy_brushnet_zero.safetensors"
    train_branch.export_branch(BRANCHES["brushnet"].build(base, {}), "brushnet", branch_dir / name, "brushnet",
                               {"noise": 1.0})
    branch = BrushBranchLoader.execute(name).result[0]
    with torch.inference_mode():
        model, clip, vae = ToyWorldLoader.execute(checkpoint=TOY_FILE).result
        plain = sample_toy(model, clip, vae)
        assert torch.equal(sample_toy(model, clip, vae, branch), plain)
