"""Run a ComfyUI workflow headless: the UI's Queue button, from the command line.

    python -m faithful_inpaint.headless.run [WORKFLOW.json] [--out DIR] [--image PATH] [--mask PATH] [--subject PATH]
                           [--prompt TEXT] [--negative TEXT] [--seed N] [--steps N] [--ckpt FILE ...] [--branch FILE]
                           [--smoke] [--comfyui-base DIR]

WORKFLOW is a workflow saved by ComfyUI's UI (or a PNG ComfyUI saved, which embeds it; an API-format prompt runs
as it is, without overrides). Without it the runner runs the toy-world demo, ``example_workflows/toy_world_demo.json``
(PAIntA on the pack's own small inpainting model: no download, no checkpoint); with ``--ckpt`` and no WORKFLOW,
``example_workflows/profi_painter.json`` on that checkpoint. The workflow is converted with the live node definitions
(:mod:`headless.ui_to_api`), the overrides it declares are applied (:mod:`headless.overrides`), and the prompt runs
through ComfyUI's real ``validate_prompt`` + ``PromptExecutor`` (:mod:`headless.execute`); a validation error on any
output fails the run.
Every image of every SaveImage / PreviewImage node is written as ``<workflow>-<node id>-<node title>-<NN>.png``
into ``--out`` (default ``./output``), with the prompt and workflow embedded as ComfyUI embeds them.

Each run has its own temporary folder (:class:`RunFolder`), registered with ComfyUI for that run only: ComfyUI's
output and temp folders point into it, ``--image`` / ``--mask`` / ``--subject`` files are checked (a truncated or
unreadable image is refused, naming the path) and copied there, and a ``--ckpt`` / ``--branch`` file outside
ComfyUI's model folders is linked into a model folder added there; nothing is written into the user's ComfyUI folders,
and the folder is removed after the run. ``--ckpt`` takes a checkpoint file or the name of one ComfyUI already lists;
``--branch`` likewise takes an inpainting branch file for ``models/inpaint`` (BrushNet, PowerPaint, or one trained
with ``training/``).
``--smoke`` runs without real weights: it generates random-weight model files with the real shapes
(``devtools.smoke_checkpoints``) for the kinds the workflow's ``extra.faithful_inpaint.smoke`` names, plus a test
image and a centred rectangular mask (and a subject image, for workflows that declare a 'subject' override) when none
are given; THE OUTPUT IS THEN NOISE. ``--comfyui-base`` selects ComfyUI's models/, input/, output/ folders (default:
ComfyUI's own; ``.smoke/comfyui`` of this repository with ``--smoke``). Exit status: 0 on success, 1 when
the workflow or ComfyUI reports an error (printed as one ``error:`` line with node id, type and message; ``-v`` also
shows ComfyUI's own log of it, traceback included; an output node ComfyUI drops, e.g. for a cycle in its inputs,
is such an error), 130 when interrupted.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shutil
import sys
import tempfile
from pathlib import Path

from faithful_inpaint.devtools import host
from faithful_inpaint.headless.execute import RunError, RunInterrupted, interrupt_on_ctrl_c, run_prompt
from faithful_inpaint.headless.overrides import OverrideError, apply_overrides, declared_targets, pack_extra
from faithful_inpaint.headless.ui_to_api import WorkflowError, convert

WORKFLOWS = host.PACK_ROOT / "example_workflows"
TOY_DEMO, CKPT_DEFAULT = WORKFLOWS / "toy_world_demo.json", WORKFLOWS / "profi_painter.json"
NOISE_BANNER = "SMOKE MODE: random-weight models, the output images are NOISE (this checks the plumbing, not quality)."
DEFAULT_SMOKE_IMAGE_SIZE = (256, 256)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m faithful_inpaint.headless.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workflow", nargs="?",
                   help="workflow saved by ComfyUI's UI (.json), or a PNG that embeds one (default: "
                        "example_workflows/toy_world_demo.json, the toy-world demo; with --ckpt: "
                        "example_workflows/profi_painter.json)")
    p.add_argument("--out", default="output", help="folder for the output PNGs (default: ./output)")
    p.add_argument("--image", help="input image file (override 'image')")
    p.add_argument("--mask", help="mask file, white = inpaint (override 'mask')")
    p.add_argument("--subject", help="subject image file for image-prompt workflows (override 'subject')")
    p.add_argument("--prompt", help="positive prompt text (override 'prompt')")
    p.add_argument("--negative", help="negative prompt text (override 'negative')")
    p.add_argument("--seed", type=int, help="sampler seed (override 'seed')")
    p.add_argument("--steps", type=int, help="sampler steps (override 'steps')")
    p.add_argument("--ckpt", nargs="+", metavar="FILE", help="checkpoint file(s) or name(s) (override 'ckpt')")
    p.add_argument("--branch", metavar="FILE", help="inpainting branch file or name in models/inpaint: BrushNet, "
                                                    "PowerPaint or one trained with training/ (override 'branch')")
    p.add_argument("--smoke", action="store_true", help="random-weight models; the output is noise")
    p.add_argument("--comfyui-base", help="ComfyUI base directory (models/, input/, output/)")
    p.add_argument("-v", "--verbose", action="store_true", help="show ComfyUI's info log")
    return p.parse_args(argv)


def default_workflow(ckpt) -> Path:
    """The workflow run when none is named: the toy-world demo, or ProFI-Painter when a checkpoint is given."""
    return CKPT_DEFAULT if ckpt else TOY_DEMO


def not_comfyui_error_log(record: logging.LogRecord) -> bool:
    """Logging filter: drops ComfyUI's own log of a failed node or prompt (execution.py, with the traceback); the
    runner reports the same error as one ``error:`` line."""
    return not (record.levelno >= logging.ERROR and record.module == "execution")


def load_workflow(path: str) -> dict:
    if path.lower().endswith(".png"):
        from PIL import Image

        text = Image.open(path).info.get("workflow")
        if not text:
            raise WorkflowError(f"{path} carries no ComfyUI workflow")
        return json.loads(text)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class RunFolder:
    """One run's temporary folder, registered with ComfyUI while the run lasts: its ``output/`` and ``temp/`` are
    ComfyUI's output and temp folders, staged input files go to ``temp/`` (named ``"<name> [temp]"``, the
    annotation LoadImage / LoadImageMask resolve), model files to ``models/<folder>/`` added first in that model
    folder's search list. :meth:`close` restores ComfyUI's folders and deletes it."""

    def __init__(self):
        import folder_paths

        self.root = Path(tempfile.mkdtemp(prefix="faithful-inpaint-run-"))
        self.previous = (folder_paths.get_output_directory(), folder_paths.get_temp_directory())
        self.model_paths: list[tuple[str, str]] = []
        for sub in ("output", "temp"):
            (self.root / sub).mkdir()
        folder_paths.set_output_directory(str(self.root / "output"))
        folder_paths.set_temp_directory(str(self.root / "temp"))

    def stage_input(self, path: str, option: str = "--image") -> str:
        """Copy a user's image under a content-hashed name; a file PIL cannot fully decode is refused here (ComfyUI's
        LoadImage would retry it as a truncated image and go on with grey pixels)."""
        check_image_file(path, option)
        return self.stage_bytes(Path(path).read_bytes(), Path(path).stem, Path(path).suffix or ".png")

    def stage_bytes(self, data: bytes, stem: str, suffix: str = ".png") -> str:
        """Write image bytes to ``temp/`` under a content-hashed name; return the name LoadImage resolves."""
        name = f"{stem}-{hashlib.sha1(data).hexdigest()[:10]}{suffix}"
        target = self.root / "temp" / name
        if not target.exists():
            target.write_bytes(data)
        return f"{name} [temp]"

    def stage_model(self, path_or_name: str, folder: str = "checkpoints") -> str:
        """A model file outside ComfyUI's ``folder`` paths is linked into this run's ``models/<folder>``; a file inside
        them, or a bare name, is passed through as ComfyUI names it."""
        import folder_paths

        source = Path(path_or_name).expanduser()
        if not source.is_file():
            return path_or_name
        source = source.resolve()
        for root in folder_paths.get_folder_paths(folder):
            if source.is_relative_to(Path(root).resolve()):
                return source.relative_to(Path(root).resolve()).as_posix()
        target_dir = self.root / "models" / folder
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / source.name
        if target.exists() and target.resolve() != source:
            raise OverrideError(f"two different files named {source.name} given for {folder}")
        if not target.exists():
            try:
                target.symlink_to(source)
            except OSError:
                shutil.copyfile(source, target)
        if (folder, str(target_dir)) not in self.model_paths:
            folder_paths.add_model_folder_path(folder, str(target_dir), is_default=True)  # first: it wins a name clash
            self.model_paths.append((folder, str(target_dir)))
            folder_paths.filename_list_cache.pop(folder, None)
        return source.name

    def close(self) -> None:
        import folder_paths

        for folder, path in self.model_paths:
            paths = folder_paths.folder_names_and_paths[folder][0]
            if path in paths:
                paths.remove(path)
            folder_paths.filename_list_cache.pop(folder, None)
        self.model_paths = []
        folder_paths.set_output_directory(self.previous[0])
        folder_paths.set_temp_directory(self.previous[1])
        shutil.rmtree(self.root, ignore_errors=True)


def check_image_file(path: str, option: str) -> None:
    """Decode ``path`` completely (truncated images are errors here, whatever ComfyUI set globally)."""
    from PIL import Image, ImageFile, UnidentifiedImageError

    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise OverrideError(f"{option} {path}: not a complete image file ({err})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def make_test_image(size):
    """A simple, recognisable RGB test image: gradient background, a disc and a bar."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    draw = ImageDraw.Draw(img)
    draw.ellipse((w * 0.15, h * 0.2, w * 0.55, h * 0.6), fill=(200, 60, 40))
    draw.rectangle((w * 0.5, h * 0.65, w * 0.9, h * 0.8), fill=(40, 90, 200))
    return img


