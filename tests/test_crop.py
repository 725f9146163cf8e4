"""Zoom-in crop and stitch (InpaintCropAroundMask / InpaintStitch): window geometry, exact pixels outside the
window, round trips, batches, mask layouts, odd sizes, clear errors, and a run through ComfyUI's execution engine."""
import numpy as np
import pytest
import torch
from PIL import Image

from faithful_inpaint.kernels import crop as crop_ops
from faithful_inpaint.patching.errors import NodeInputError


@pytest.fixture(scope="module")
def nodes_():
    import nodes

    return nodes.NODE_CLASS_MAPPINGS["InpaintCropAroundMask"], nodes.NODE_CLASS_MAPPINGS["InpaintStitch"]


def rect_mask(h, w, y0, y1, x0, x1, batch=None):
    m = torch.zeros(h, w)
    m[y0:y1, x0:x1] = 1
    return m if batch is None else m[None].repeat(batch, 1, 1)


def random_image(batch, h, w, seed=0):
    return torch.rand(batch, h, w, 3, generator=torch.Generator().manual_seed(seed))


def run_crop(nodes_, image, mask, padding=16, long_side=64):
    return nodes_[0].execute(image=image, mask=mask, padding=padding, long_side=long_side).result


def run_stitch(nodes_, stitch, original, inpainted, feather=4):
    return nodes_[1].execute(stitch=stitch, original=original, inpainted=inpainted, feather=feather).result[0]


def outside(window: crop_ops.Window, h, w) -> torch.Tensor:
    keep = torch.ones(h, w, dtype=torch.bool)
    rows, cols, _, _ = window.inside(h, w)
    keep[rows, cols] = False
    return keep


@pytest.mark.parametrize("size,box,padding,long_side", [
    ((97, 131), (40, 52, 60, 75), 8, 64),     # odd image, small region zoomed in
    ((61, 45), (0, 7, 40, 45), 5, 128),       # region at a corner, window shifted inside the image
    ((33, 29), (3, 30, 2, 27), 16, 64),       # window larger than the image: hangs over its edges
    ((50, 70), (10, 41, 13, 33), 3, 0),       # native resolution: only grown to multiples of 8
])
def test_window_contains_mask_plus_padding_and_working_size_is_on_the_latent_grid(size, box, padding, long_side):
    h, w = size
    y0, y1, x0, x1 = box
    cplan = crop_ops.plan(rect_mask(h, w, *box), padding, long_side)
    (win,) = cplan.windows
    # the padded box, as far as it lies in the image, is inside the window
    assert win.y <= max(y0 - padding, 0) and win.y + win.height >= min(y1 + padding, h)
    assert win.x <= max(x0 - padding, 0) and win.x + win.width >= min(x1 + padding, w)
    # the window lies in the image unless it is larger than the image in that direction
    if win.height <= h:
        assert 0 <= win.y and win.y + win.height <= h
    if win.width <= w:
        assert 0 <= win.x and win.x + win.width <= w
    wh, ww = cplan.working_size
    assert wh % 8 == 0 and ww % 8 == 0
    if long_side:
        assert max(wh, ww) == long_side
        # uniform scale: the window has the working size's aspect ratio to within a pixel
        assert abs(win.width * wh / ww - win.height) <= 1
    else:
        assert (win.height, win.width) == (wh, ww)


@pytest.mark.parametrize("long_side", [0, 64, 200])
def test_pixels_outside_the_window_are_untouched_exactly(nodes_, long_side):
    image = random_image(1, 77, 93)
    crops, crop_mask, stitch = run_crop(nodes_, image, rect_mask(77, 93, 30, 41, 20, 37), long_side=long_side)
    garbage = random_image(1, *crops.shape[1:3], seed=5)
    out = run_stitch(nodes_, stitch, image, garbage, feather=6)
    keep = outside(stitch.windows[0], 77, 93)
    assert keep.any() and torch.equal(out[0][keep], image[0][keep])
    assert not torch.equal(out, image)                         # the window did change
    inside_mask = rect_mask(77, 93, 30, 41, 20, 37).bool()
    assert (out[0][inside_mask] - image[0][inside_mask]).abs().max() > 0.05


def test_round_trip_without_change_reproduces_the_image(nodes_):
    image = random_image(2, 53, 67)
    mask = rect_mask(53, 67, 11, 30, 5, 50)
    # native resolution: bit for bit (the overhang is cropped away, the blend is original + w * 0)
    crops, _, stitch = run_crop(nodes_, image, mask, padding=7, long_side=0)
    assert torch.equal(run_stitch(nodes_, stitch, image, crops, feather=5), image)
    # resized (zoomed in 4x and back): only the resampling error, on a smooth image
    smooth = torch.nn.functional.interpolate(random_image(2, 7, 9).movedim(-1, 1), size=(53, 67), mode="bilinear")
    smooth = smooth.movedim(1, -1).contiguous()
    crops, _, stitch = run_crop(nodes_, smooth, mask, padding=7, long_side=256)
    out = run_stitch(nodes_, stitch, smooth, crops, feather=5)
    assert (out - smooth).abs().mean() < 0.002 and (out - smooth).abs().max() < 0.03


def test_native_crop_is_the_window_and_the_mask_is_cropped_with_it(nodes_):
    image = random_image(1, 40, 40)
    crops, crop_mask, stitch = run_crop(nodes_, image, rect_mask(40, 40, 12, 20, 14, 22), padding=4, long_side=0)
    win = stitch.windows[0]
    assert crops.shape == (1, 16, 16, 3) and crop_mask.shape == (1, 16, 16)
    assert torch.equal(crops[0], image[0, win.y:win.y + 16, win.x:win.x + 16])
    assert crop_mask.sum() == 64 and crop_mask.max() == 1


