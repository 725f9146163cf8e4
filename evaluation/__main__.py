"""Evaluate workflows on a benchmark: ``python -m faithful_inpaint.evaluation run|TABLE ...`` (docs/evaluation.md).

    python -m faithful_inpaint.evaluation run --dataset folder:my_bench --workflow base=example_workflows/profi_painter_ablation_base.json \\
        --workflow painta=example_workflows/profi_painter_ablation_painta.json --set ckpt=/models/sd15-inpainting.safetensors \\
        --metrics psnr_unmasked clip_score --clip /models/clip-vit-base-patch16 --out runs/mine
    python -m faithful_inpaint.evaluation profi-painter --dataset coco:annotations/instances_val2017.json,val2017 \\
        --ckpt dreamshaper_8Inpainting.safetensors --clip clip-vit-base-patch16 --aesthetic-clip clip-vit-large-patch14 \\
        --aesthetic sac+logos+ava1-l14-linearMSE.pth --out runs/profi
    accelerate launch --num_processes 4 -m faithful_inpaint.evaluation profi-painter ...  # sharded: process i of N takes its share

A killed run resumes: run the same command again. Exit status 0, 1 on an error (one ``error:`` line naming the case
or file), 3 when other shards have not finished yet (the last one to finish writes the report).
"""
from __future__ import annotations

import argparse
import os
import json
import sys
from pathlib import Path

from faithful_inpaint.evaluation import engine, report
from faithful_inpaint.evaluation.datasets import DatasetError, open_dataset
from faithful_inpaint.evaluation.metrics import METRICS, OPTIONAL_FILES, MetricError, MetricFiles, make_metrics
from faithful_inpaint.evaluation.tables import FILE_OPTIONS, TABLES
from faithful_inpaint.devtools import host

WORKFLOWS = host.PACK_ROOT / "example_workflows"


def common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="folder:DIR, jsonl:FILE, coco:ANNOTATIONS[,IMAGES], "
                   "brushbench:MAPPING[,BASE], editbench:MAPPING[,BASE], quadruples:DIR, toy[:N]")
    p.add_argument("--samples", type=int, help="COCO: number of sampled instances (default 10000, the paper's)")
    p.add_argument("--limit", type=int, help="evaluate only the first N cases (a quick look)")
    p.add_argument("--seed", type=int, default=0, help="case i is sampled with seed + i (unless the dataset fixes it); "
                   "also seeds COCO's random sample of instances")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override value for every workflow (steps=30, negative=..., a JSON value or a string)")
    p.add_argument("--out", required=True, help="folder for per-case results (resumable) and the report")
    p.add_argument("--shard-index", type=int, help="this process's share (default: accelerate's process index)")
    p.add_argument("--shard-count", type=int, help="number of shares (default: accelerate's process count)")
    p.add_argument("--comfyui-base", help="ComfyUI base directory (models/, input/, output/)")
    p.add_argument("--grid-cases", type=int, default=8, help="cases shown in report.html")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("metric model files (local; nothing is downloaded)")
    g.add_argument("--clip", help="transformers CLIP folder (clip_score, clip_accuracy, clip_similarity, clip_i)")
    g.add_argument("--aesthetic", help="LAION aesthetic MLP weights (.pth / .safetensors)")
    g.add_argument("--aesthetic-clip", help="CLIP ViT-L/14 folder for the aesthetic MLP (default: --clip)")
    g.add_argument("--dino", help="transformers DINO / DINOv2 folder (dino)")
    g.add_argument("--lpips-backbone", help="torchvision weights of the LPIPS backbone (lpips_unmasked)")
    g.add_argument("--lpips-net", default="squeeze", choices=("squeeze", "alex", "vgg"))
    g.add_argument("--pickscore", help="the PickScore_v1 folder (a transformers CLIP model; pickscore)")
    g.add_argument("--pickscore-processor", help="CLIP processor folder for PickScore when not in its folder "
                   "(the reference's: CLIP-ViT-H-14-laion2B-s32B-b79K)")
    g.add_argument("--image-reward", help="ImageReward v1.0 checkpoint, ImageReward.pt (image_reward)")
    g.add_argument("--image-reward-tokenizer", help="bert-base-uncased tokenizer folder (vocab.txt) for ImageReward "
                   "(default: ImageReward.pt's folder)")
    g.add_argument("--hps", help="HPS v2 / v2.1 checkpoint, HPS_v2(.1)_compressed.pt (hps_v2; needs open_clip_torch)")
    g.add_argument("--hps-architecture", default="ViT-H-14", help="the open_clip model the HPS file fine-tunes "
                   "(a name or a model config .json; default ViT-H-14, as HPS v2 and v2.1)")


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(items) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set {item!r}: expected KEY=VALUE")
        out[key] = parse_value(value)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m faithful_inpaint.evaluation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="any workflows on any dataset")
    r.add_argument("--workflow", action="append", required=True, metavar="NAME=PATH",
                   help="a variant: a UI workflow declaring image/mask overrides (repeat; the first is the baseline "
                        "of the others unless --baseline names another)")
    r.add_argument("--baseline", help="the variant the paired differences are taken against ('none': no pairs)")
    r.add_argument("--metrics", nargs="+", default=["psnr_unmasked", "mse_unmasked"], choices=METRICS)
    r.add_argument("--output-node", help="node id of the image to score (default: the SaveImage titled 'Result')")
    r.add_argument("--title", default="Evaluation")
    common(r)
    for table in TABLES.values():
        t = sub.add_parser(table.name, help=table.title)
        t.set_defaults(table=table.name)
        t.add_argument("--metrics", nargs="+", choices=METRICS,
                       help=f"default: {' '.join(table.metrics)}"
                            + (f", plus {' '.join(table.optional_metrics)} where their files are given"
                               if table.optional_metrics else ""))
        t.add_argument("--only", nargs="+", metavar="ROW", help="only these rows (and their baselines)")
        needed = sorted({opt for row in table.rows for opt in row.files.values()})
        for opt in needed:
            folder, text = FILE_OPTIONS[opt]
            t.add_argument(f"--{opt.replace('_', '-')}", help=f"{text} (file, or a name in models/{folder})")
        common(t)
    return p.parse_args(argv)