def make_test_mask(size):
    """Centred rectangle (half the width and height) marked for inpainting under every loader convention:
    white RGB (LoadImageMask red/green/blue) and transparent (alpha: ComfyUI's mask is 1 - alpha)."""
    from PIL import Image, ImageDraw

    w, h = size
    mask = Image.new("RGBA", (w, h), (0, 0, 0, 255))
    ImageDraw.Draw(mask).rectangle((w // 4, h // 4, w - w // 4 - 1, h - h // 4 - 1), fill=(255, 255, 255, 0))
    return mask


def make_test_subject(size):
    """A subject for image-prompt workflows: a striped orange ball on white, the size of the test image."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.ellipse((w * 0.2, h * 0.2, w * 0.8, h * 0.8), fill=(240, 140, 30))
    for i in range(3):
        y = h * (0.35 + 0.12 * i)
        draw.line((w * 0.25, y, w * 0.75, y), fill=(90, 40, 10), width=max(1, h // 40))
    return img


def smoke_model_kinds(workflow: dict) -> dict[str, list[str]]:
    """The overrides whose smoke value names random-weight model kinds (devtools.smoke_checkpoints.KINDS)."""
    from faithful_inpaint.devtools import smoke_checkpoints

    out = {}
    for key, value in (pack_extra(workflow).get("smoke") or {}).items():
        kinds = value if isinstance(value, list) else [value]
        if kinds and all(isinstance(k, str) and k in smoke_checkpoints.KINDS for k in kinds):
            out[key] = kinds
    return out


def smoke_values(workflow: dict, given: dict, folder: RunFolder) -> dict:
    """Override values for a smoke run: generated model files, test image and mask, smoke defaults."""
    import folder_paths

    from faithful_inpaint.devtools import smoke_checkpoints

    smoke = pack_extra(workflow).get("smoke") or {}
    size = tuple(smoke.get("image_size") or DEFAULT_SMOKE_IMAGE_SIZE)
    values = {}
    models_dir = smoke_checkpoints.default_models_dir()
    model_kinds = smoke_model_kinds(workflow)
    for key, value in smoke.items():
        if key == "image_size" or key in given:
            continue
        if key in model_kinds:
            kinds = model_kinds[key]
            values[key] = []
            for kind in kinds:  # one kind per target of the key, in order
                print(f"Smoke: random-weight '{kind}' model for '{key}' (generated once into {models_dir}) ...")
                values[key].append(smoke_checkpoints.ensure_smoke_models(models_dir, [kind])[kind])
                kind_folder = smoke_checkpoints.folder_for(kind)
                folder_paths.add_model_folder_path(kind_folder, str(Path(models_dir) / kind_folder))
        else:
            values[key] = [value]
    targets = declared_targets(workflow)
    scratch = folder.root / "smoke"
    scratch.mkdir(exist_ok=True)
    for key, maker in (("image", make_test_image), ("mask", make_test_mask), ("subject", make_test_subject)):
        if key in targets and key not in given:
            path = scratch / f"smoke-{key}-{size[0]}x{size[1]}.png"
            maker(size).save(path)
            values[key] = [folder.stage_input(str(path), f"smoke {key}")]
    return values


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-") or "node"


def write_outputs(result, prompt: dict, workflow_path: str, out_dir: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for node_id, index, source in result.image_files():
        node = prompt[node_id]
        title = (node.get("_meta") or {}).get("title") or node["class_type"]
        target = out / f"{_slug(Path(workflow_path).stem)}-{node_id}-{_slug(title)}-{index:02d}.png"
        shutil.copyfile(source, target)
        written.append(target)
    return written


class Progress:
    """Prints what the browser would show: the node being executed and sampler steps."""

    def __init__(self, prompt: dict):
        self.prompt = prompt
        self.tty = sys.stdout.isatty()

    def __call__(self, event: str, data: dict):
        if event == "executing" and data.get("node") is not None:
            node = self.prompt.get(str(data["node"]), {})
            title = (node.get("_meta") or {}).get("title") or node.get("class_type")
            print(f"  node {data['node']} ({title}) ...", flush=True)
        elif event == "progress":
            end = "\n" if data["value"] >= data["max"] or not self.tty else "\r"
            print(f"    step {data['value']}/{data['max']}", end=end, flush=True)
        elif event == "execution_cached" and data.get("nodes"):
            print(f"  cached: {', '.join(map(str, data['nodes']))}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.workflow is None:
        args.workflow = str(default_workflow(args.ckpt))
        what = "ProFI-Painter on your checkpoint" if args.ckpt else "the toy-world demo (the pack's own small model)"
        print(f"No workflow given: running {what}, {args.workflow}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.verbose:
        logging.getLogger().removeFilter(not_comfyui_error_log)
    else:
        logging.getLogger().addFilter(not_comfyui_error_log)
    base = args.comfyui_base or (str(host.PACK_ROOT / ".smoke" / "comfyui") if args.smoke else None)
    folder = None
    try:
        workflow = load_workflow(args.workflow)
        host.start(base_directory=base)
        host.load_pack_nodes()
        api_format = "nodes" not in workflow and all(isinstance(v, dict) and "class_type" in v
                                                     for v in workflow.values())
        prompt = workflow if api_format else convert(workflow)
        folder = RunFolder()
        given = {key: value for key, value in (
            ("prompt", [args.prompt] if args.prompt is not None else None),
            ("negative", [args.negative] if args.negative is not None else None),
            ("seed", [args.seed] if args.seed is not None else None),
            ("steps", [args.steps] if args.steps is not None else None),
            ("image", [folder.stage_input(args.image, "--image")] if args.image else None),
            ("mask", [folder.stage_input(args.mask, "--mask")] if args.mask else None),
            ("subject", [folder.stage_input(args.subject, "--subject")] if args.subject else None),
            ("ckpt", [folder.stage_model(c) for c in args.ckpt] if args.ckpt else None),
            ("branch", [folder.stage_model(args.branch, "inpaint")] if args.branch else None),
        ) if value is not None}
        values = dict(given)
        # The banner only where smoke mode really puts random-weight models in (not the toy demo's own files).
        random_models = args.smoke and any(key not in given for key in smoke_model_kinds(workflow))
        if random_models:
            print(NOISE_BANNER)
        if args.smoke:
            values.update(smoke_values(workflow, given, folder))
        apply_overrides(prompt, workflow, values)
        print(f"Running {args.workflow}: {len(prompt)} nodes")
        with interrupt_on_ctrl_c():
            result = run_prompt(prompt, None if api_format else workflow, on_message=Progress(prompt))
        written = write_outputs(result, prompt, args.workflow, args.out)
    except RunInterrupted as error:
        print(f"error: {error}", file=sys.stderr)
        return 130
    except (WorkflowError, OverrideError, RunError, host.HostNotFound, OSError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130
    finally:
        if folder is not None:
            folder.close()
    for path in written:
        print(f"wrote {path}")
    if not written:
        print("The workflow ran but saved no images (no SaveImage / PreviewImage node produced output).")
    if random_models:
        print(NOISE_BANNER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
