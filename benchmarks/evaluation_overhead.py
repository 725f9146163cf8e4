"""Harness overhead: time per case of the evaluation engine running a workflow over a dataset, against the same
workflow run alone (the same prompts through the same warm executor, inputs staged beforehand), at toy size.

    .venv/bin/python -m faithful_inpaint.benchmarks.evaluation_overhead --cases 10 --steps 20

The workflow is the bundled ProFI-Painter ablation base (example_workflows/profi_painter_ablation_base.json) with the toy
9-channel model in place of the SD1.5 checkpoint (256 px, the toy world's cases). Both sides are warmed up by one
case first (model load); they alternate (alone, harness, harness + metrics, repeated) so that a change of machine
load shows up as a difference between the repeats; wall and CPU time of the process are both printed. The harness side includes staging the case's image and mask, the
per-case record and output writes, and (second figure) the masked PSNR / MSE metrics.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from faithful_inpaint.devtools import host

ROOT = Path(__file__).resolve().parent.parent


def toy_ablation_workflow(folder: Path) -> Path:
    """example_workflows/profi_painter_ablation_base.json with ToyWorldLoader (toy_world_inpaint) as its checkpoint."""
    workflow = json.loads((ROOT / "example_workflows" / "profi_painter_ablation_base.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            node["type"], node["widgets_values"] = "ToyWorldLoader", ["toy_world_inpaint.safetensors"]
    path = Path(folder) / "toy_ablation_base.json"
    path.write_text(json.dumps(workflow))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="alone / harness / harness + metrics, repeated")
    args = p.parse_args(argv)
    host.start()
    host.load_pack_nodes()
    from faithful_inpaint.evaluation import engine, generate
    from faithful_inpaint.evaluation.datasets import read_toy
    from faithful_inpaint.evaluation.metrics import MetricFiles, make_metrics
    from faithful_inpaint.headless.overrides import apply_overrides

    scratch = Path(tempfile.mkdtemp(prefix="eval-overhead-"))
    path = toy_ablation_workflow(scratch)
    workflow = json.loads(path.read_text())
    dataset = read_toy(args.cases + 1)
    variant = generate.workflow_variant("base", path, {"steps": args.steps})
    prompts = []
    for case in dataset.cases:
        image, mask = case.inputs()
        prompt = copy.deepcopy(variant.settings["prompt"])
        apply_overrides(prompt, workflow, {"image": [generate.stage_png(generate.image_png(image), "image")],
                                           "mask": [generate.stage_png(generate.mask_png(mask), "mask")],
                                           "prompt": [case.prompt], "seed": [case.seed]})
        prompts.append(prompt)
    import comfy.utils

    comfy.utils.set_progress_bar_enabled(False)                     # as the engine runs cases: no sampler bars
    session = generate.session()
    session.run(prompts[0], workflow)                                # warm-up: loads the model
    warm = dataset.cases[:1]
    dataset.cases = dataset.cases[1:]
    metrics = make_metrics(["psnr_unmasked", "mse_unmasked"], MetricFiles())

    def timed(fn):
        """(wall, CPU) seconds per case: the CPU time of this process is the steadier figure on a shared machine."""
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return ((time.perf_counter() - wall) / args.cases, (time.process_time() - cpu) / args.cases)

    def alone():
        for prompt in prompts[1:]:
            session.run(prompt, workflow)

    def harness(with_metrics: bool):
        out = Path(tempfile.mkdtemp(dir=scratch))
        engine.run(dataset, [variant], metrics if with_metrics else [], out, progress=False)

    del warm
    rounds = []
    for _ in range(args.rounds):
        rounds.append((timed(alone), timed(lambda: harness(False)), timed(lambda: harness(True))))
    generate.close_session()
    print(f"toy world, 256 px, {args.steps} steps, {args.cases} cases, torch threads {torch.get_num_threads()}; "
          "per case, wall s / CPU s: alone | harness | harness + masked PSNR/MSE | overhead (CPU)")
    for (aw, ac), (hw, hc), (mw, mc) in rounds:
        print(f"  {aw:.3f} / {ac:.3f} | {hw:.3f} / {hc:.3f} | {mw:.3f} / {mc:.3f} | "
              f"{100 * (hc / ac - 1):+.1f}% / {100 * (mc / ac - 1):+.1f}%")
    a, h, m = (sum(r[i][1] for r in rounds) / len(rounds) for i in range(3))
    print(f"mean CPU s per case: alone {a:.3f}, harness {h:.3f} ({100 * (h / a - 1):+.1f}%), with metrics {m:.3f} "
          f"({100 * (m / a - 1):+.1f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
