"""The toy world's second recipe (issue 16): Stable-Inpainting-style masks and captions, structured backgrounds,
prompt-neglect cases and their failure kinds, the extended text table, and a short training run."""
import json

import numpy as np
import pytest
import torch

from faithful_inpaint.kernels import toy_world as tw
from training_drivers import assert_loss_falls

pytestmark = pytest.mark.usefixtures("one_thread")   # the threads test sets its own count and restores it
DRAWS = 400


def _draws(n=DRAWS):
    """(scene, mask, mask kind, caption) as the sd-inpaint recipe draws them for items 0..n-1."""
    from faithful_inpaint.training.toy_world import ToyWorldData

    data = ToyWorldData("inpaint", recipe="sd-inpaint")
    out = []
    for seed in range(n):
        scene = tw.make_scene(seed, backgrounds=tw.BACKGROUND_KINDS)
        rng = np.random.default_rng([seed, 2])
        mask, kind = tw.random_mask(rng)
        caption = tw.incomplete_caption(rng, scene)
        item = data[seed]
        assert torch.equal(item["mask"][0], torch.from_numpy(mask).float())    # the dataset draws exactly these
        out.append((scene, mask, kind, caption))
    return out


@pytest.fixture(scope="module")
def draws():
    return _draws()


# ---------------------------------------------------------------------------------------------------------------
# Generator


def test_new_options_are_deterministic():
    from faithful_inpaint.training.toy_world import ToyWorldData

    for seed in (0, 7, 123):
        a = tw.make_scene(seed, backgrounds=tw.BACKGROUND_KINDS)
        b = tw.make_scene(seed, backgrounds=tw.BACKGROUND_KINDS)
        assert np.array_equal(a.cells, b.cells) and a.background == b.background and a.caption == b.caption
        m1, k1 = tw.random_mask(np.random.default_rng(seed))
        m2, k2 = tw.random_mask(np.random.default_rng(seed))
        assert np.array_equal(m1, m2) and k1 == k2
        c1 = tw.incomplete_caption(np.random.default_rng(seed), a)
        assert c1 == tw.incomplete_caption(np.random.default_rng(seed), b)
        for kind in tw.CASE_KINDS:
            x, y = tw.make_neglect_case(seed, kind), tw.make_neglect_case(seed, kind)
            assert np.array_equal(x.scene.cells, y.scene.cells) and np.array_equal(x.mask, y.mask)
            assert x.prompt == y.prompt
        i, j = (ToyWorldData(v, recipe="sd-inpaint")[seed] for v in ("inpaint", "inpaint"))
        assert all(torch.equal(i[k], j[k]) for k in i)
    assert not np.array_equal(tw.make_scene(1, backgrounds=tw.BACKGROUND_KINDS).cells,
                              tw.make_scene(2, backgrounds=tw.BACKGROUND_KINDS).cells)
    # the first world's scenes do not depend on the option's existence
    assert tw.make_scene(5).background == "plain"


def test_structured_backgrounds_have_structure_and_no_palette_colour():
    kinds = [tw.make_scene(s, backgrounds=tw.BACKGROUND_KINDS).background for s in range(200)]
    assert set(kinds) == set(tw.BACKGROUND_KINDS)
    rng = np.random.default_rng(0)
    for kind in tw.STRUCTURED_BACKGROUNDS:
        for _ in range(30):
            cells = tw.structured_background(rng, 32, kind)
            assert cells.shape == (32, 32, 3) and cells.dtype == np.float32
            labels = tw.colour_labels(cells)
            assert (labels < 0).all()                               # never a palette colour: never an "object"
            grey = cells.mean(-1)
            assert grey.std() > 0.04                                # two tones, far above the 0.03 cell noise
    # stripes vary across the stripes, not along them: along the pattern's own axis the tone is constant
    stripes = tw.structured_background(np.random.default_rng(3), 32, "striped").mean(-1)
    assert max(stripes.std(0).max(), stripes.std(1).max()) > 0.04


# ---------------------------------------------------------------------------------------------------------------
# Masks and captions: the stated statistics on 400 draws


