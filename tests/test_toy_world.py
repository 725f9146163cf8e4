"""The shapes world: generator, scorer, text/latent mappings, training, and the loader inside ComfyUI graphs."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from faithful_inpaint.kernels import toy_world as tw


# ---------------------------------------------------------------------------------------------------------------
# Generator


def test_same_seed_same_scene_and_case():
    a, b = tw.make_scene(11), tw.make_scene(11)
    assert np.array_equal(a.cells, b.cells) and a.caption == b.caption
    assert [o.box for o in a.objects] == [o.box for o in b.objects]
    assert not np.array_equal(a.cells, tw.make_scene(12).cells)
    for kind in tw.CASE_KINDS:
        c, d = tw.make_case(5, kind), tw.make_case(5, kind)
        assert np.array_equal(c.scene.cells, d.scene.cells) and np.array_equal(c.mask, d.mask)
        assert c.prompt == d.prompt


def test_scenes_and_cases_have_the_promised_content():
    for seed in range(40):
        scene = tw.make_scene(seed)
        assert 1 <= len(scene.objects) <= 3 and scene.cells.shape == (32, 32, 3)
        assert scene.caption == tw.join_captions(scene.local_captions)
        masks = [o.mask for o in scene.objects]
        assert sum(m.sum() for m in masks) == np.logical_or.reduce(masks).sum()   # objects never overlap
        assert scene.image().shape == (256, 256, 3)
    for seed in range(40):
        case = tw.make_case(seed, tw.CASE_KINDS[seed % 2])
        assert not any((o.mask & case.mask).any() for o in case.scene.objects)     # the hole is empty
        assert case.prompt == f"a {case.colour} {case.shape}"
        if case.kind == "background":
            assert not any((o.mask & tw.dilate(case.mask, 2)).any() for o in case.scene.objects)
        else:
            n = case.neighbour
            assert (n.mask & tw.dilate(case.mask, 2)).any()                           # right next to the hole
            assert n.colour != case.colour and n.shape != case.shape


def test_captions_tokenize_exactly_like_comfyui_sd1_tokenizer():
    import comfy.sd1_clip

    tokenizer = comfy.sd1_clip.SD1Tokenizer()
    captions = {tw.make_scene(s).caption for s in range(30)} | {"", "a yellow triangle", "an"}
    for caption in captions:
        ids = [t for t, _ in tokenizer.tokenize_with_weights(caption)["l"][0]]
        assert ids == tw.tokenize(caption), caption


# ---------------------------------------------------------------------------------------------------------------
# Scorer


def _scene_with(colour, shape, top=8, left=8, side=12, seed=0):
    cells = tw.background(np.random.default_rng(seed), 32)
    obj = tw.draw_object(cells, np.random.default_rng(seed + 1), colour, shape, top, left, side)
    return cells, obj


def test_scorer_on_constructed_images():
    region = np.zeros((32, 32), bool)
    region[6:22, 6:22] = True
    for shape in tw.SHAPES:
        cells, _ = _scene_with("red", shape)
        assert tw.score_region(cells, region, "red", shape) == {
            "present": True, "dominant": True, "blob_cells": tw.score_region(cells, region, "red")["blob_cells"],
            "shape": shape, "shape_ok": True}
        other = tw.score_region(cells, region, "blue", shape)
        assert not other["present"] and not other["dominant"] and not other["shape_ok"]
    # a square where a circle was asked for: present and dominant, wrong shape
    cells, _ = _scene_with("green", "square")
    r = tw.score_region(cells, region, "green", "circle")
    assert r["present"] and r["dominant"] and not r["shape_ok"] and r["shape"] == "square"
    # a large yellow blob and a smaller blue one: both present, only yellow dominant
    cells, _ = _scene_with("yellow", "square", top=6, left=6, side=12)
    tw.draw_object(cells, np.random.default_rng(3), "blue", "square", 18, 18, 4)
    assert tw.score_region(cells, region, "yellow")["dominant"]
    blue = tw.score_region(cells, region, "blue")
    assert blue["present"] and not blue["dominant"]
    # scattered red cells (many, but no connected blob) and a blob below the size threshold are not objects
    cells = tw.background(np.random.default_rng(4), 32)
    cells[6:22:2, 6:22:2] = tw.COLOURS["red"]
    assert not tw.score_region(cells, region, "red")["present"]
    cells[8:11, 8:11] = tw.COLOURS["red"]                     # 9 cells < MIN_BLOB_CELLS
    assert not tw.score_region(cells, region, "red")["present"]
    # an object outside the region does not count
    cells, _ = _scene_with("red", "circle", top=20, left=20, side=10)
    region_far = np.zeros((32, 32), bool)
    region_far[0:12, 0:12] = True
    assert not tw.score_region(cells, region_far, "red")["present"]


def test_scorer_is_right_on_clean_scenes_and_never_scores_noise():
    hits = total = 0
    for seed in range(60):
        scene = tw.make_scene(seed)
        for o in scene.objects:
            r = tw.score_region(scene.cells, tw.dilate(o.mask, 1), o.colour, o.shape)
            hits += r["present"] + r["dominant"] + r["shape_ok"]
            total += 3
    assert hits == total
    rng = np.random.default_rng(0)
    for i in range(100):
        case = tw.make_case(i, tw.CASE_KINDS[i % 2])
        uniform = rng.uniform(0, 1, (32, 32, 3)).astype(np.float32)
        gaussian = np.clip(0.5 + 0.5 * rng.normal(size=(32, 32, 3)), 0, 1).astype(np.float32)
        for noise in (uniform, gaussian):
            for colour in tw.COLOUR_NAMES:
                assert not tw.score_region(noise, case.mask, colour)["present"]
        assert not tw.score_case(case.scene.cells, case)["present"]             # the empty hole itself


def test_preservation_measures_only_outside_the_mask():
    case = tw.make_case(2, "background")
    result = case.scene.cells.copy()
    result[case.mask] = 1.0                                                   # anything inside: not counted
    assert tw.preservation(result, case.scene.cells, case.mask) == {"mae": 0.0, "changed": 0.0}
    keep = ~tw.dilate(case.mask, 1)
    changed = np.zeros_like(keep)
    changed[np.nonzero(keep)[0][:10], np.nonzero(keep)[1][:10]] = True
    result[changed] = 1.0 - np.round(case.scene.cells[changed])              # every channel moves by >= 0.4
    p = tw.preservation(result, case.scene.cells, case.mask)
    assert p["changed"] == pytest.approx(10 / keep.sum())
    assert p["mae"] == pytest.approx(np.abs(result - case.scene.cells)[keep].mean())


# ---------------------------------------------------------------------------------------------------------------
# Latent mapping and the VAE


def test_latent_mapping_is_exact():
    cells = torch.from_numpy(tw.make_scene(1).cells).permute(2, 0, 1)[None]
    assert torch.allclose(tw.latent_to_cells(tw.cells_to_latent(cells)), cells, atol=1e-6)


def test_vae_computes_the_toy_mapping_exactly():
    from faithful_inpaint.patching.toy_world import load_vae

    scene = tw.make_scene(3)
    with torch.inference_mode():
        vae = load_vae()
        latent = vae.encode(torch.from_numpy(scene.image())[None])
        z = torch.randn(1, 4, 32, 32) * 3
        decoded = vae.decode(z)[0]
    cells = torch.from_numpy(scene.cells).permute(2, 0, 1)[None]
    assert torch.allclose(latent, tw.cells_to_latent(cells) / tw.SD15_LATENT_SCALE, atol=1e-4)
    expected = tw.render(tw.latent_to_cells(z * tw.SD15_LATENT_SCALE)[0].permute(1, 2, 0).numpy())
    assert np.allclose(decoded.numpy(), expected, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Training


def test_short_training_run_lowers_the_loss(tmp_path):
    from faithful_inpaint.training.core import CoreConfig, train
    from faithful_inpaint.training.toy_world import ToyWorldTask, collate

    # the inpainting variant's code path on a 16 x 16 world with a smaller UNet (same block layout), for speed
    task = ToyWorldTask("inpaint", seed=0, size=16, unet_overrides={
        "channel_mult": [1, 2], "num_res_blocks": [1, 1], "transformer_depth": [0, 1],
        "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": 1})
    batch = collate([task.dataset()[i] for i in range(8)])

    def held_out_loss():
        torch.manual_seed(123)                                  # same noise and timesteps every time
        with torch.no_grad():
            return float(task.loss(task.modules, batch)["loss"])

    before = held_out_loss()
    config = CoreConfig(output_dir=str(tmp_path / "run"), max_steps=15, batch_size=4, learning_rate=2e-3,
                        lr_warmup_steps=5, num_workers=0, checkpoint_every=0, log_every=25, mixed_precision="no")
    result = train(config, task)
    after = held_out_loss()
    assert before == pytest.approx(1.0, abs=0.2)                # zero-initialised output: eps_hat = 0
    assert after < 0.8 * before
    assert result.export.is_file()


# ---------------------------------------------------------------------------------------------------------------
# The loader in ComfyUI graphs


def _checkpoint(name: str, variant: str) -> str:
    """The shipped file when it exists; otherwise a freshly initialised one in ComfyUI's models/toy_world/."""
    import folder_paths
    from faithful_inpaint.nodes.toy_world import FOLDER, PACK_TOY_DIR
    from faithful_inpaint.training.toy_world import fresh_checkpoint

    if not (PACK_TOY_DIR / name).is_file():
        folder = Path(folder_paths.models_dir) / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / name).is_file():
            fresh_checkpoint(folder / name, variant)
    return name


