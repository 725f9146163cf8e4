"""The evaluation loop: every case of a dataset through every variant (a workflow, a setting, a toy mechanism),
per-case seeds, results stored per case (resume), this process's shard only, metrics per case, progress with ETA.

A variant's generator is any callable ``(case, image, mask, seed) -> Output``; :mod:`evaluation.generate` runs
ComfyUI workflows through one executor, ``benchmarks/toy_evidence.py`` samples the toy world's mechanisms.
"""
from __future__ import annotations

import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from faithful_inpaint.evaluation.datasets import Case, Dataset
from faithful_inpaint.evaluation.store import RunStore, run_key


@dataclass
class Output:
    image: np.ndarray | None = None      # float32 [H, W, 3] in [0, 1]: the generated image
    array: np.ndarray | None = None      # any other result kept exactly (the toy world's cells)
    seconds: float = math.nan            # generation time of the case
    extra: dict = field(default_factory=dict)


@dataclass
class Variant:
    name: str
    generate: Callable[[Case, np.ndarray, np.ndarray, int], Output]
    settings: dict                       # everything that decides the output: hashed into the run key
    baseline: str | None = None          # the variant its paired differences are taken against
    setup: Callable[[], Any] | None = None   # called once before its first case in a process


@dataclass
class MetricInput:
    case: Case
    image: np.ndarray | None             # the case's input image
    mask: np.ndarray | None              # bool, True = inpaint
    output: np.ndarray | None            # the generated image
    array: np.ndarray | None             # the variant's exact array output, if any


class Metric:
    """A metric: ``name``, ``fields`` (the values it writes) and ``compute(MetricInput) -> {field: value}``."""
    name: str = "?"
    fields: tuple[str, ...] = ()

    def compute(self, inp: MetricInput) -> dict:
        raise NotImplementedError


def process_shard(index: int | None = None, count: int | None = None) -> tuple[int, int]:
    """(index, count) of this process: given, else from accelerate's PartialState when launched with several
    processes (``accelerate launch`` / torchrun set WORLD_SIZE), else (0, 1)."""
    if index is not None and count is not None:
        if not 0 <= index < count:
            raise ValueError(f"shard {index} of {count} does not exist")
        return index, count
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=not _cuda())
        return state.process_index, state.num_processes
    return 0, 1


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def shard(cases: Sequence[Case], index: int, count: int) -> list[Case]:
    """Process ``index`` of ``count`` takes every ``count``-th case from its index (dataset order)."""
    return list(cases[index::count])


def case_seed(case: Case, base_seed: int) -> int:
    return case.seed if case.seed is not None else base_seed + case.index


def variant_key(variant: Variant, dataset: Dataset, base_seed: int) -> str:
    return run_key({"variant": variant.settings, "dataset": dataset.name, "seed": base_seed})


class _Progress:
    """A tqdm bar over every (variant, case) of this shard, with the ETA; quiet when told."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="case", file=sys.stderr, dynamic_ncols=True)

    def update(self, n=1, note: str | None = None):
        if self.bar is not None:
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def peak_memory() -> dict:
    """Peak memory of this process so far: the CUDA allocator's peak since the last reset on a GPU, and the
    resident set's high-water mark (bytes)."""
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if _cuda():
        import torch

        out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def _reset_gpu_peak():
    if _cuda():
        import torch

        torch.cuda.reset_peak_memory_stats()


def evaluate_case(metrics: Sequence[Metric], inp: MetricInput) -> dict:
    values = {}
    for metric in metrics:
        values.update(metric.compute(inp))
    return values