def table_metrics(table, files: MetricFiles) -> list[str]:
    """A table's metrics: the paper's, plus its preference metrics whose model file the user gave."""
    return list(table.metrics) + [m for m in table.optional_metrics if getattr(files, OPTIONAL_FILES[m])]


def table_variants(args, table):
    from faithful_inpaint.evaluation.generate import run_folder, workflow_variant

    rows = [r for r in table.rows if not args.only or r.name in args.only]
    names = {r.name for r in rows} | {r.baseline for r in rows if r.baseline}
    rows = [r for r in table.rows if r.name in names]
    sets = parse_sets(args.set)
    variants = []
    for row in rows:
        values = dict(row.values)
        for key, opt in row.files.items():
            given = getattr(args, opt)
            if not given:
                raise MetricError(f"row '{row.name}' needs --{opt.replace('_', '-')} ({FILE_OPTIONS[opt][1]})")
            values[key] = run_folder().stage_model(given, FILE_OPTIONS[opt][0])
        values.update(sets)
        variants.append(workflow_variant(row.name, WORKFLOWS / row.workflow, values, baseline=row.baseline,
                                         bypass=row.bypass))
    return variants


def run_variants(args):
    from faithful_inpaint.evaluation.generate import workflow_variant

    sets = parse_sets(args.set)
    pairs = []
    for item in args.workflow:
        name, sep, path = item.partition("=")
        pairs.append((name, path) if sep else (Path(item).stem, item))
    baseline = None if args.baseline == "none" else (args.baseline or pairs[0][0])
    if baseline is not None and baseline not in {n for n, _ in pairs}:
        raise MetricError(f"--baseline {baseline}: no workflow of that name")
    return [workflow_variant(name, path, sets, baseline=None if name == baseline else baseline,
                             output=args.output_node) for name, path in pairs]


def grid(dataset, records, count):
    """Input (mask shown grey) then each variant's output, for the first ``count`` cases."""
    rows = []
    for i, case in enumerate(dataset.cases[:count]):
        image, mask = case.inputs()
        shown = image.copy()
        shown[mask] = 0.5 * shown[mask] + 0.25
        row = [shown]
        for name, recs in records.items():
            row.append(records_image(recs[i]))
        rows.append(row)
    return report.image_grid(rows, ["input (mask grey)"] + list(records)) if rows else None


def records_image(record):
    import numpy as np
    from PIL import Image

    path = record.get("_folder")
    name = record.get("files", {}).get("image")
    if not path or not name:
        return None
    with Image.open(Path(path) / name) as im:
        return np.asarray(im.convert("RGB"), np.float32) / 255.0


def main(argv=None) -> int:
    args = parse_args(argv)
    from faithful_inpaint.headless.execute import RunError
    from faithful_inpaint.headless.overrides import OverrideError
    from faithful_inpaint.headless.ui_to_api import WorkflowError

    table = TABLES.get(getattr(args, "table", None) or "")
    try:
        host.start(base_directory=args.comfyui_base)
        host.load_pack_nodes()
        dataset = open_dataset(args.dataset, samples=args.samples, seed=args.seed)
        if args.limit:
            dataset.cases = dataset.cases[:args.limit]
        files = MetricFiles(args.clip, args.aesthetic_clip, args.aesthetic, args.dino, args.lpips_backbone,
                            args.lpips_net, args.pickscore, args.pickscore_processor, args.image_reward,
                            args.image_reward_tokenizer, args.hps, args.hps_architecture)
        metrics = make_metrics(args.metrics or table_metrics(table, files), files, dataset.class_names)
        variants = table_variants(args, table) if table else run_variants(args)
        index, count = engine.process_shard(args.shard_index, args.shard_count)
        try:
            engine.run(dataset, variants, metrics, args.out, base_seed=args.seed, shard_index=index,
                       shard_count=count, progress=not args.no_progress)
        finally:
            from faithful_inpaint.evaluation.generate import close_session

            close_session()
        engine.wait_for_everyone()
        if index != 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:      # rank 0 writes the report
            return 0
        records = engine.collect(dataset, variants, args.out, args.seed)
    except engine.IncompleteRun as error:
        print(f"shard done; {error}", file=sys.stderr)
        return 3
    except (DatasetError, MetricError, WorkflowError, OverrideError, RunError, host.HostNotFound, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    from faithful_inpaint.evaluation.store import RunStore

    for v in variants:
        folder = RunStore(args.out, v.name, engine.variant_key(v, dataset, args.seed)).folder
        for r in records[v.name]:
            r["_folder"] = str(folder)
    summaries = report.summarise(records, {v.name: v.baseline for v in variants})
    title = table.title if table else args.title
    notes = [f"Dataset {dataset.name}: {len(dataset.cases)} cases; seeds {args.seed} + case index; "
             f"settings {parse_sets(args.set) or 'as the workflows save them'}."] + list(table.notes if table else [])
    written = report.write(args.out, title, summaries, records, paper=table.paper if table else None, notes=notes,
                           grid=grid(dataset, records, args.grid_cases),
                           settings={"argv": sys.argv[1:] if argv is None else list(argv)})
    print((Path(args.out) / "results.md").read_text())
    print("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
