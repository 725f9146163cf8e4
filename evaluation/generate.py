"""Workflow variants: a ComfyUI workflow (UI or API format) run on every case through the runner's executor, in
one :class:`headless.execute.PromptSession` per process, so models load once, not once per case.

Per case the workflow's declared overrides (headless.overrides) get the case's image, mask, subject, prompt and
seed; keys the workflow does not declare are left alone for per-case values (an image-only workflow has no
'prompt'), but a variant value the workflow does not declare is an error.
"""
from __future__ import annotations

import copy
import io
import json
import time
from pathlib import Path

import numpy as np

from faithful_inpaint.headless.execute import PromptSession
from faithful_inpaint.headless.overrides import apply_overrides, declared_targets
from faithful_inpaint.headless.ui_to_api import WorkflowError, convert

from faithful_inpaint.evaluation.datasets import Case
from faithful_inpaint.evaluation.engine import Output, Variant

_session: PromptSession | None = None
_folder = None


def session() -> PromptSession:
    """This process's executor (created on first use)."""
    global _session
    if _session is None:
        _session = PromptSession()
    return _session


def run_folder():
    """This process's temporary run folder (headless.run.RunFolder, created on first use): the staged case images,
    linked model files and the workflows' outputs go there, nothing into the user's ComfyUI folders."""
    global _folder
    if _folder is None:
        from faithful_inpaint.headless.run import RunFolder

        _folder = RunFolder()
    return _folder


def close_session() -> None:
    """Release the executor's models and delete the run folder (ComfyUI's folders are restored)."""
    global _session, _folder
    if _session is not None:
        _session.close()
        _session = None
    if _folder is not None:
        _folder.close()
        _folder = None


def load_workflow(path: str | Path) -> dict:
    from faithful_inpaint.headless.run import load_workflow as load

    try:
        return load(str(path))
    except (OSError, json.JSONDecodeError) as error:
        raise WorkflowError(f"{path}: cannot read the workflow ({error})") from None


def is_api_format(workflow: dict) -> bool:
    return "nodes" not in workflow and all(isinstance(v, dict) and "class_type" in v for v in workflow.values())


def stage_png(data: bytes, stem: str) -> str:
    """Put PNG bytes into the run folder (RunFolder.stage_bytes); return the name LoadImage resolves."""
    return run_folder().stage_bytes(data, stem)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_png(image: np.ndarray) -> bytes:
    from PIL import Image

    return png_bytes(Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)))


def mask_png(mask: np.ndarray) -> bytes:
    """White RGB and transparent where inpainting, so LoadImageMask (any colour channel) and LoadImage's MASK
    (1 - alpha) read the same mask (as headless.run.make_test_mask)."""
    from PIL import Image

    rgba = np.where(mask[..., None], np.array([255, 255, 255, 0], np.uint8), np.array([0, 0, 0, 255], np.uint8))
    return png_bytes(Image.fromarray(rgba.astype(np.uint8), "RGBA"))


def output_node(prompt: dict, wanted: str | None) -> str:
    """The node whose first image is the case's result: ``wanted``, else the SaveImage titled 'Result', else the
    only SaveImage."""
    if wanted is not None:
        if str(wanted) not in prompt:
            raise WorkflowError(f"output node {wanted} is not in the workflow (or muted / bypassed)")
        return str(wanted)
    saves = [k for k, v in prompt.items() if v["class_type"] == "SaveImage"]
    titled = [k for k in saves if (prompt[k].get("_meta") or {}).get("title") == "Result"]
    if len(titled) == 1:
        return titled[0]
    if len(saves) == 1:
        return saves[0]
    raise WorkflowError(f"the workflow has {len(saves)} SaveImage nodes and none titled 'Result'; name the one to "
                        "score with --output-node ID")


def bypass_nodes(workflow: dict, types, path) -> dict:
    """A copy of the UI workflow with every node of the given types bypassed (mode 4, the UI's Ctrl+B): the
    conversion drops them and their consumers take their matching input (a bypassed loader feeding only bypassed
    nodes simply disappears). Each type must be in the workflow."""
    workflow = copy.deepcopy(workflow)
    for typ in types:
        found = [n for n in workflow.get("nodes", []) if n.get("type") == typ]
        if not found:
            raise WorkflowError(f"{path}: no {typ} node to bypass")
        for node in found:
            node["mode"] = 4
    return workflow


def workflow_variant(name: str, path: str | Path, values: dict | None = None, *, baseline: str | None = None,
                     output: str | None = None, bypass=()) -> Variant:
    """A variant that runs the workflow at ``path`` with the override ``values`` ({key: value or [values]}) and the
    nodes of the types in ``bypass`` bypassed."""
    workflow = load_workflow(path)
    api = is_api_format(workflow)
    if bypass:
        if api:
            raise WorkflowError(f"{path}: bypassing nodes needs a UI workflow")
        workflow = bypass_nodes(workflow, bypass, path)
    prompt = copy.deepcopy(workflow) if api else convert(workflow)    # groups, notes, reroutes: as the runner does
    declared = set() if api else set(declared_targets(workflow))
    if not {"image", "mask"} <= declared:
        raise WorkflowError(f"{path}: an evaluated workflow must be a UI workflow declaring 'image' and 'mask' "
                            "override targets (extra.faithful_inpaint.overrides; see headless/overrides.py)")
    values = {k: (v if isinstance(v, list) else [v]) for k, v in (values or {}).items()}
    if values:
        apply_overrides(prompt, workflow, values)                       # errors now, for undeclared keys
    node = output_node(prompt, output)
    settings = {"prompt": prompt, "output": node}

    def generate(case: Case, image: np.ndarray, mask: np.ndarray, seed: int) -> Output:
        per_case = {"image": [stage_png(image_png(image), "image")], "mask": [stage_png(mask_png(mask), "mask")],
                    "prompt": [case.prompt], "seed": [seed]}
        if case.load_subject is not None:
            per_case["subject"] = [stage_png(image_png(case.load_subject()), "subject")]
        per_case = {k: v for k, v in per_case.items() if k in declared}
        run_prompt = copy.deepcopy(prompt)
        apply_overrides(run_prompt, workflow, per_case)
        import comfy.utils

        shown = comfy.utils.PROGRESS_BAR_ENABLED
        comfy.utils.set_progress_bar_enabled(False)     # no sampler bar per case: the engine's case bar has the ETA
        started = time.perf_counter()
        try:
            result = session().run(run_prompt, None if api else workflow)
        finally:
            comfy.utils.set_progress_bar_enabled(shown)
        seconds = time.perf_counter() - started
        files = [p for node_id, i, p in result.image_files() if node_id == node]
        if not files:
            raise WorkflowError(f"case {case.id}: output node {node} saved no image")
        from PIL import Image

        with Image.open(files[0]) as im:
            out = np.asarray(im.convert("RGB"), np.float32) / 255.0
        return Output(image=out, seconds=seconds)

    return Variant(name, generate, settings, baseline)