def run(dataset: Dataset, variants: Sequence[Variant], metrics: Sequence[Metric], out: str | Path, *,
        base_seed: int = 0, shard_index: int | None = None, shard_count: int | None = None,
        progress: bool = True) -> dict[str, list[dict]]:
    """Generate and score this process's shard of ``dataset`` for every variant; cases already stored under the same
    key are skipped (their missing metrics computed from the stored output). Returns {variant: records of this
    shard, dataset order}."""
    index, count = process_shard(shard_index, shard_count)
    mine = shard(dataset.cases, index, count)
    names = [m.name for m in metrics]
    stores = {v.name: RunStore(out, v.name, variant_key(v, dataset, base_seed)) for v in variants}
    todo = {v.name: [c for c in mine if _needs(stores[v.name], c, names)] for v in variants}
    bar = _Progress(sum(len(t) for t in todo.values()), progress,
                    f"shard {index + 1}/{count}" if count > 1 else "evaluating")
    results: dict[str, list[dict]] = {}
    try:
        for variant in variants:
            store = stores[variant.name]
            if todo[variant.name] and variant.setup is not None:
                variant.setup()
            records = []
            for case in mine:
                record = store.load(case.id)
                if record is not None and all(n in record.get("metric_set", []) for n in names):
                    records.append(record)
                    continue
                if record is not None:               # generated before; only metrics are missing
                    record = _add_metrics(store, record, case, metrics)
                else:
                    record = _generate(store, variant, case, metrics, base_seed)
                records.append(record)
                bar.update(1, f"{variant.name}: {case.id}")
            results[variant.name] = records
    finally:
        bar.close()
    return results


def _needs(store: RunStore, case: Case, names: list[str]) -> bool:
    record = store.load(case.id)
    return record is None or not all(n in record.get("metric_set", []) for n in names)


def _generate(store: RunStore, variant: Variant, case: Case, metrics, base_seed: int) -> dict:
    image, mask = case.inputs()
    seed = case_seed(case, base_seed)
    _reset_gpu_peak()
    started = time.perf_counter()
    output = variant.generate(case, image, mask, seed)
    wall = time.perf_counter() - started
    if output.image is not None and output.image.shape[:2] != image.shape[:2]:
        from PIL import Image

        resized = Image.fromarray((np.clip(output.image, 0, 1) * 255).round().astype(np.uint8))
        output.image = np.asarray(resized.resize(image.shape[1::-1], Image.BICUBIC), np.float32) / 255.0
    values = evaluate_case(metrics, MetricInput(case, image, mask, _png_roundtrip(output.image), output.array))
    record = {"case": case.id, "index": case.index, "seed": seed, "variant": variant.name,
              "seconds": output.seconds if math.isfinite(output.seconds) else wall, "wall_seconds": wall,
              **peak_memory(), **output.extra, "metrics": values, "metric_set": [m.name for m in metrics]}
    return store.save(record, image=output.image, array=output.array)


def _png_roundtrip(image: np.ndarray | None) -> np.ndarray | None:
    """The image as it is stored (8-bit PNG), so metrics computed now equal metrics computed on resume."""
    if image is None:
        return None
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8).astype(np.float32) / 255.0


def _add_metrics(store: RunStore, record: dict, case: Case, metrics) -> dict:
    missing = [m for m in metrics if m.name not in record.get("metric_set", [])]
    image, mask = case.inputs()
    values = evaluate_case(missing, MetricInput(case, image, mask, store.output_image(record),
                                                store.output_array(record)))
    record = dict(record, metrics={**record.get("metrics", {}), **values},
                  metric_set=list(record.get("metric_set", [])) + [m.name for m in missing])
    return store.save(record)


class IncompleteRun(RuntimeError):
    """Some cases of a variant have no stored result yet (another shard still running, or a killed run)."""


def collect(dataset: Dataset, variants: Sequence[Variant], out: str | Path, base_seed: int = 0) -> dict[str, list[dict]]:
    """Every case's record of every variant, in dataset order, whichever process wrote it (the merge)."""
    results, missing = {}, {}
    for v in variants:
        store = RunStore(out, v.name, variant_key(v, dataset, base_seed))
        records = [store.load(c.id) for c in dataset.cases]
        lost = [c.id for c, r in zip(dataset.cases, records) if r is None]
        if lost:
            missing[v.name] = lost
        results[v.name] = records
    if missing:
        detail = "; ".join(f"{name}: {len(ids)} (first {ids[0]})" for name, ids in missing.items())
        raise IncompleteRun(f"cases without results in {out}: {detail}; run the missing shards (or the same command "
                            "again: it resumes)")
    return results


def wait_for_everyone() -> None:
    """Barrier between the processes of a distributed launch (no-op in a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