def _graph(checkpoint: str, inpaint_model: bool, seed: int = 4) -> dict:
    g = {
        "1": {"class_type": "ToyWorldLoader", "inputs": {"checkpoint": checkpoint}},
        "2": {"class_type": "ToyWorldScene", "inputs": {"seed": seed, "kind": "nearby"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ["2", 2]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "toy_world_test"}},
    }
    sampler = {"model": ["1", 0], "seed": 1, "steps": 3, "cfg": 4.0, "sampler_name": "euler",
               "scheduler": "normal", "denoise": 1.0}
    if inpaint_model:
        g["5"] = {"class_type": "InpaintModelConditioning",
                  "inputs": {"positive": ["3", 0], "negative": ["4", 0], "vae": ["1", 2], "pixels": ["2", 0],
                             "mask": ["2", 1], "noise_mask": True}}
        g["7"] = {"class_type": "KSampler", "inputs": {**sampler, "positive": ["5", 0], "negative": ["5", 1],
                                                        "latent_image": ["5", 2]}}
    else:
        g["5"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}}
        g["6"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["5", 0], "mask": ["2", 1]}}
        g["7"] = {"class_type": "KSampler", "inputs": {**sampler, "positive": ["3", 0], "negative": ["4", 0],
                                                        "latent_image": ["6", 0]}}
    return g


