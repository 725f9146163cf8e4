"""Bad node input (issue 18): every combo input of every pack node is checked in ``execute`` (the pinned ComfyUI
does not check V3 combo values, so a saved workflow's stale value reaches the node), and bad images and masks are
refused with a NodeInputError naming the node and the input, on the pack's real toy models."""
import os

import pytest
import torch
from comfy_api.latest import io

import comfy.sample
import comfy.samplers
from faithful_inpaint.nodes import MODULES
from faithful_inpaint.nodes import brush_branch as nbb
from faithful_inpaint.nodes import image_prompt as nip
from faithful_inpaint.nodes import painta as npa
from faithful_inpaint.nodes import rasg as nrasg
from faithful_inpaint.nodes import toy_world as ntw
from faithful_inpaint.patching import rasg
from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.headless.execute import RunError, run_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

PACK_NODES = [cls for module in MODULES for cls in module.NODES]
COMBOS = [(cls, inp.id) for cls in PACK_NODES for inp in cls.define_schema().inputs
          if isinstance(inp, io.Combo.Input)]


def refused(node: str, input_name: str):
    """pytest.raises for a NodeInputError naming exactly this node and input."""
    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(NodeInputError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            swallowed = self.ctx.__exit__(*exc)
            err = self.info.value
            assert (err.node, err.input_name) == (node, input_name), str(err)
            assert f"{node}, input '{input_name}'" in str(err)
            return swallowed
    return Check()


@pytest.mark.parametrize("cls, combo", COMBOS, ids=[f"{c.define_schema().node_id}.{i}" for c, i in COMBOS])
def test_every_combo_input_of_every_pack_node_is_checked_before_anything_else(cls, combo):
    """A value outside the choices is refused first thing, naming node and input, whatever the other inputs are
    (here None: nothing else is looked at before the check)."""
    schema = cls.define_schema()
    kwargs = {i.id: None for i in schema.inputs}
    for i in schema.inputs:
        if isinstance(i, io.Combo.Input):
            kwargs[i.id] = i.default if i.default is not None else (i.options[0] if i.options else None)
    kwargs[combo] = "bogus"
    with refused(schema.node_id, combo):
        cls.execute(**kwargs)


def test_a_bad_combo_value_in_a_saved_workflow_fails_through_comfyuis_engine_naming_node_and_input():
    prompt = {"1": {"class_type": "ToyWorldScene", "inputs": {"seed": 1, "kind": "bogus"}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    # ComfyUI 0.3.75 passes V3 combo values unchecked, so the node's own check answers; newer hosts (0.12.1) refuse
    # the value in their own validation, naming node and input too.
    with pytest.raises(RunError, match=r"ToyWorldScene.*(input 'kind': 'bogus' is not one of its choices"
                                       r"|Value not in list: kind: 'bogus')"):
        run_prompt(prompt)


@pytest.fixture(scope="module")
def toy():
    with torch.inference_mode():
        plain = ntw.ToyWorldLoader.execute("toy_world.safetensors").result
        inpaint = ntw.ToyWorldLoader.execute("toy_world_inpaint.safetensors").result
        (clip_vision,) = ntw.ToyWorldClipVisionLoader.execute(ntw.CLIP_VISION_FILE).result
    return {"plain": plain, "inpaint": inpaint, "clip_vision": clip_vision}


def scene(seed=1):
    image, mask, prompt, _, subject = ntw.ToyWorldScene.execute(seed, "nearby").result
    return image, mask, prompt, subject


def encode(clip, text):
    return [[clip.encode_from_tokens(clip.tokenize(text)), {}]]


BAD_IMAGES = {
    "NaN pixels": lambda img: img.clone().fill_(float("nan")),
    "one channel": lambda img: img[..., :1],
    "zero size": lambda img: img[:, :0, :0],
    "empty batch": lambda img: img[:0],
    "4 x 4 px": lambda img: img[:, :4, :4],
}


@pytest.mark.parametrize("bad", list(BAD_IMAGES))
def test_brush_branch_apply_refuses_a_bad_image_and_leaves_the_model_alone(toy, bad):
    model, clip, vae = toy["plain"]
    branch = nbb.load_branch(str(ntw.PACK_TOY_DIR / "toy_brushnet.safetensors"))
    image, mask, prompt, _ = scene()
    with torch.inference_mode():
        pos, neg = encode(clip, prompt), encode(clip, "")
    args = dict(model=model, branch=branch, vae=vae, mask=mask, positive=pos, negative=neg, strength=1.0, start=0.0,
                end=1.0)
    patches_before = dict(model.model_options["transformer_options"].get("patches", {}))
    with torch.inference_mode():
        with refused("BrushBranchApply", "image"):
            nbb.BrushBranchApply.execute(image=BAD_IMAGES[bad](image), **args)
        patched, _, _, latent = nbb.BrushBranchApply.execute(image=image, **args).result   # the good image works
    assert torch.isfinite(latent["samples"]).all() and patched is not model
    assert dict(model.model_options["transformer_options"].get("patches", {})) == patches_before


def test_brush_branch_apply_refuses_an_image_given_as_mask(toy):
    model, clip, vae = toy["plain"]
    branch = nbb.load_branch(str(ntw.PACK_TOY_DIR / "toy_brushnet.safetensors"))
    image, mask, prompt, _ = scene()
    with torch.inference_mode(), refused("BrushBranchApply", "mask"):
        nbb.BrushBranchApply.execute(model=model, branch=branch, vae=vae, image=image, mask=image.movedim(-1, 1),
                                     positive=None, negative=None, strength=1.0, start=0.0, end=1.0)


@pytest.mark.parametrize("bad", ["zero size", "empty batch", "one channel", "NaN pixels"])
def test_image_prompt_apply_refuses_a_bad_subject(toy, bad):
    model, clip, _ = toy["inpaint"]
    (adapter,) = nip.load_adapter(str(ntw.PACK_TOY_DIR / "toy_image_prompt.safetensors")),
    _, _, _, subject = scene()
    with torch.inference_mode(), refused("ImagePromptApply", "image"):
        nip.ImagePromptApply.execute(model=model, adapter=adapter, clip_vision=toy["clip_vision"],
                                     image=BAD_IMAGES[bad](subject), beta=1.0, start_percent=0.0, end_percent=1.0,
                                     mode=nip.ip.BOTH)


def test_painta_refuses_an_image_shaped_mask(toy):
    model, clip, _ = toy["inpaint"]
    _, mask, prompt, _ = scene()
    bad = mask[:, None].expand(1, 3, *mask.shape[-2:])                   # [1, 3, H, W]
    with torch.inference_mode(), refused("PAIntAPatch", "mask"):
        npa.PAIntAPatch.execute(model=model, clip=clip, prompt=prompt, mask=bad, at_h8=False, at_h16=True,
                                at_h32=True, at_h64=False, start_percent=0.0, end_percent=0.5, smoothing=0.7071)


def test_rasg_refuses_a_mask_batch_that_does_not_fit_the_latent_batch(toy):
    model, clip, _ = toy["plain"]
    _, mask, prompt, _ = scene()
    with torch.inference_mode():
        (guided,) = nrasg.RASGGuidance.execute(model=model, clip=clip, prompt=prompt,
                                               attention_resolution="1/16", mask=mask.repeat(2, 1, 1)).result
        (sampler,) = nrasg.RASGSampler.execute(eta=0.15, sigma_rule="paper (eq. 11)", guide_start=0.0,
                                               guide_end=1.0).result
        pos, neg = encode(clip, prompt), encode(clip, "")
        latent = torch.zeros(3, 4, 32, 32)
        sigmas = comfy.samplers.calculate_sigmas(guided.get_model_object("model_sampling"), "ddim_uniform", 2)
        with refused(rasg.GUIDANCE_NODE, "mask"):
            comfy.sample.sample_custom(guided, torch.randn_like(latent), 4.0, sampler, sigmas, pos, neg, latent,
                                       seed=1, disable_pbar=True)


def test_ip_adapter_files_with_adapter_modules_keys_load_like_ip_adapter_ones(tmp_path):
    """IP-Adapter's training code saves the attention layers as adapter_modules.*; IPAdapter_plus reads those (flat
    and nested), and so does the loader: the same adapter, weight for weight."""
    from safetensors.torch import load_file, save_file

    flat = load_file(str(ntw.PACK_TOY_DIR / "toy_image_prompt.safetensors"))
    renamed = {("adapter_modules" + k[len("ip_adapter"):] if k.startswith("ip_adapter.") else k): v
               for k, v in flat.items()}
    assert any(k.startswith("adapter_modules.") for k in renamed)
    save_file(renamed, str(tmp_path / "adapter_modules.safetensors"))
    nested = {"image_proj": {k[len("image_proj."):]: v for k, v in flat.items() if k.startswith("image_proj.")},
              "adapter_modules": {k[len("ip_adapter."):]: v for k, v in flat.items() if k.startswith("ip_adapter.")}}
    torch.save(nested, tmp_path / "adapter_modules.bin")
    reference = nip.load_adapter(str(ntw.PACK_TOY_DIR / "toy_image_prompt.safetensors")).state_dict()
    for name in ("adapter_modules.safetensors", "adapter_modules.bin"):
        loaded = nip.load_adapter(str(tmp_path / name)).state_dict()
        assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)
    both = dict(flat, **{k: v.clone() for k, v in renamed.items() if k.startswith("adapter_modules.")})
    save_file(both, str(tmp_path / "both.safetensors"))
    with refused("ImagePromptAdapterLoader", "adapter_name"):
        nip.load_adapter(str(tmp_path / "both.safetensors"))


class Payload:
    """Unpickling this creates ``marker`` (builtins.open with mode "w"): code that runs from a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


LOADERS = [  # node, its file input, model folder, a real file of that kind
    ("ImagePromptAdapterLoader", "adapter_name", "ipadapter", "toy_image_prompt.safetensors"),
    ("RefineNetLoader", "refinenet_name", "refinenet", "toy_refinenet.safetensors"),
    ("ToyWorldLoader", "checkpoint", "toy_world", "toy_world.safetensors"),
    ("ToyWorldClipVisionLoader", "clip_vision", "toy_world", "toy_clip_vision.safetensors"),
    ("BrushBranchLoader", "branch_name", "inpaint", "toy_brushnet.safetensors"),
]


@pytest.mark.parametrize("node, input_name, folder, real", LOADERS, ids=[n for n, *_ in LOADERS])
@pytest.mark.parametrize("damage", ["truncated", "random bytes", "malicious pickle .bin",
                                    "malicious pickle .safetensors"])
def test_loaders_refuse_truncated_random_and_malicious_files_naming_node_and_input(tmp_path, node, input_name,
                                                                                  folder, real, damage):
    import folder_paths
    import nodes

    marker = tmp_path / "pwned"
    data = (ntw.PACK_TOY_DIR / real).read_bytes()
    name = {"truncated": "cut.safetensors", "random bytes": "noise.safetensors", "malicious pickle .bin": "evil.bin",
            "malicious pickle .safetensors": "evil.safetensors"}[damage]
    files = tmp_path / "models"
    files.mkdir()
    if damage == "truncated":
        (files / name).write_bytes(data[: len(data) // 2])
    elif damage == "random bytes":
        (files / name).write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                 dtype=torch.uint8).numpy().tobytes())
    else:
        torch.save({"weight": torch.zeros(2), "payload": Payload(marker)}, files / name)
    paths = folder_paths.folder_names_and_paths[folder][0]
    paths.insert(0, str(files))
    folder_paths.filename_list_cache.pop(folder, None)
    try:
        assert name in folder_paths.get_filename_list(folder)
        with torch.inference_mode(), refused(node, input_name) as err:
            nodes.NODE_CLASS_MAPPINGS[node].execute(**{input_name: name})
        assert name in str(err.value)
    finally:
        paths.remove(str(files))
        folder_paths.filename_list_cache.pop(folder, None)
    assert not marker.exists()


def test_a_powerpaint_text_encoder_without_its_transformer_is_refused(tmp_path):
    """A file with PowerPaint's task vectors but not the CLIP-L text transformer loaded without a word (ComfyUI logs
    the missing keys and encodes with uninitialised weights); now it is refused, naming what is missing."""
    from safetensors.torch import save_file

    from faithful_inpaint.kernels import brush_files
    from faithful_inpaint.patching.brush_branch import load_powerpaint_text_encoder

    sd = {key: torch.randn(10, 768) for key in brush_files.powerpaint_task_keys().values()}
    sd["text_model.final_layer_norm.weight"] = torch.ones(768)
    save_file(sd, str(tmp_path / "pp_text_encoder.safetensors"))
    with refused("BrushBranchLoader", "powerpaint_text_encoder") as err:
        load_powerpaint_text_encoder(str(tmp_path / "pp_text_encoder.safetensors"))
    assert "pp_text_encoder.safetensors is not a complete PowerPaint text encoder" in str(err.value)
    assert "of the CLIP-L text transformer are missing" in str(err.value)


def test_branch_files_in_models_brushnet_are_listed_and_loaded(tmp_path):
    """Some users keep BrushNet files in models/brushnet: the loader lists them beside models/inpaint's and loads
    them; a name in both folders is models/inpaint's."""
    import shutil

    import folder_paths

    assert os.path.join(folder_paths.models_dir, "brushnet") in folder_paths.get_folder_paths("brushnet")
    brushnet = tmp_path / "brushnet"
    brushnet.mkdir()
    shutil.copy(ntw.PACK_TOY_DIR / "toy_brushnet.safetensors", brushnet / "users_brushnet.safetensors")
    paths = folder_paths.folder_names_and_paths["brushnet"][0]
    paths.insert(0, str(brushnet))
    folder_paths.filename_list_cache.pop("brushnet", None)
    try:
        options = next(i.options for i in nbb.BrushBranchLoader.define_schema().inputs if i.id == "branch_name")
        assert "users_brushnet.safetensors" in options
        with torch.inference_mode():
            (branch,) = nbb.BrushBranchLoader.execute("users_brushnet.safetensors").result
        assert branch.name == "users_brushnet.safetensors" and branch.kind.kind == "brushnet"
        with refused("BrushBranchLoader", "branch_name") as err:
            nbb.BrushBranchLoader.execute("nowhere.safetensors")
        assert "not in models/inpaint or models/brushnet" in str(err.value)
    finally:
        paths.remove(str(brushnet))
        folder_paths.filename_list_cache.pop("brushnet", None)