def test_mask_sampler_statistics(draws):
    kinds = [k for _, _, k, _ in draws]
    shares = {k: kinds.count(k) / len(kinds) for k in tw.MASK_KINDS}
    for kind, share in zip(tw.MASK_KINDS, tw.MASK_SHARES):
        assert shares[kind] == pytest.approx(share, abs=0.07), shares
    partial = [any(0 < (o.mask & m).sum() < o.mask.sum() for o in s.objects) for s, m, _, _ in draws]
    assert np.mean(partial) > 0.5                                   # measured 0.695: masks often cut objects
    boxes = {o.box for s, _, _, _ in draws for o in s.objects}
    aligned = 0
    for scene, mask, kind, _ in draws:
        ys, xs = np.nonzero(mask)
        assert len(ys) > 0
        aligned += any((ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == o.box for o in scene.objects)
        if kind == "full":
            assert mask.all()
        elif kind == "box":
            assert mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
    assert aligned <= 2 and len(boxes) > 100                        # nothing follows the objects' boxes
    strokes = [m for _, m, k, _ in draws if k == "stroke"]
    fill = [m.sum() / ((np.ptp(np.nonzero(m)[0]) + 1) * (np.ptp(np.nonzero(m)[1]) + 1)) for m in strokes]
    assert np.median(fill) < 0.7                                    # strokes are not boxes


def test_caption_sampler_statistics(draws):
    named = total = with_background = named_outside = 0
    for scene, mask, _, caption in draws:
        tw.tokenize(caption)                                        # every word is the world's
        with_background += "background" in caption
        if caption and "background" in caption:
            assert caption.endswith(f"a {scene.background} background")
        local = scene.local_captions
        if len(set(local)) < len(local):
            continue                                                # duplicates: count only unambiguous scenes
        for o in scene.objects:
            total += 1
            if o.caption in caption:
                named += 1
                named_outside += not (o.mask & mask).any()
    assert named / total == pytest.approx(tw.NAME_PROB, abs=0.05)
    assert with_background / len(draws) == pytest.approx(tw.BACKGROUND_WORD_PROB, abs=0.06)
    # a named object is often wholly outside the mask: being named says nothing about being in the hole
    assert 0.2 < named_outside / named < 0.8


def test_background_captions_tokenize_like_comfyui_and_fit_the_extended_table(draws):
    import comfy.sd1_clip

    tokenizer = comfy.sd1_clip.SD1Tokenizer()
    captions = {c for _, _, _, c in draws[:60]} | {f"a {k} background" for k in tw.BACKGROUND_KINDS}
    for caption in captions:
        ids = [t for t, _ in tokenizer.tokenize_with_weights(caption)["l"][0]]
        assert ids == tw.tokenize(caption), caption
    shapes, extended = tw.ToyTextEncoder(), tw.ToyTextEncoder(vocabulary="shapes+backgrounds")
    assert shapes.token_embedding.num_embeddings == len(tw.VOCABULARY) + 1 and "vocabulary" not in shapes.config
    assert extended.config["vocabulary"] == "shapes+backgrounds"
    ids = torch.tensor([tw.tokenize("a red circle on a striped background")])
    rows_old, rows_new = shapes.rows(ids), extended.rows(ids)
    words = ids[0] != tw.END_TOKEN
    # the first world's words keep their rows; background words are "unknown" in the old table, own rows in the new
    background = torch.isin(ids, torch.tensor(list(tw.BACKGROUND_WORD_TOKENS.values())))
    assert torch.equal(rows_old[~background], rows_new[~background])
    assert (rows_old[background] == len(tw.VOCABULARY)).all()
    assert (rows_new[background & words] >= len(tw.VOCABULARY)).all()
    assert (rows_new[background] < len(tw.VOCABULARIES["shapes+backgrounds"])).all()


# ---------------------------------------------------------------------------------------------------------------
# Prompt-neglect cases and failure kinds


def test_neglect_cases_prompt_an_absent_object():
    for seed in range(40):
        case = tw.make_neglect_case(seed, tw.CASE_KINDS[seed % 2])
        assert case.scene.background in tw.STRUCTURED_BACKGROUNDS
        assert (case.colour, case.shape) not in {(o.colour, o.shape) for o in case.scene.objects}
        assert case.prompt == f"a {case.colour} {case.shape}"
        if case.kind == "background":
            assert not any((o.mask & tw.dilate(case.mask, 2)).any() for o in case.scene.objects)
        else:
            n = case.neighbour
            assert 0 < (n.mask & case.mask).sum() < n.mask.sum()    # part of the neighbour is masked
            assert n.colour != case.colour and n.shape != case.shape
            others = [o for o in case.scene.objects if o is not n]
            assert not any((o.mask & case.mask).any() for o in others)


def _fill(cells, region, colour):
    out = cells.copy()
    out[region] = tw.COLOURS[colour]
    return out


def test_failure_kinds_on_constructed_results():
    kinds = []
    for seed in range(20):
        case = tw.make_neglect_case(seed, tw.CASE_KINDS[seed % 2])
        original = case.scene.cells
        # the texture left in the hole (the original, the neighbour's own masked part included): background
        assert tw.failure_kind(original, case) == "background"
        # the prompted object painted: no failure
        t, l = np.nonzero(case.mask)[0].min(), np.nonzero(case.mask)[1].min()
        painted = original.copy()
        tw.draw_object(painted, np.random.default_rng(0), case.colour, case.shape, t + 1, l + 1, 10)
        assert tw.failure_kind(painted, case) is None
        # a third colour fills the hole: other
        third = next(c for c in tw.COLOUR_NAMES if c != case.colour and
                     (case.neighbour is None or c != case.neighbour.colour))
        assert tw.failure_kind(_fill(original, case.mask, third), case) == "other"
        if case.neighbour is not None:
            # the neighbour's colour grows over the whole hole: the neighbour continues
            grown = _fill(original, case.mask, case.neighbour.colour)
            assert tw.failure_kind(grown, case) == "neighbour"
            kinds.append(tw.failure_kind(grown, case))
        kinds += [tw.failure_kind(original, case), None]
    assert tw.count_failures(kinds) == {"background": 20, "neighbour": 10, "other": 0}


# ---------------------------------------------------------------------------------------------------------------
# Training


def test_recipe_metadata_and_capacity(tmp_path):
    from safetensors import safe_open

    from faithful_inpaint.training.toy_world import SD_UNET_OVERRIDES, ToyWorldTask, load_checkpoint

    task = ToyWorldTask("inpaint", seed=3, command="python -m training.toy_world --recipe sd-inpaint",
                        recipe="sd-inpaint")
    assert task.name == "toy_world_sd_inpaint"
    assert task.unet_config["num_heads"] == SD_UNET_OVERRIDES["num_heads"]
    path = task.export(task.modules, tmp_path / "f.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()[tw.META_KEY])
    assert meta["training"] == {"seed": 3, "command": "python -m training.toy_world --recipe sd-inpaint",
                                "recipe": "sd-inpaint"}
    assert meta["text_config"]["vocabulary"] == "shapes+backgrounds"
    unet, text, variant = load_checkpoint(str(path))
    assert variant == "inpaint" and text.token_embedding.num_embeddings == len(tw.VOCABULARIES[
        "shapes+backgrounds"]) + 1
    # ToyWorldLoader's CLIP (ComfyUI's SD1 tokenizer) gives the trained encoder's states for a background caption
    from faithful_inpaint.patching.toy_world import load_toy_world

    caption = "a red circle on a striped background"
    with torch.inference_mode():
        _, clip, _, _ = load_toy_world(str(path))
        states = clip.encode_from_tokens(clip.tokenize(caption))
        assert torch.allclose(states, text(torch.tensor([tw.tokenize(caption)]))[0], atol=1e-5)
    with pytest.raises(ValueError, match="recipe"):
        ToyWorldTask("inpaint", seed=0, recipe="nope")


@pytest.mark.parametrize("threads", [1, 2])
def test_short_sd_inpaint_training_lowers_the_held_out_loss(threads):
    from faithful_inpaint.training.toy_world import ToyWorldTask, collate

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # the recipe's code path on a 16 x 16 world with a smaller UNet (same block layout, the recipe's 8 heads)
        task = ToyWorldTask("inpaint", seed=0, size=16, min_snr_gamma=5.0, recipe="sd-inpaint", unet_overrides={
            "channel_mult": [1, 2], "num_res_blocks": [1, 1], "transformer_depth": [0, 1],
            "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": 1})
        data = task.dataset()
        held_out = collate([data[100_000 + i] for i in range(8)])       # scenes never trained on

        def held_out_loss():
            torch.manual_seed(123)                                       # same noise and timesteps every time
            with torch.no_grad():
                return float(task.loss(task.modules, held_out)["loss"])

        optimiser = torch.optim.AdamW(task.modules.parameters(), lr=2e-3)
        torch.manual_seed(0)
        losses = [held_out_loss()]
        for step in range(12):
            batch = collate([data[8 * step + i] for i in range(8)])
            task.loss(task.modules, batch)["loss"].backward()
            optimiser.step()
            optimiser.zero_grad()
            if step % 3 == 2:
                losses.append(held_out_loss())
    finally:
        torch.set_num_threads(before)
    assert_loss_falls(losses, 0.7, last=3)          # held-out losses after 0, 3, 6, 9, 12 steps


# ---------------------------------------------------------------------------------------------------------------
# The harness: attention report and failure counts for a checkpoint of the new recipe


def test_attention_report_command_on_an_sd_inpaint_checkpoint(tmp_path):
    """benchmarks/toy_evidence.py --attention-only loads the named 9-channel file through ToyWorldLoader (background
    words reach its extended table) and reports both attention levels' entropies (here of an untrained model)."""
    from faithful_inpaint.benchmarks import toy_evidence as ev
    from faithful_inpaint.training.toy_world import fresh_checkpoint

    fresh_checkpoint(tmp_path / "toy_world_sd_inpaint.safetensors", "inpaint", seed=1, recipe="sd-inpaint")
    out = tmp_path / "out"
    assert ev.main(["--attention-only", "--toy-dir", str(tmp_path), "--world", "neglect", "--attention-cases", "1",
                    "--steps", "1", "--out", str(out)]) == 0
    lines = (out / "attention.md").read_text().splitlines()
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| 16x16") or line.startswith("| 8x8")]
    assert [r[0].strip() for r in rows] == ["16x16", "8x8"]
    for r in rows:
        average, per_head = float(r[2]), float(r[3])
        assert 0 < per_head <= average <= 1                # averaging heads never sharpens (entropy is concave)



def test_toy_data_of_the_neglect_world_for_the_retrained_branch_and_adapter():
    """make_toy_data --world neglect: the same sample format as the first world's, drawn from the prompt-neglect world
    (every background kind, incomplete global captions), deterministic in the seed; the first world's samples are
    the draws they always were (the shipped add-ons' data)."""
    from faithful_inpaint.training.make_toy_data import make_sample

    def draws(world, n, seed=0):
        rng = np.random.default_rng(seed)
        return [make_sample(rng, world=world) for _ in range(n)]

    def same(a, b):
        return all(np.array_equal(np.asarray(x[0]), np.asarray(y[0]))
                   and np.array_equal(np.asarray(x[1]), np.asarray(y[1])) and x[2:] == y[2:] for x, y in zip(a, b))

    neglect = draws("neglect", 60)
    assert same(neglect, draws("neglect", 60)) and not same(neglect, draws("neglect", 60, seed=1))
    # the first world: scene seed, then the object, from one generator; the global caption names every object
    rng = np.random.default_rng(0)
    scene = tw.make_scene(int(rng.integers(2**31)))
    first = draws("objects", 1)[0]
    assert np.array_equal(np.asarray(first[0]), (scene.image() * 255).round().astype(np.uint8))
    assert first[3] == scene.caption

    kinds, unnamed = set(), 0
    for image, mask, local, caption in neglect:
        cells = tw.to_cells(np.asarray(image, np.float32) / 255)
        inside = tw.to_cells(np.asarray(mask, np.float32)[..., None] / 255)[..., 0] > 0.5
        colour, shape = local.split()[1:]
        assert shape in tw.SHAPES and inside.any()
        mean = cells[inside].mean(0)
        assert tw.COLOUR_NAMES[np.linalg.norm(tw.PALETTE - mean, axis=1).argmin()] == colour
        unnamed += local not in caption
        kinds.update(w for w in tw.BACKGROUND_KINDS if f"{w} background" in caption)
    assert 0.2 < unnamed / len(neglect) < 0.7          # the object is left out of the caption with 1 - NAME_PROB
    assert set(tw.STRUCTURED_BACKGROUNDS) <= kinds     # background words of structured kinds appear
    with pytest.raises(ValueError, match="unknown world"):
        make_sample(np.random.default_rng(0), world="moon")
