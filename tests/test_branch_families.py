"""One record per branch family (kernels/branch_families.py): every record's smoke file is what the pack's own file
detection says it is, and the record's module loads it strictly; the derived tables keep the former ones' values."""
import pytest
import torch

from faithful_inpaint.kernels import branch_families, brush_files
from faithful_inpaint.devtools import smoke_checkpoints as sc
from faithful_inpaint.patching.brush_branch import BRANCH_FACTORIES
from faithful_inpaint.training import recipes

CASES = [(f, file) for f in branch_families.FAMILIES for file in f.smoke]


@pytest.mark.parametrize("family,file", CASES, ids=[file.name for _, file in CASES])
def test_smoke_layout_is_detected_as_its_family_and_loads_strictly(family, file):
    spec = sc._spec(file.name)
    shapes = {k: shape for k, (shape, _) in sc.layout(file.name).items()}
    metadata = spec.metadata() if spec.metadata else None
    kind = brush_files.classify(shapes, metadata)
    assert (kind.kind, kind.family, kind.public) == (family.kind, file.base, bool(family.public))
    assert kind.branch_family is family
    assert kind.label.startswith(family.label + " ")
    config_json = kind.config if kind.config is not None else kind.branch_config().to_json()
    with torch.device("meta"):
        module = BRANCH_FACTORIES[kind.kind](config_json)
    assert isinstance(module, family.module)
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert own == shapes          # what load_branch's strict load_state_dict requires
    assert sc.folder_for(file.name) == "inpaint" and sc.filename_for(file.name) == file.filename


def test_the_derived_tables_keep_their_former_values():
    # The values the hand-written tables had before the records (labels, training prompts, public presets).
    assert brush_files.KIND_NAMES == {"brushnet": "BrushNet", "powerpaint": "PowerPaint v2 (BrushNet_CA)",
                                      "painternet": "PainterNet", "mtadiffusion": "MTADiffusion",
                                      "powerpaint_text_encoder": "PowerPaint text encoder"}
    assert {k: b.unet_prompt for k, b in recipes.BRANCHES.items()} == {
        "brushnet": "mask", "powerpaint": "mask", "painternet": "global", "mtadiffusion": "mask"}
    assert brush_files.FileKind("powerpaint", "sd15").branch_config() == brush_files.BranchConfig.sd15(True)
    assert brush_files.FileKind("brushnet", "sdxl").branch_config() == brush_files.BranchConfig.sdxl()
    assert {f.kind for f in branch_families.FAMILIES if f.task_prompt} == {"powerpaint"}
    assert {f.kind for f in branch_families.FAMILIES if f.attention_control} == {"painternet"}


def test_a_recipe_naming_an_unknown_branch_or_loss_is_refused():
    with pytest.raises(ValueError, match="unknown branch 'controlnet'"):
        recipes.Recipe("controlnet", {"noise": 1.0})
    with pytest.raises(ValueError, match=r"unknown losses \['lpips'\]"):
        recipes.Recipe("brushnet", {"noise": 1.0, "lpips": 1.0})
