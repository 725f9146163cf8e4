"""The evidence harness (benchmarks/toy_evidence.py): its scoring of constructed results and its positive-control
attention patch (its statistics are evaluation/stats.py, tested in test_evaluation.py; its engine in
test_evaluation_engine.py)."""
import numpy as np
import pytest
import torch

from faithful_inpaint.benchmarks import toy_evidence as ev
from faithful_inpaint.devtools.random_models import build_model
from helpers import forward
from faithful_inpaint.kernels import toy_world as tw


def painted(case, colour=None, shape=None):
    """The case's scene with an object drawn into the mask: the prompted one unless told otherwise."""
    cells = case.scene.cells.copy()
    rows, cols = np.nonzero(case.mask)
    top, left = rows.min() + 1, cols.min() + 1
    side = min(rows.max() - rows.min(), cols.max() - cols.min()) - 1
    cover = tw.shape_coverage(shape or case.shape, side, side) > 0.5
    cells[top:top + side, left:left + side][cover] = tw.COLOURS[colour or case.colour]
    return cells


def test_scores_and_paired_summary_on_constructed_results():
    cases = tw.make_cases(20, seed=0)
    right = [tw.score_case(painted(c), c) for c in cases]
    empty = [tw.score_case(c.scene.cells, c) for c in cases]
    wrong = [tw.score_case(painted(c, colour=next(x for x in tw.COLOUR_NAMES if x != c.colour)), c) for c in cases]
    assert all(r["present"] and r["dominant"] and r["shape_ok"] for r in right)
    assert not any(r["present"] for r in empty + wrong)
    assert all(r["mae"] == 0.0 and r["changed"] == 0.0 for r in right)   # only the mask was painted
    for rows in (right, empty):
        for r in rows:
            r["seconds"] = 1.0
    s = ev.summarise(right, empty)
    assert s["n"] == 20 and s["present"][0] == 1.0 and s["present_diff"][0] == 1.0
    assert s["present_diff"][1] == pytest.approx(1.0)              # every pair differs by one: zero spread
    assert "present_diff" not in ev.summarise(empty, None)


@pytest.fixture(scope="module")
def sd15():
    return build_model("sd15")


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 768, generator=g)


def test_blocking_control_is_exact_without_a_mask_and_acts_with_one(sd15):
    x, ctx = inputs()
    base = forward(sd15, x, 3.0, ctx)
    nothing = ev.block_masked_to_known(sd15, torch.zeros(1, 128, 128))
    assert torch.equal(forward(nothing, x, 3.0, ctx), base)
    mask = torch.zeros(1, 128, 128)
    mask[:, 32:96, 32:96] = 1
    blocked = forward(ev.block_masked_to_known(sd15, mask), x, 3.0, ctx)
    assert not torch.allclose(blocked, base, atol=1e-4)
    assert torch.equal(forward(sd15, x, 3.0, ctx), base)            # the original model is left as it was
