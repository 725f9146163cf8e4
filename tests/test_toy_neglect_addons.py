"""The add-ons retrained on the prompt-neglect world (issue 16): the BrushNet branch on toy_world_sd, the LAR-Gen
image-prompt adapter and RefineNet on toy_world_sd_inpaint. The shipped files are small, were trained on that
world's bases, and reproduce cases of the harness's 400-case table (docs/toy-world.md) through the pack's nodes."""
import json

import pytest
import torch
from safetensors import safe_open

from faithful_inpaint.benchmarks import toy_evidence as ev
from faithful_inpaint.kernels import toy_world as tw
from helpers import toy_path

pytestmark = pytest.mark.usefixtures("one_thread")

NEGLECT = ev.WORLD_FILES["neglect"]
ADDONS = ("branch", "adapter", "refinenet")


def test_the_neglect_world_ships_its_own_addons_trained_on_its_bases():
    assert {NEGLECT[r] for r in ADDONS}.isdisjoint({ev.TOY_FILES[r] for r in ADDONS})   # not the first world's
    for name in NEGLECT.values():
        assert toy_path(name).stat().st_size <= 10_000_000, name                           # the 10 MB
    for role in ("adapter", "refinenet"):
        with safe_open(str(toy_path(NEGLECT[role])), "pt") as f:
            recipe = json.loads(f.metadata()["faithful_inpaint.recipe"])
        assert recipe["recipe"] == "lar_gen" and recipe["base"] == f"toy/{NEGLECT['inpaint']}"
    # the branch copies its base's UNet: the same levels, widths and text width as toy_world_sd's
    with safe_open(str(toy_path(NEGLECT["branch"])), "pt") as f:
        config = json.loads(f.metadata()["faithful_inpaint.config"])
    with safe_open(str(toy_path(NEGLECT["plain"])), "pt") as f:
        base = json.loads(f.metadata()[tw.META_KEY])["unet_config"]
    for key in ("model_channels", "channel_mult", "context_dim", "num_res_blocks"):
        assert config[key] == base[key], key


@pytest.fixture(scope="module")
def models():
    from faithful_inpaint.nodes.toy_world import PACK_TOY_DIR

    ev.register_toy_folders(PACK_TOY_DIR)
    with torch.inference_mode():
        return ev.ToyModels.load({"inpaint", "plain"}, NEGLECT)


# (entry, case index in make_neglect_cases(400, DEFAULT_SEED)): a case the entry's row in docs/toy-world.md counts as
# painting the prompted colour where its baseline does not
FIXED_CASES = {"BrushNet branch (toy-trained)": 39,           # nearby: the neighbour continued into the hole
               "text + image prompt (beta 0.3)": 10}          # background: the texture filled the hole


@pytest.mark.parametrize("entry", list(FIXED_CASES))
def test_retrained_addons_reproduce_a_case_of_the_table(models, entry):
    mechanism = next(m for m in ev.MECHANISMS if m.name == entry)
    baseline = next(m for m in ev.MECHANISMS if m.name == mechanism.baseline)
    index = FIXED_CASES[entry]
    case = tw.make_neglect_case(ev.DEFAULT_SEED + index, tw.CASE_KINDS[index % 2])
    with torch.inference_mode():
        cells, _ = ev.run_case(models, mechanism, case, steps=20, cfg=4.0)
        plain, _ = ev.run_case(models, baseline, case, steps=20, cfg=4.0)
    assert tw.score_case(cells, case)["present"] and not tw.score_case(plain, case)["present"]