@pytest.mark.parametrize("layout", ["HW", "BHW", "B1HW"])
def test_every_comfy_mask_layout_is_accepted(nodes_, layout):
    mask = rect_mask(48, 48, 10, 20, 30, 40)
    mask = {"HW": mask, "BHW": mask[None], "B1HW": mask[None, None]}[layout]
    crops, crop_mask, stitch = run_crop(nodes_, random_image(1, 48, 48), mask, padding=4, long_side=32)
    assert crops.shape[0] == 1 and crop_mask.dim() == 3 and stitch.batch == 1


def test_batch_gets_one_window_per_mask_with_one_shared_size(nodes_):
    image = random_image(2, 64, 96)
    mask = torch.stack([rect_mask(64, 96, 5, 15, 5, 20), rect_mask(64, 96, 40, 60, 70, 90)])
    crops, crop_mask, stitch = run_crop(nodes_, image, mask, padding=4, long_side=48)
    a, b = stitch.windows
    assert (a.width, a.height) == (b.width, b.height) and (a.x, a.y) != (b.x, b.y)
    assert crops.shape[0] == 2 and crop_mask[0].sum() > 0 and crop_mask[1].sum() > 0
    garbage = random_image(2, *crops.shape[1:3], seed=3)
    out = run_stitch(nodes_, stitch, image, garbage)
    for i, win in enumerate(stitch.windows):
        keep = outside(win, 64, 96)
        assert torch.equal(out[i][keep], image[i][keep])


def test_one_crop_many_results_gives_one_image_each(nodes_):
    image = random_image(1, 40, 40)
    crops, _, stitch = run_crop(nodes_, image, rect_mask(40, 40, 10, 20, 10, 20), padding=4, long_side=32)
    results = random_image(3, *crops.shape[1:3], seed=2)
    out = run_stitch(nodes_, stitch, image, results)
    assert out.shape == (3, 40, 40, 3)
    assert not torch.equal(out[0], out[1])


def test_a_sample_with_an_empty_mask_uses_the_union_window():
    mask = torch.stack([rect_mask(32, 32, 2, 6, 2, 6), torch.zeros(32, 32)])
    a, b = crop_ops.plan(mask, 2, 0).windows
    assert a == b


def test_feather_softens_the_edge_outside_the_mask_only():
    mask = rect_mask(40, 40, 15, 25, 15, 25)[None, None]
    weight = crop_ops.blend_weight(mask, 8)
    assert torch.equal(weight[mask.bool()], torch.ones(100))
    ring = weight[0, 0, 13, 20]                                 # 2 px outside the mask
    assert 0.5 < ring < 1 and weight[0, 0, 0, 0] == 0
    assert torch.equal(crop_ops.blend_weight(mask, 0), mask)


def test_empty_mask_and_mismatched_inputs_are_clear_errors(nodes_):
    image = random_image(1, 32, 32)
    with pytest.raises(NodeInputError, match=r"InpaintCropAroundMask, input 'mask': the mask is empty"):
        run_crop(nodes_, image, torch.zeros(1, 32, 32))
    with pytest.raises(NodeInputError, match=r"input 'mask': the mask is 16x16 px but the image is 32x32"):
        run_crop(nodes_, image, torch.ones(1, 16, 16))
    with pytest.raises(NodeInputError, match=r"input 'mask': batch of 2 does not match .* batch of 3"):
        run_crop(nodes_, random_image(3, 32, 32), torch.ones(2, 32, 32))
    crops, _, stitch = run_crop(nodes_, image, rect_mask(32, 32, 4, 8, 4, 8))
    with pytest.raises(NodeInputError, match=r"InpaintStitch, input 'original': the original image is 20x20"):
        run_stitch(nodes_, stitch, random_image(1, 20, 20), crops)


def test_crop_and_stitch_through_the_execution_engine(tmp_path):
    """EmptyImage + a mask -> crop -> invert the crop (a stand-in for inpainting) -> stitch -> SaveImage."""
    from faithful_inpaint.headless.execute import run_prompt

    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 75, "height": 51, "batch_size": 1, "color": 0x336699}},
        "2": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 75, "height": 51}},
        "3": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 9, "height": 7}},
        "4": {"class_type": "MaskComposite", "inputs": {"destination": ["2", 0], "source": ["3", 0], "x": 40,
                                                        "y": 20, "operation": "add"}},
        "5": {"class_type": "InpaintCropAroundMask", "inputs": {"image": ["1", 0], "mask": ["4", 0], "padding": 6,
                                                                "long_side": 64}},
        "6": {"class_type": "ImageInvert", "inputs": {"image": ["5", 0]}},
        "7": {"class_type": "InpaintStitch", "inputs": {"stitch": ["5", 2], "original": ["1", 0],
                                                        "inpainted": ["6", 0], "feather": 2}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "crop_test"}},
    }
    result = run_prompt(prompt)
    (_, _, path), = result.image_files()
    out = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert out.shape == (51, 75, 3)
    assert (out[0, 0] == [0x33, 0x66, 0x99]).all() and (out[50, 0] == [0x33, 0x66, 0x99]).all()
    assert (np.abs(out[23, 44] - [0xcc, 0x99, 0x66]) <= 1).all()    # inside the mask: the inverted crop