def test_loader_reproduces_the_trained_networks(tmp_path):
    """What the loader builds computes what training trained (same heads, same weights, same text states)."""
    from faithful_inpaint.patching.toy_world import load_toy_world
    from faithful_inpaint.training.toy_world import fresh_checkpoint, load_checkpoint

    path = fresh_checkpoint(tmp_path / "toy_world_inpaint.safetensors", "inpaint", seed=3)
    unet, text, _ = load_checkpoint(str(path))
    torch.nn.init.normal_(unet.out[-1].weight, std=0.1)             # a non-zero output layer for the comparison
    with torch.inference_mode():
        model, clip, _, meta = load_toy_world(str(path))
        model.model.diffusion_model.out[-1].weight.copy_(unet.out[-1].weight)
        tokens = clip.tokenize("a red circle and a blue square")
        states = clip.encode_from_tokens(tokens)
        ids = torch.tensor([tw.tokenize("a red circle and a blue square")])
        assert torch.allclose(states, text(ids)[0], atol=1e-5)
        x, t = torch.randn(2, 9, 32, 32), torch.tensor([999.0, 10.0])
        ours = model.model.diffusion_model(x, t, context=states.repeat(2, 1, 1))
        assert torch.allclose(ours, unet(x, t, context=states.repeat(2, 1, 1)), atol=1e-4)
    assert meta["unet_config"]["num_heads"] == 4 and model.model.model_config.unet_config["num_heads"] == 4


@pytest.mark.parametrize("variant", ["plain", "inpaint"])
def test_loader_runs_with_standard_nodes_through_the_execution_engine(variant):
    from faithful_inpaint.headless.execute import run_prompt

    name = "toy_world.safetensors" if variant == "plain" else "toy_world_inpaint.safetensors"
    result = run_prompt(_graph(_checkpoint(name, variant), inpaint_model=variant == "inpaint"))
    (_, _, path), = result.image_files()
    out = np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255
    case = tw.make_case(4, "nearby")
    assert out.shape == (256, 256, 3)
    keep = tw.render(~tw.dilate(case.mask, 1)[..., None], tw.CELL_PIXELS)[..., 0]
    assert np.abs(out[keep] - case.scene.image()[keep]).max() <= 1 / 255 + 1e-6   # the known region is kept
    hole = case.mask_image() > 0.5
    assert np.abs(out[hole] - case.scene.image()[hole]).max() > 0.05                # the hole was regenerated
    cells = tw.to_cells(out)
    assert np.allclose(tw.render(cells), out, atol=1e-6)                            # the VAE decodes 8x8 blocks


def test_loader_names_the_training_command_when_the_file_is_missing():
    from faithful_inpaint.nodes.toy_world import ToyWorldLoader
    from faithful_inpaint.patching.errors import NodeInputError

    with pytest.raises(NodeInputError, match=r"ToyWorldLoader.*checkpoint.*python -m "
                                             r"faithful_inpaint.training.toy_world --variant inpaint"):
        ToyWorldLoader.execute("missing_inpaint.safetensors")
