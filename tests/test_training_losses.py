"""Branch training losses against hand-computed values; training masks and the shard data format."""
import math

import numpy as np
import pytest
import torch

from faithful_inpaint.kernels import branch_losses as L
from faithful_inpaint.training import data as D
from faithful_inpaint.training import masks as M
from faithful_inpaint.training.make_synthetic_data import write_dataset


# ---- losses --------------------------------------------------------------------------------------------------

def _atal_case():
    # 2x2 layer, tokens (SOT, word, word); the mask covers the top-left pixel.
    probs = torch.tensor([[[0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [0.4, 0.4, 0.2], [0.5, 0.2, 0.3]]])
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    tokens = torch.tensor([[False, True, True]])
    return probs, mask, tokens


def test_atal_outside_mass_by_hand():
    probs, mask, tokens = _atal_case()
    # token 1: 1 - 0.5 / 1.2; token 2: 1 - 0.3 / 1.1 (the SOT column is not read)
    expected = ((1 - 0.5 / 1.2) + (1 - 0.3 / 1.1)) / 2
    assert L.atal_loss([probs], mask, tokens).item() == pytest.approx(expected, abs=1e-6)


def test_atal_mse_by_hand():
    probs, mask, tokens = _atal_case()
    # token 1 normalised by its peak 0.5: (1, .2, .8, .4) vs (1, 0, 0, 0); token 2 by 0.3: (1, 1, 2/3, 1)
    t1 = (0 + 0.04 + 0.64 + 0.16) / 4
    t2 = (0 + 1 + 4 / 9 + 1) / 4
    assert L.atal_loss([probs], mask, tokens, mode="mse").item() == pytest.approx((t1 + t2) / 2, abs=1e-6)


def test_atal_heads_layers_and_empty_samples():
    probs, mask, tokens = _atal_case()
    one = L.atal_loss([probs], mask, tokens)
    # heads are averaged: two heads whose mean is `probs`
    heads = torch.stack([probs * 0.5, probs * 1.5], dim=1)
    assert L.atal_loss([heads], mask, tokens).item() == pytest.approx(one.item(), abs=1e-6)
    # a second sample with an empty mask, a third with no actual token: both ignored
    probs3 = probs.repeat(3, 1, 1)
    mask3 = torch.cat([mask, torch.zeros_like(mask), mask])
    tokens3 = torch.cat([tokens, tokens, torch.zeros_like(tokens)])
    assert L.atal_loss([probs3], mask3, tokens3).item() == pytest.approx(one.item(), abs=1e-6)
    # a 4x4 mask read at the 2x2 layer by area + threshold; layers are averaged
    big = mask.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert L.atal_loss([probs, probs], big, tokens).item() == pytest.approx(one.item(), abs=1e-6)
    # attention entirely inside the mask costs nothing
    inside = torch.zeros(1, 4, 3)
    inside[0, 0] = 1.0
    assert L.atal_loss([inside], mask, tokens).item() == pytest.approx(0.0, abs=1e-6)


def test_atal_gradient_moves_attention_into_the_mask():
    probs, mask, tokens = _atal_case()
    logits = probs.log().clone().requires_grad_(True)
    L.atal_loss([logits.softmax(-1)], mask, tokens).backward()
    # raising a word token's logit inside the mask lowers the loss; outside the mask raises it
    assert logits.grad[0, 0, 1] < 0 and logits.grad[0, 1, 1] > 0


def test_noise_mse():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert L.noise_mse(a, torch.zeros(4)).item() == pytest.approx(30 / 4)


def test_sobel_edges_by_hand():
    image = torch.zeros(1, 3, 4, 4)
    image[..., 2:] = 1.0                       # a vertical step between columns 1 and 2
    edges = L.sobel_edges(image)
    # gx = (1 + 2 + 1) * (1 - 0) = 4 on both sides of the step, gy = 0; normalised by 4 * sqrt(2)
    expected = torch.tensor([0.0, 1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]).expand(4, 4)
    assert torch.allclose(edges[0, 0], expected, atol=1e-6)
    down = L.sobel_edges(image, (2, 2))        # area average of 2x2 blocks
    assert torch.allclose(down, torch.full((1, 1, 2, 2), 0.5 / math.sqrt(2)), atol=1e-6)


def test_sobel_edges_are_the_sobel_formula():
    image = torch.rand(2, 3, 30, 41, generator=torch.Generator().manual_seed(0))
    gray = 0.299 * image[:, :1] + 0.587 * image[:, 1:2] + 0.114 * image[:, 2:]
    p = torch.nn.functional.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx = (p[..., :-2, 2:] + 2 * p[..., 1:-1, 2:] + p[..., 2:, 2:]) - (p[..., :-2, :-2] + 2 * p[..., 1:-1, :-2]
                                                                       + p[..., 2:, :-2])
    gy = (p[..., 2:, :-2] + 2 * p[..., 2:, 1:-1] + p[..., 2:, 2:]) - (p[..., :-2, :-2] + 2 * p[..., :-2, 1:-1]
                                                                       + p[..., :-2, 2:])
    expected = (gx ** 2 + gy ** 2).sqrt() / (4 * math.sqrt(2))
    assert torch.allclose(L.sobel_edges(image), expected, atol=1e-6)
    assert L.sobel_edges(torch.full((1, 3, 8, 8), 0.4)).max() < 1e-7     # flat: 0 up to rounding (no epsilon)


def test_edge_loss_by_hand():
    pred, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    assert L.edge_loss(pred, target).item() == pytest.approx(4.0)           # ||.||_F^2 per sample, batch mean
    assert L.edge_loss(pred, target, "mean").item() == pytest.approx(1.0)


def test_gram_and_style_by_hand():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)
    g = L.gram_matrix(f)
    assert torch.allclose(g[0], torch.tensor([[5.0, 11.0], [11.0, 25.0]]) / 4)
    # ||G - 0||_F^2 = 1.25^2 + 2 * 2.75^2 + 6.25^2; one layer
    assert L.style_loss([f], [torch.zeros_like(f)]).item() == pytest.approx(55.75)
    assert L.style_loss([f, f], [torch.zeros_like(f), f]).item() == pytest.approx(55.75 / 2)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_previous_latents_agree_for_a_perfect_prediction(prediction):
    torch.manual_seed(0)
    abar = torch.linspace(0.999, 0.01, 1000)
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([0, 500, 999])
    x_t = L.add_noise(x0, noise, t, abar)
    perfect = L.training_target(x0, noise, t, abar, prediction)
    pred, target = L.previous_latents(perfect, x_t, x0, noise, t, abar, prediction)
    assert torch.allclose(pred, target, atol=1e-4)
    assert torch.allclose(target[0], x0[0], atol=1e-6)            # t = 0: abar_{-1} = 1, the clean latent
    a = abar[499]
    assert torch.allclose(target[1], a.sqrt() * x0[1] + (1 - a).sqrt() * noise[1], atol=1e-6)


