"""evaluation/: statistics, dataset readers on fixture files the tests write, metrics against hand-computed values
(tiny random-config CLIP, torchvision-layout LPIPS backbone, masked PSNR / MSE), and bad input naming the case or
file."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from faithful_inpaint.evaluation import stats
from faithful_inpaint.evaluation.datasets import (DatasetError, convex_hull_mask, open_dataset, read_brushbench, read_coco,
                                 read_jsonl, read_quadruples, rle_decode)
from faithful_inpaint.evaluation.engine import MetricInput
from faithful_inpaint.evaluation.metrics import (AestheticMLP, MetricError, MetricFiles, lpips_model, make_metrics)

# ------------------------------------------------------------------------------------------------ statistics


def test_wilson_interval_matches_hand_values():
    low, high = stats.wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    low, high = stats.wilson(0, 20)                 # never negative, and not degenerate at 0 successes
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.1611, abs=1e-4)


def test_mean_interval_and_paired_difference():
    mean, low, high = stats.mean_interval([1, 0, 1, 0])
    half = 1.96 * np.std([1, 0, 1, 0], ddof=1) / 2
    assert (mean, low, high) == pytest.approx((0.5, 0.5 - half, 0.5 + half))
    assert math.isnan(stats.mean_interval([1.0])[1])   # one value: no interval, not a fake zero-width one
    assert stats.mean_interval([2.0, math.inf, 4.0])[0] == 3.0     # an infinite PSNR is left out of the mean
    d = stats.paired_difference([3.0, 5.0, math.inf], [1.0, 2.0, 7.0])
    assert d[0] == pytest.approx(2.5)                  # (2 + 3) / 2: the pair with inf is left out
    with pytest.raises(ValueError):
        stats.paired_difference([1.0], [1.0, 2.0])
    assert stats.rate([True, False, True, True])[0] == 0.75


# ------------------------------------------------------------------------------------------------ datasets


def save(path: Path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8), mode).save(path)
    return path


def rgb(h=32, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def box_mask(h=32, w=32, box=(8, 8, 20, 24)):
    m = np.zeros((h, w), np.uint8)
    m[box[0]:box[2], box[1]:box[3]] = 255
    return m


def jsonl_folder(tmp_path, entries):
    (tmp_path / "cases.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    return tmp_path


def test_jsonl_folder_reads_cases_in_order(tmp_path):
    save(tmp_path / "a.png", rgb(seed=1)), save(tmp_path / "a_mask.png", box_mask())
    save(tmp_path / "b.png", rgb(seed=2)), save(tmp_path / "b_mask.png", box_mask(box=(0, 0, 4, 4)))
    save(tmp_path / "s.png", rgb(seed=3))
    jsonl_folder(tmp_path, [
        {"id": "a", "image": "a.png", "mask": "a_mask.png", "prompt": "a cat", "class_name": "cat", "seed": 5},
        {"id": "b", "image": "b.png", "mask": "b_mask.png", "prompt": "a dog", "subject": "s.png"}])
    ds = open_dataset(f"folder:{tmp_path}")
    assert [c.id for c in ds.cases] == ["a", "b"] and [c.index for c in ds.cases] == [0, 1]
    image, mask = ds.cases[0].inputs()
    assert image.shape == (32, 32, 3) and np.array_equal(image, rgb(seed=1) / np.float32(255))
    assert mask.sum() == 12 * 16 and mask[8, 8] and not mask[7, 8]
    assert ds.cases[0].seed == 5 and ds.cases[1].seed is None and ds.class_names == ["cat"]
    assert ds.cases[1].load_subject().shape == (32, 32, 3) and ds.cases[0].load_subject is None


def test_bad_dataset_files_name_the_case_and_file(tmp_path):
    save(tmp_path / "a.png", rgb())
    save(tmp_path / "small_mask.png", box_mask(16, 16, (2, 2, 8, 8)))
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    jsonl_folder(tmp_path, [{"id": "nomask", "image": "a.png", "mask": "missing.png", "prompt": ""}])
    with pytest.raises(DatasetError, match=r"case nomask: mask file not found: .*missing\.png"):
        read_jsonl(tmp_path)
    jsonl_folder(tmp_path, [{"id": "sizes", "image": "a.png", "mask": "small_mask.png"}])
    with pytest.raises(DatasetError, match=r"case sizes: image is 32x32 but mask is 16x16"):
        read_jsonl(tmp_path).cases[0].inputs()
    jsonl_folder(tmp_path, [{"id": "garbage", "image": "broken.png", "mask": "small_mask.png"}])
    with pytest.raises(DatasetError, match=r"case garbage: cannot read image .*broken\.png"):
        read_jsonl(tmp_path).cases[0].inputs()
    (tmp_path / "cases.jsonl").write_text('{"id": "x", "image": "a.png"\n')
    with pytest.raises(DatasetError, match=r"cases\.jsonl, line 1: not JSON"):
        read_jsonl(tmp_path)


def test_coco_reader_follows_profi_painters_protocol(tmp_path):
    """Three images; an L-shaped instance's convex hull fills the L's notch; crowd regions are left out; the prompt
    is the category name; the sample is seeded and never repeats an instance."""
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": 40, "width": 50} for i in (1, 2, 3)]
    for im in images:
        save(tmp_path / "val2017" / im["file_name"], rgb(40, 50, im["id"]))
    ell = [[10, 10, 30, 10, 30, 15, 15, 15, 15, 30, 10, 30]]          # an L: the notch (20, 25) is outside it
    anns = [{"id": 11, "image_id": 1, "category_id": 1, "segmentation": ell, "iscrowd": 0},
            {"id": 12, "image_id": 2, "category_id": 2, "segmentation": [[5, 5, 20, 5, 20, 20]], "iscrowd": 0},
            {"id": 13, "image_id": 3, "category_id": 2, "segmentation": [[1, 1, 9, 1, 9, 9, 1, 9]], "iscrowd": 0},
            {"id": 14, "image_id": 3, "category_id": 1, "segmentation": {"size": [40, 50], "counts": "xyz"},
             "iscrowd": 1}]
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}]}))
    ds = read_coco(path, samples=10)
    assert len(ds.cases) == 3 and ds.class_names == ["person", "bicycle"]
    by_id = {c.id.split("-")[1]: c for c in ds.cases}
    assert set(by_id) == {"11", "12", "13"}                            # the crowd region is not a case
    assert by_id["11"].prompt == "person" == by_id["11"].class_name and by_id["12"].prompt == "bicycle"
    image, mask = by_id["11"].inputs()
    assert image.shape == (40, 50, 3) and mask.shape == (40, 50)
    assert mask[25, 20] and mask[12, 28] and not mask[35, 35]          # the notch is inside the hull
    assert [c.id for c in read_coco(path, samples=2, sample_seed=1).cases] == \
        [c.id for c in read_coco(path, samples=2, sample_seed=1).cases]
    assert len(read_coco(path, samples=2).cases) == 2
    hull = convex_hull_mask([[0, 0, 9, 0, 0, 9]], 10, 10)              # a right triangle: half the square
    assert hull[1, 1] and not hull[9, 9]
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(DatasetError, match=r"bad\.json: not a COCO instances file"):
        read_coco(tmp_path / "bad.json")


def test_brushbench_mapping_with_rle_masks(tmp_path):
    save(tmp_path / "images" / "a.jpg", rgb(256, 256))                 # resized to 512 as BrushNet's evaluation does
    save(tmp_path / "images" / "b.jpg", rgb(512, 512, 1))
    mask = np.zeros((512, 512), bool)
    mask[100:103, 200:210] = True
    flat = np.flatnonzero(mask.reshape(-1))
    runs = []
    for row in range(100, 103):                                        # 1-based (start, length), row-major
        runs += [row * 512 + 200 + 1, 10]
    assert np.array_equal(rle_decode(runs, 512, 512), mask) and len(flat) == 30
    mapping = {"a": {"image": "images/a.jpg", "inpainting_mask": runs, "caption": "a red apple"},
               "b": {"image": "images/b.jpg", "inpainting_mask": [1, 5], "caption": "sky"}}
    (tmp_path / "mapping_file.json").write_text(json.dumps(mapping))
    ds = read_brushbench(tmp_path / "mapping_file.json")
    assert [c.prompt for c in ds.cases] == ["a red apple", "sky"]
    image, m = ds.cases[0].inputs()
    assert image.shape == (512, 512, 3) and np.array_equal(m, mask)
    assert ds.cases[1].inputs()[1].reshape(-1)[:6].tolist() == [True] * 5 + [False]
    mapping["a"]["inpainting_mask"] = [512 * 512, 3]                   # runs past the end
    (tmp_path / "mapping_file.json").write_text(json.dumps(mapping))
    with pytest.raises(DatasetError, match=r"case a .*bad 'inpainting_mask' RLE"):
        read_brushbench(tmp_path / "mapping_file.json").cases[0].inputs()


def test_quadruple_folder(tmp_path):
    for name, seed in (("q1", 1), ("q2", 2)):
        save(tmp_path / name / "image.png", rgb(seed=seed)), save(tmp_path / name / "mask.png", box_mask())
        save(tmp_path / name / "subject.png", rgb(16, 16, seed + 10))
        (tmp_path / name / "prompt.txt").write_text(f"a toy {name}\n")
    ds = read_quadruples(tmp_path)
    assert [c.id for c in ds.cases] == ["q1", "q2"] and ds.cases[1].prompt == "a toy q2"
    assert ds.cases[0].load_subject().shape == (16, 16, 3)
    (tmp_path / "q2" / "subject.png").unlink()
    with pytest.raises(DatasetError, match=r"case q2: subject file not found"):
        read_quadruples(tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset"):
        open_dataset("nonsense:x")


# ------------------------------------------------------------------------------------------------ metrics


def metric_input(image, output, mask, prompt="a photo", class_name=None, subject=None):
    from faithful_inpaint.evaluation.datasets import Case

    case = Case("c", prompt, 0, lambda: image, lambda: mask, (lambda: subject) if subject is not None else None,
                class_name=class_name)
    return MetricInput(case, image, mask, output, None)


def test_masked_pixel_metrics_against_hand_values():
    rng = np.random.default_rng(0)
    image = rng.random((16, 16, 3)).astype(np.float32)
    mask = np.zeros((16, 16), bool)
    mask[4:10, 4:10] = True
    psnr, mse, ssim = make_metrics(["psnr_unmasked", "mse_unmasked", "ssim_unmasked"], MetricFiles())
    same_outside = image.copy()
    same_outside[mask] = 0.0                                           # only the hole changed
    inp = metric_input(image, same_outside, mask)
    assert psnr.compute(inp)["psnr_unmasked"] == math.inf
    assert mse.compute(inp)["mse_unmasked"] == 0.0
    assert ssim.compute(inp)["ssim_unmasked"] == pytest.approx(1.0)
    changed = same_outside.copy()
    changed[0, :, :] = np.clip(changed[0] + 0.1, 0, 1)
    diff = (changed - image)[~mask]
    hand_mse = float((diff.astype(np.float64) ** 2).mean())           # over unmasked pixels x channels
    inp = metric_input(image, changed, mask)
    assert mse.compute(inp)["mse_unmasked"] == pytest.approx(hand_mse, rel=1e-5)
    assert psnr.compute(inp)["psnr_unmasked"] == pytest.approx(10 * math.log10(1 / hand_mse), rel=1e-5)


def test_lpips_is_zero_on_identical_images_and_loads_a_torchvision_backbone(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    backbone = tmp_path / "squeezenet1_1.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), backbone)
    files = MetricFiles(lpips_backbone=str(backbone), lpips_net="squeeze")
    (lpips,) = make_metrics(["lpips_unmasked"], files)
    rng = np.random.default_rng(1)
    image = rng.random((64, 64, 3)).astype(np.float32)
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    assert lpips.compute(metric_input(image, image, mask))["lpips_unmasked"] == 0.0
    other = rng.random((64, 64, 3)).astype(np.float32)
    assert lpips.compute(metric_input(image, other, mask))["lpips_unmasked"] > 0
    loaded = lpips.model.net.state_dict()["slices.0.0.weight"]
    assert torch.equal(loaded, torch.load(backbone)["features.0.weight"])   # the file's weights, not random ones
    wrong = tmp_path / "aesthetic.safetensors"
    save_file(AestheticMLP().state_dict(), str(wrong))
    with pytest.raises(MetricError, match=r"aesthetic\.safetensors: not torchvision squeeze weights"):
        lpips_model("squeeze", str(wrong))
    with pytest.raises(MetricError, match=r"--lpips-backbone"):
        make_metrics(["lpips_unmasked"], MetricFiles())


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random-config CLIP (ComfyUI's SD1 tokenizer files; 768-d projection, as ViT-L/14 gives the aesthetic
    MLP) saved as a transformers folder, as a user's CLIP folder is."""
    import comfy.sd1_clip
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tok_dir = Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer"
    folder = tmp_path_factory.mktemp("tiny_clip")
    config = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=77),
                        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                                           num_hidden_layers=2, num_attention_heads=2), projection_dim=768)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt")))
    processor.save_pretrained(folder)
    return folder