def test_latent_vgg_loads_a_torchvision_state_dict(tmp_path):
    from torchvision.models import vgg

    torch.manual_seed(0)
    features = vgg.make_layers(vgg.cfgs["D"])
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "vgg16.pth")
    model = L.LatentVGG()
    model.load_torchvision(str(tmp_path / "vgg16.pth"))
    first = state["features.0.weight"]
    assert torch.allclose(model.features[0].weight, first.mean(1, keepdim=True).repeat(1, 4, 1, 1) * 0.75)
    assert torch.equal(model.features[2].weight, state["features.2.weight"])
    outs = model(torch.randn(2, 4, 16, 16))
    assert [o.shape[1:] for o in outs] == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    torch.save({"something.else": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a torchvision vgg16"):
        L.LatentVGG().load_torchvision(str(tmp_path / "bad.pth"))


# ---- masks ---------------------------------------------------------------------------------------------------

def _object():
    obj = np.zeros((64, 64), np.float32)
    obj[20:40, 10:30] = 1
    return obj


def test_user_like_object_masks_cover_the_object():
    obj = _object()
    for seed in range(5):
        box = M.box_mask(obj, np.random.default_rng(seed))
        assert box[20:40, 10:30].all() and box.sum() < 64 * 64
        scribble = M.scribble_mask(obj, np.random.default_rng(seed))
        assert scribble[obj > 0].all()
        seg = M.segmentation_mask(obj, np.random.default_rng(seed))
        assert seg[obj > 0].all()
    a = M.object_mask(obj, np.random.default_rng(3))
    assert np.array_equal(a, M.object_mask(obj, np.random.default_rng(3)))


def test_random_masks_and_augmentation():
    for seed in range(5):
        m = M.random_brush_mask(64, 64, np.random.default_rng(seed))
        assert 0 < m.mean() <= 0.6 + 1e-6
        assert np.array_equal(m, M.random_brush_mask(64, 64, np.random.default_rng(seed)))
    square = np.zeros((32, 32), np.float32)
    square[8:24, 8:24] = 1
    grown = M.dilate(square, 2)
    assert grown.sum() > square.sum() and grown[square > 0].all()
    assert M.erode(square, 2).sum() < square.sum()
    assert np.array_equal(M.augment(square, np.random.default_rng(0), morph_prob=0.0), square)


# ---- data format -------------------------------------------------------------------------------------------

def test_shards_round_trip_and_items_are_deterministic(tmp_path):
    write_dataset(tmp_path, count=6, size=32, per_shard=4, seed=1)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    ds = D.ShardDataset(tmp_path, resolution=24, policy=D.MaskPolicy(object_prob=1.0, caption_dropout=0.0))
    assert len(ds) == 6 and (tmp_path / "shard-000000.tar.index.json").is_file()
    item = ds[2]
    assert item["image"].shape == (3, 24, 24) and item["mask"].shape == (1, 24, 24)
    assert item["object"] and item["caption"].startswith("a ") and " on a " not in item["caption"]
    again = D.ShardDataset(tmp_path, resolution=24, policy=D.MaskPolicy(object_prob=1.0, caption_dropout=0.0))[2]
    assert torch.equal(item["image"], again["image"]) and torch.equal(item["mask"], again["mask"])
    other_epoch = ds[2 + len(ds)]                       # the same sample in epoch 1: other random choices
    assert not torch.equal(item["mask"], other_epoch["mask"]) or not torch.equal(item["image"], other_epoch["image"])
    plain = D.ShardDataset(tmp_path, resolution=24, policy=D.MaskPolicy(object_prob=0.0, caption_dropout=0.0))
    assert " on a " in plain[2]["caption"] and not plain[2]["object"]     # random masks take the global caption


def test_sampler_partitions_and_resumes():
    full = [list(D.ResumableSampler(10, r, 3, seed=4)) for r in range(3)]
    assert all(len(f) == 4 for f in full)
    assert set(sum(full, [])) == set(range(10))           # padded by wrapping: every sample is seen
    s = D.ResumableSampler(10, 1, 3, seed=4)
    s.set_position(0, 2)
    assert list(s) == full[1][2:]
    s.set_position(1, 0)
    epoch1 = list(s)
    assert all(k >= 10 for k in epoch1) and [k - 10 for k in epoch1] != full[1]