def reference_cosines(folder, images, texts):
    """cos(image, text) from CLIPModel's own forward (logits / logit scale), independent of torchmetrics' code."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    batch = processor(text=texts, images=[(np.clip(i, 0, 1) * 255).round().astype(np.uint8) for i in images],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch)
        return (out.logits_per_image / model.logit_scale.exp()).numpy()


def test_clip_score_is_100_max_cos_0_on_the_mask_crop(tiny_clip):
    rng = np.random.default_rng(2)
    image = rng.random((48, 40, 3)).astype(np.float32)
    output = rng.random((48, 40, 3)).astype(np.float32)
    mask = np.zeros((48, 40), bool)
    mask[10:30, 5:25] = True
    files = MetricFiles(clip=str(tiny_clip))
    local, whole = make_metrics(["clip_score", "clip_similarity"], files)
    for prompt in ("a red apple", "a dog on a sofa", "a car"):
        inp = metric_input(image, output, mask, prompt)
        cos_crop = reference_cosines(tiny_clip, [output[10:30, 5:25]], [prompt])[0, 0]
        cos_whole = reference_cosines(tiny_clip, [output], [prompt])[0, 0]
        assert local.compute(inp)["clip_score"] == pytest.approx(100 * max(cos_crop, 0), abs=1e-3)
        assert whole.compute(inp)["clip_similarity"] == pytest.approx(100 * max(cos_whole, 0), abs=1e-3)


def test_clip_accuracy_picks_the_top_class_of_the_crop(tiny_clip):
    rng = np.random.default_rng(3)
    output = rng.random((32, 32, 3)).astype(np.float32)
    mask = np.ones((32, 32), bool)
    names = ["person", "bicycle", "car", "dog"]
    (acc,) = make_metrics(["clip_accuracy"], MetricFiles(clip=str(tiny_clip)), names)
    cos = reference_cosines(tiny_clip, [output], [f"a photo of a {n}" for n in names])[0]
    top = names[int(cos.argmax())]
    assert acc.compute(metric_input(output, output, mask, class_name=top)) == {"clip_accuracy": True,
                                                                               "clip_class": top}
    other = next(n for n in names if n != top)
    assert acc.compute(metric_input(output, output, mask, class_name=other))["clip_accuracy"] is False
    with pytest.raises(MetricError, match="needs class names"):
        make_metrics(["clip_accuracy"], MetricFiles(clip=str(tiny_clip)), None)


def test_aesthetic_mlp_on_normalised_clip_embedding(tiny_clip, tmp_path):
    from safetensors.torch import save_file
    from transformers import CLIPModel, CLIPProcessor

    torch.manual_seed(4)
    mlp_file = tmp_path / "aesthetic.safetensors"
    state = AestheticMLP().state_dict()
    save_file(state, str(mlp_file))
    (aes,) = make_metrics(["aesthetic"], MetricFiles(clip=str(tiny_clip), aesthetic=str(mlp_file)))
    image = np.random.default_rng(5).random((32, 32, 3)).astype(np.float32)
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        pixels = processor(images=[(image * 255).round().astype(np.uint8)], return_tensors="pt")["pixel_values"]
        e = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        x = e / e.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):                                     # the head's linear layers, dropout off
            x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    mask = np.ones((32, 32), bool)
    assert aes.compute(metric_input(image, image, mask))["aesthetic"] == pytest.approx(float(x[0, 0]), abs=1e-5)


def test_metric_model_files_of_the_wrong_kind_are_named(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    not_mlp = tmp_path / "lpips_lin.safetensors"
    save_file({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, str(not_mlp))
    with pytest.raises(MetricError, match=r"lpips_lin\.safetensors: not a LAION aesthetic MLP"):
        make_metrics(["aesthetic"], MetricFiles(clip=str(tiny_clip), aesthetic=str(not_mlp)))
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(b"\x00garbage")
    with pytest.raises(MetricError, match=r"weights\.pth: not a readable weights file"):
        make_metrics(["aesthetic"], MetricFiles(clip=str(tiny_clip), aesthetic=str(garbage)))
    (tmp_path / "not_clip").mkdir()
    (tmp_path / "not_clip" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(MetricError, match=r"not_clip: not a CLIP model folder"):
        make_metrics(["clip_score"], MetricFiles(clip=str(tmp_path / "not_clip")))
    with pytest.raises(MetricError, match=r"unknown metric\(s\) \['fid'\]"):
        make_metrics(["psnr_unmasked", "fid"], MetricFiles())


def test_clip_i_and_clip_t_of_the_subject(tiny_clip):
    rng = np.random.default_rng(6)
    output = rng.random((32, 32, 3)).astype(np.float32)
    subject = rng.random((32, 32, 3)).astype(np.float32)
    mask = np.ones((32, 32), bool)
    (m,) = make_metrics(["clip_i"], MetricFiles(clip=str(tiny_clip)))
    values = m.compute(metric_input(output, output, mask, prompt="a plush toy", subject=subject))
    assert values["clip_t"] == pytest.approx(100 * reference_cosines(tiny_clip, [output], ["a plush toy"])[0, 0],
                                             abs=1e-3)
    same = m.compute(metric_input(output, output, mask, prompt="x", subject=output))
    assert same["clip_i"] == pytest.approx(100.0, abs=1e-3)            # the subject itself: cosine 1


def test_a_bad_case_stops_the_run_with_nothing_of_it_written(tmp_path):
    """Case 'b' has a mask of another size: the run stops naming it; 'a' is stored complete, 'b' not at all, and a
    resume after the file is fixed generates only 'b'."""
    from faithful_inpaint.evaluation import engine

    data = tmp_path / "data"
    save(data / "a.png", rgb(seed=1)), save(data / "b.png", rgb(seed=2)), save(data / "m.png", box_mask())
    save(data / "small.png", box_mask(16, 16, (2, 2, 8, 8)))
    jsonl_folder(data, [{"id": "a", "image": "a.png", "mask": "m.png"}, {"id": "b", "image": "b.png", "mask": "small.png"}])
    calls = []

    def generate(case, image, mask, seed):                 # a stand-in generator: the input darkened in the mask
        calls.append(case.id)
        return engine.Output(image=np.where(mask[..., None], image * 0.5, image))

    variant = engine.Variant("half", generate, {"rule": "darken"})
    metrics = make_metrics(["mse_unmasked"], MetricFiles())
    with pytest.raises(DatasetError, match=r"case b: image is 32x32 but mask is 16x16"):
        engine.run(read_jsonl(data), [variant], metrics, tmp_path / "out", progress=False)
    files = sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["a.json", "a.png"] and calls == ["a"]
    save(data / "small.png", box_mask())
    records = engine.run(read_jsonl(data), [variant], metrics, tmp_path / "out", progress=False)["half"]
    assert calls == ["a", "b"] and [r["metrics"]["mse_unmasked"] for r in records] == [0.0, 0.0]
    assert [r["seed"] for r in records] == [0, 1]


# ------------------------------------------------------------------------------------------------ preference metrics


def test_pickscore_is_logit_scale_times_cos_with_the_models_own_projections(tiny_clip, tmp_path):
    """PickScore = logit_scale.exp() * cos(image, prompt), here with the model in one folder and its processor in
    another (as the reference loads PickScore_v1 with the LAION ViT-H processor)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.0)                                  # exp = 20.09, not the init's 14.29
    model.save_pretrained(tmp_path / "pickscore")                     # weights + config only
    (pick,) = make_metrics(["pickscore"], MetricFiles(pickscore=str(tmp_path / "pickscore"),
                                                      pickscore_processor=str(tiny_clip)))
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    rng = np.random.default_rng(7)
    output = rng.random((40, 56, 3)).astype(np.float32)
    mask = np.zeros((40, 56), bool)
    mask[5:10, 5:10] = True                                           # the whole image counts, not the crop
    for prompt in ("a red apple", "two dogs on a sofa"):
        with torch.no_grad():
            pixels = processor(images=[(output * 255).round().astype(np.uint8)], return_tensors="pt")["pixel_values"]
            tokens = processor(text=[prompt], return_tensors="pt", padding=True)
            img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)[0]
            txt = model.text_projection(model.text_model(**tokens).pooler_output)[0]
            want = math.exp(3.0) * float(img @ txt / (img.norm() * txt.norm()))
        got = pick.compute(metric_input(output, output, mask, prompt))["pickscore"]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
    with pytest.raises(MetricError, match=r"pickscore: no CLIP processor"):
        make_metrics(["pickscore"], MetricFiles(pickscore=str(tmp_path / "pickscore")))
    with pytest.raises(MetricError, match=r"--pickscore DIR"):
        make_metrics(["pickscore"], MetricFiles())


BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "red", "apple", "dog", "on", "the",
              "sofa", "two", "##s", "cat", "car"]


def tiny_image_reward(folder: Path, seed=0) -> dict:
    """Random tensors under ImageReward.pt's key names (BLIP ViT 'blip.visual_encoder.*' with 2 heads of 64, BLIP's
    BERT 'blip.text_encoder.*' with cross-attention, the head 'mlp.layers.*'), saved as the reference's plain
    state dict with a bert-base-uncased-style vocab.txt beside it."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix, n):
        return {prefix + ".weight": 1 + r(n, scale=0.1), prefix + ".bias": r(n)}

    def linear(prefix, out, inp):
        return {prefix + ".weight": r(out, inp), prefix + ".bias": r(out)}

    W, P, depth, H, layers, vocab = 128, 8, 2, 128, 2, len(BERT_WORDS) + 2
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    s = {v + "cls_token": r(1, 1, W, scale=0.5), v + "pos_embed": r(1, 17, W, scale=0.5),
         **linear(v + "patch_embed.proj", W, 3 * P * P), **norm(v + "norm", W)}
    s[v + "patch_embed.proj.weight"] = s[v + "patch_embed.proj.weight"].reshape(W, 3, P, P)
    for i in range(depth):
        b = f"{v}blocks.{i}."
        s.update({**norm(b + "norm1", W), **linear(b + "attn.qkv", 3 * W, W), **linear(b + "attn.proj", W, W),
                  **norm(b + "norm2", W), **linear(b + "mlp.fc1", 4 * W, W), **linear(b + "mlp.fc2", W, 4 * W)})
    s.update({t + "embeddings.word_embeddings.weight": r(vocab, H, scale=0.5),
              t + "embeddings.position_embeddings.weight": r(40, H, scale=0.5),
              t + "embeddings.position_ids": torch.arange(40)[None], **norm(t + "embeddings.LayerNorm", H)})
    for i in range(layers):
        b = f"{t}encoder.layer.{i}."
        for part, kv in (("attention", H), ("crossattention", W)):
            s.update({**linear(b + part + ".self.query", H, H), **linear(b + part + ".self.key", H, kv),
                      **linear(b + part + ".self.value", H, kv), **linear(b + part + ".output.dense", H, H),
                      **norm(b + part + ".output.LayerNorm", H)})
        s.update({**linear(b + "intermediate.dense", 256, H), **linear(b + "output.dense", H, 256),
                  **norm(b + "output.LayerNorm", H)})
    s.update({**linear("blip.vision_proj", 256, W), **linear("blip.text_proj", 256, H)})    # unused by the score
    for i, (out, inp) in zip((0, 2, 4, 6, 7), ((1024, H), (128, 1024), (64, 128), (16, 64), (1, 16))):
        s.update({f"mlp.layers.{i}.weight": r(out, inp, scale=0.2), f"mlp.layers.{i}.bias": r(out)})
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(s, folder / "ImageReward.pt")
    (folder / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    return s


def image_reward_by_hand(s: dict, pixels: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor) -> float:
    """The reference's forward written out on its own tensors: pre-norm ViT (LayerNorm eps 1e-6) -> all tokens;
    post-norm BERT (eps 1e-12) whose every layer self-attends (padding masked) and then attends to the image
    tokens; the [CLS] feature through the linear head; (reward - 0.16717362830052426) / 1.0333394966054072."""
    import torch.nn.functional as F

    def ln(x, p, eps):
        return F.layer_norm(x, x.shape[-1:], s[p + ".weight"], s[p + ".bias"], eps)

    def lin(x, p):
        return x @ s[p + ".weight"].T + s[p + ".bias"]

    def attend(q, k, val, bias=0.0):
        split = [x.reshape(x.shape[0], x.shape[1], -1, 64).transpose(1, 2) for x in (q, k, val)]
        weights = torch.softmax(split[0] @ split[1].transpose(-1, -2) / 8.0 + bias, dim=-1)
        out = weights @ split[2]
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    x = F.conv2d(pixels, s[v + "patch_embed.proj.weight"], s[v + "patch_embed.proj.bias"], stride=8)
    x = torch.cat([s[v + "cls_token"], x.flatten(2).transpose(1, 2)], dim=1) + s[v + "pos_embed"]
    for i in range(2):
        b = f"{v}blocks.{i}."
        q, k, val = lin(ln(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, dim=-1)
        x = x + lin(attend(q, k, val), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image = ln(x, v + "norm", 1e-6)
    y = s[t + "embeddings.word_embeddings.weight"][ids] + s[t + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    y = ln(y, t + "embeddings.LayerNorm", 1e-12)
    pad = torch.where(keep[:, None, None, :].bool(), 0.0, -1e9)
    for i in range(2):
        b = f"{t}encoder.layer.{i}."
        for part, source, bias in (("attention", y, pad), ("crossattention", image, 0.0)):
            p = b + part
            a = attend(lin(y, p + ".self.query"), lin(source, p + ".self.key"), lin(source, p + ".self.value"), bias)
            y = ln(lin(a, p + ".output.dense") + y, p + ".output.LayerNorm", 1e-12)
        y = ln(lin(F.gelu(lin(y, b + "intermediate.dense")), b + "output.dense") + y, b + "output.LayerNorm", 1e-12)
    reward = y[:, 0]
    for i in (0, 2, 4, 6, 7):
        reward = lin(reward, f"mlp.layers.{i}")
    return float((reward[0, 0] - 0.16717362830052426) / 1.0333394966054072)


def test_image_reward_equals_the_reference_forward_on_its_checkpoint_layout(tmp_path):
    from torchvision import transforms
    from transformers import BertTokenizer

    state = tiny_image_reward(tmp_path / "ir")
    (ir,) = make_metrics(["image_reward"], MetricFiles(image_reward=str(tmp_path / "ir" / "ImageReward.pt")))
    tokenizer = BertTokenizer(str(tmp_path / "ir" / "vocab.txt"))
    rng = np.random.default_rng(8)
    output = rng.random((48, 64, 3)).astype(np.float32)
    mask = np.zeros((48, 64), bool)
    mask[1:3, 1:3] = True
    preprocess = transforms.Compose([transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC),
                                     transforms.CenterCrop(32), transforms.ToTensor(),
                                     transforms.Normalize((0.48145466, 0.4578275, 0.40821073),
                                                          (0.26862954, 0.26130258, 0.27577711))])
    pixels = preprocess(Image.fromarray((output * 255).round().astype(np.uint8)))[None]
    values = []
    for prompt in ("a photo of a red apple", "two dogs on the sofa " * 10):    # the second is cut at 35 tokens
        tokens = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        with torch.no_grad():
            want = image_reward_by_hand(state, pixels, tokens["input_ids"], tokens["attention_mask"])
        got = ir.compute(metric_input(output, output, mask, prompt))["image_reward"]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
        values.append(got)
    assert values[0] != pytest.approx(values[1])


def test_image_reward_files_of_the_wrong_kind_are_named(tmp_path, tiny_clip):
    from safetensors.torch import save_file

    state = tiny_image_reward(tmp_path / "ir")
    lpips = tmp_path / "lpips.safetensors"
    save_file({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, str(lpips))
    with pytest.raises(MetricError, match=r"lpips\.safetensors: not an ImageReward checkpoint"):
        make_metrics(["image_reward"], MetricFiles(image_reward=str(lpips)))
    del state["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    torch.save(state, tmp_path / "ir" / "cut.pt")
    with pytest.raises(MetricError, match=r"cut\.pt: not an ImageReward \(BLIP text encoder\) checkpoint \(Missing"):
        make_metrics(["image_reward"], MetricFiles(image_reward=str(tmp_path / "ir" / "cut.pt")))
    with pytest.raises(MetricError, match=r"--image-reward-tokenizer"):
        make_metrics(["image_reward"], MetricFiles(image_reward=str(tmp_path / "ir" / "ImageReward.pt"),
                                                   image_reward_tokenizer=str(tmp_path)))
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "vocab.txt").write_text("\n".join(BERT_WORDS[:-3]) + "\n")
    with pytest.raises(MetricError, match=r"small: a tokenizer of 17 tokens .* embeds 20"):
        make_metrics(["image_reward"], MetricFiles(image_reward=str(tmp_path / "ir" / "ImageReward.pt"),
                                                   image_reward_tokenizer=str(tmp_path / "small")))


TINY_OPEN_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32,
                                                  "patch_size": 8},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def test_hps_v2_is_the_cosine_of_the_open_clip_features(tmp_path):
    """An HPS checkpoint ({'state_dict': ...} of an OpenCLIP model, here a tiny config) scores cos(image, prompt)
    as the reference computes it (image_features @ text_features.T of the model's forward); the image is resized
    on its long side and padded with black to a square."""
    import open_clip
    import torch.nn.functional as F

    config = tmp_path / "tiny-hps-arch.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(9)
    model = open_clip.create_model("tiny-hps-arch", pretrained=None).eval()
    with torch.no_grad():
        model.logit_scale.fill_(4.0)                                  # not part of the score
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, tmp_path / "HPS_v2.1_compressed.pt")
    files = MetricFiles(hps=str(tmp_path / "HPS_v2.1_compressed.pt"), hps_architecture=str(config))
    (hps,) = make_metrics(["hps_v2"], files)
    tokenizer = open_clip.get_tokenizer("tiny-hps-arch")
    rng = np.random.default_rng(10)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    for h, w, prompt in ((48, 48, "a red apple"), (48, 24, "a dog on a sofa"), (20, 50, "a car")):
        output = rng.random((h, w, 3)).astype(np.float32)
        x = torch.from_numpy(output).permute(2, 0, 1)[None]
        nh, nw = round(h * 32 / max(h, w)), round(w * 32 / max(h, w))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        x = F.pad(x, ((32 - nw) // 2, 32 - nw - (32 - nw) // 2, (32 - nh) // 2, 32 - nh - (32 - nh) // 2))
        with torch.no_grad():
            image_features, text_features, _ = model((x - mean) / std, tokenizer([prompt]))
            want = float((image_features @ text_features.T)[0, 0])
        got = hps.compute(metric_input(output, output, np.ones((h, w), bool), prompt))["hps_v2"]
        assert got == pytest.approx(want, abs=1e-5) and -1 <= got <= 1
    from safetensors.torch import save_file

    save_file(AestheticMLP().state_dict(), str(tmp_path / "aesthetic.safetensors"))
    with pytest.raises(MetricError, match=r"aesthetic\.safetensors: not an HPS v2 \(tiny-hps-arch\) checkpoint"):
        make_metrics(["hps_v2"], MetricFiles(hps=str(tmp_path / "aesthetic.safetensors"),
                                             hps_architecture=str(config)))
    with pytest.raises(MetricError, match=r"--hps FILE"):
        make_metrics(["hps_v2"], MetricFiles())


def test_paper_tables_add_their_preference_metrics_where_the_files_are_given():
    from faithful_inpaint.evaluation.__main__ import parse_args, table_metrics
    from faithful_inpaint.evaluation.tables import TABLES

    profi, branches = TABLES["profi-painter"], TABLES["branches"]
    assert table_metrics(profi, MetricFiles()) == ["clip_score", "clip_accuracy", "aesthetic"]
    assert table_metrics(profi, MetricFiles(pickscore="PickScore_v1"))[-1] == "pickscore"
    assert table_metrics(branches, MetricFiles(hps="HPS_v2.1_compressed.pt"))[-1] == "hps_v2"
    assert table_metrics(branches, MetricFiles(image_reward="ImageReward.pt", hps="h.pt"))[-2:] == ["image_reward",
                                                                                                   "hps_v2"]
    args = parse_args(["branches", "--dataset", "brushbench:m.json", "--out", "o", "--image-reward", "ImageReward.pt",
                       "--image-reward-tokenizer", "bert-base-uncased", "--hps", "h.pt"])
    assert (args.metrics, args.image_reward, args.image_reward_tokenizer, args.hps, args.hps_architecture) == \
        (None, "ImageReward.pt", "bert-base-uncased", "h.pt", "ViT-H-14")
