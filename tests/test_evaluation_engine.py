"""The evaluation engine end to end on the toy world (real ComfyUI sampling): the toy table's per-case results
equal the old harness's, a killed run resumes to exactly the uninterrupted results, two processes (torchrun, gloo,
accelerate's PartialState) give exactly the single-process results, and a bundled workflow runs over the cases
through one executor (models loaded once) with the outputs of running it alone."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from faithful_inpaint.benchmarks import toy_evidence as ev
from faithful_inpaint.evaluation import engine
from faithful_inpaint.evaluation.datasets import read_toy
from faithful_inpaint.evaluation.store import RunStore

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "toy_evidence_20cases_4steps.json"
QUICK = ["--cases", "4", "--steps", "3", "--only", "baseline", "--attention-cases", "0", "--grid-cases", "1"]
pytestmark = pytest.mark.usefixtures("one_thread")


def case_files(out: Path) -> dict:
    """{relative path: bytes} of every stored per-case file (records and outputs)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "cases").rglob("*")) if p.is_file()}


def results(out: Path) -> dict:
    """{variant folder/case: (metrics, output array)} -- what a run decided, without its timings."""
    got = {}
    for record in sorted((out / "cases").rglob("*.json")):
        r = json.loads(record.read_text())
        got[f"{record.parent.name}/{r['case']}"] = (r["metrics"], np.load(record.with_suffix(".npy")).tobytes())
    return got


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert ev.main(QUICK + ["--out", str(out)]) == 0
    return out


def test_toy_table_per_case_results_equal_the_old_harness(tmp_path):
    """The old harness's rows (benchmarks/toy_evidence.py before it ran on evaluation/, same seeds, saved in the
    fixture) are reproduced case by case: every score, the preservation error to float precision."""
    old = json.loads(FIXTURE.read_text())
    assert ev.main(old["argv"] + ["--out", str(tmp_path)]) == 0
    new = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert set(new) == set(old["rows"])
    for name, rows in old["rows"].items():
        assert len(new[name]) == len(rows) == 20
        for a, b in zip(new[name], rows):
            assert {k: a[k] for k in b if k not in ("mae", "changed")} == {k: b[k] for k in b if k not in ("mae",
                                                                                                         "changed")}
            assert a["mae"] == pytest.approx(b["mae"], abs=1e-6) and a["changed"] == pytest.approx(b["changed"])


def test_killed_run_resumes_to_the_uninterrupted_results(uninterrupted, tmp_path, monkeypatch):
    real, calls = ev.run_case, []

    def killed_at_the_third_case(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "run_case", killed_at_the_third_case)
    with pytest.raises(KeyboardInterrupt):
        ev.main(QUICK + ["--out", str(tmp_path)])
    stored = sorted(p.name for p in (tmp_path / "cases").rglob("*") if p.is_file())
    assert stored == ["toy-10000.json", "toy-10000.npy", "toy-10001.json", "toy-10001.npy"]   # nothing half-written
    monkeypatch.setattr(ev, "run_case", real)
    calls.clear()
    resumed = []
    monkeypatch.setattr(ev, "run_case", lambda *a, **k: resumed.append(1) or real(*a, **k))
    assert ev.main(QUICK + ["--out", str(tmp_path)]) == 0
    assert len(resumed) == 2                                               # only the two missing cases ran
    assert results(tmp_path) == results(uninterrupted)


def test_a_half_written_record_is_not_trusted(uninterrupted, tmp_path):
    import shutil

    shutil.copytree(uninterrupted / "cases", tmp_path / "cases")
    folder = next((tmp_path / "cases").iterdir())
    dataset = read_toy(4)
    store = RunStore(tmp_path, "baseline", folder.name.rsplit("-", 1)[1])
    assert store.load("toy-10000") is not None
    (folder / "toy-10000.json").write_text('{"case": "toy-10000", "key": ')        # cut off mid-write
    (folder / "toy-10001.npy").unlink()                                                 # record without its output
    record = json.loads((folder / "toy-10002.json").read_text())
    (folder / "toy-10002.json").write_text(json.dumps(dict(record, key="0" * 12)))   # another setting's record
    assert [store.load(c.id) is None for c in dataset.cases] == [True, True, True, False]


def test_two_processes_give_the_single_process_results(uninterrupted, tmp_path):
    """torchrun starts 2 CPU processes; accelerate's PartialState (gloo) gives each its index; each runs its share,
    rank 0 merges after the barrier."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29731",
           "-m", "faithful_inpaint.benchmarks.toy_evidence"] + QUICK + ["--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shard 1/2" in done.stderr or "shard 2/2" in done.stderr
    assert results(tmp_path) == results(uninterrupted)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]["baseline"]
    assert [r["case"] for r in rows] == [10000, 10001, 10002, 10003]


def toy_workflow(tmp_path) -> Path:
    from faithful_inpaint.benchmarks.evaluation_overhead import toy_ablation_workflow

    return toy_ablation_workflow(tmp_path)


def test_workflow_runs_over_the_cases_through_one_executor(tmp_path):
    import copy

    from faithful_inpaint.evaluation import generate
    from faithful_inpaint.evaluation.metrics import make_metrics, MetricFiles
    from faithful_inpaint.headless.execute import run_prompt
    from faithful_inpaint.headless.overrides import apply_overrides

    dataset = read_toy(2)
    variant = generate.workflow_variant("base", toy_workflow(tmp_path), {"steps": 3})
    metrics = make_metrics(["psnr_unmasked", "mse_unmasked"], MetricFiles())
    try:
        records = engine.run(dataset, [variant], metrics, tmp_path / "out", progress=False)["base"]
        second = generate.session().server.messages
    finally:
        generate.close_session()
    loader = next(k for k, v in variant.settings["prompt"].items() if v["class_type"] == "ToyWorldLoader")
    cached = [d["nodes"] for e, d in second if e == "execution_cached"]
    assert cached and loader in cached[0]                 # the second case reused the loaded model
    store = RunStore(tmp_path / "out", "base", engine.variant_key(variant, dataset, 0))
    workflow = json.loads(toy_workflow(tmp_path).read_text())
    from PIL import Image

    try:
        for case, record in zip(dataset.cases, records):
            assert record["seed"] == case.seed and np.isfinite(record["metrics"]["psnr_unmasked"])
            image, mask = case.inputs()
            alone = copy.deepcopy(variant.settings["prompt"])
            apply_overrides(alone, workflow, {"image": [generate.stage_png(generate.image_png(image), "image")],
                                              "mask": [generate.stage_png(generate.mask_png(mask), "mask")],
                                              "prompt": [case.prompt], "seed": [case.seed]})
            (_, _, path), = [f for f in run_prompt(alone, workflow).image_files()
                             if f[0] == variant.settings["output"]]
            assert np.array_equal(np.asarray(Image.open(path).convert("RGB")),
                                  (store.output_image(record) * 255).round().astype(np.uint8))
    finally:
        generate.close_session()                          # the run folder the staged inputs went to


def test_cli_compares_two_workflows_and_writes_the_report(tmp_path, capsys):
    """`python -m evaluation run` with the same workflow twice: paired differences exactly 0, report files written;
    an undeclared override is refused before anything runs."""
    from faithful_inpaint.evaluation.__main__ import main

    wf = toy_workflow(tmp_path)
    out = tmp_path / "out"
    args = ["run", "--dataset", "toy:2", "--workflow", f"base={wf}", "--workflow", f"again={wf}", "--set", "steps=2",
            "--metrics", "psnr_unmasked", "mse_unmasked", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["again"]["baseline"] == "base" and summary["again"]["n"] == 2
    assert summary["again"]["metrics"]["mse_unmasked"]["diff"][0] == 0.0
    html = (out / "report.html").read_text()
    assert "Paired differences" in html and html.count("data:image/png;base64") == 2      # plot and grid
    assert "| again | base |" in (out / "results.md").read_text()
    capsys.readouterr()
    assert main(args[:-6] + ["--set", "cfg_scale=3", "--out", str(tmp_path / "bad"), "--no-progress"]) == 1
    assert "declares no 'cfg_scale' target" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "cases").exists()


def test_lar_gen_row_without_refinenet_bypasses_it_in_lar_gen_json_and_runs(tmp_path):
    """LAR-Gen's 'text + image (beta 0.3)' row is lar_gen.json with its RefineNet nodes bypassed: the converted graph
    is the full one without RefineNetLoader / RefineNetApply and with the sampler fed by the image-prompt adapter's
    model; it runs over a quadruple case (random full-size smoke models, one step, 64 px crop)."""
    from PIL import Image

    from faithful_inpaint.devtools import smoke_checkpoints
    from faithful_inpaint.evaluation import generate, tables
    from faithful_inpaint.evaluation.__main__ import WORKFLOWS
    from faithful_inpaint.evaluation.datasets import read_quadruples
    from faithful_inpaint.evaluation.metrics import MetricFiles, make_metrics
    from faithful_inpaint.headless.ui_to_api import WorkflowError, convert

    row = next(r for r in tables.LAR_GEN.rows if r.name == "text + image (beta 0.3)")
    full_row = next(r for r in tables.LAR_GEN.rows if r.name == "text + image (beta 0.3) + RefineNet")
    assert row.workflow == full_row.workflow == "lar_gen.json" and "refinenet" not in row.files
    workflow = generate.load_workflow(WORKFLOWS / row.workflow)
    full = convert(workflow)
    bypassed = convert(generate.bypass_nodes(workflow, row.bypass, row.workflow))
    refine = {k for k, v in full.items() if v["class_type"] in ("RefineNetLoader", "RefineNetApply")}
    apply_id = next(k for k, v in full.items() if v["class_type"] == "ImagePromptApply")
    sampler = next(k for k, v in full.items() if v["class_type"] == "KSampler")
    assert len(refine) == 2 and full[sampler]["inputs"]["model"][0] in refine
    expected = {k: v for k, v in full.items() if k not in refine}
    expected[sampler] = dict(expected[sampler], inputs=dict(expected[sampler]["inputs"], model=[apply_id, 0]))
    assert bypassed == expected
    with pytest.raises(WorkflowError, match="no RefineNetApply node to bypass"):
        generate.bypass_nodes(generate.load_workflow(WORKFLOWS / "lar_gen_text_only.json"), ["RefineNetApply"], "x")

    models = smoke_checkpoints.default_models_dir()
    kinds = {"ckpt": "sd15_inpaint", "clip_vision": "clip_vision_h", "ipadapter": "ipadapter_sd15_plus"}
    names = smoke_checkpoints.ensure_smoke_models(models, kinds.values())
    case = tmp_path / "quads" / "c0"
    case.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(case / "image.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(case / "subject.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(case / "mask.png")
    (case / "prompt.txt").write_text("a plush toy on a table")
    try:
        values = {key: generate.run_folder().stage_model(str(models / smoke_checkpoints.folder_for(kind) / names[kind]),
                                                         smoke_checkpoints.folder_for(kind))
                  for key, kind in kinds.items()}
        variant = generate.workflow_variant(row.name, WORKFLOWS / row.workflow,
                                            {**values, **row.values, "steps": 1, "crop_size": 64}, bypass=row.bypass)
        assert not [v for v in variant.settings["prompt"].values() if "RefineNet" in v["class_type"]]
        (record,) = engine.run(read_quadruples(tmp_path / "quads"), [variant], make_metrics(["mse_unmasked"],
                               MetricFiles()), tmp_path / "out", progress=False)[row.name]
    finally:
        generate.close_session()
    assert record["case"] == "c0" and record["metrics"]["mse_unmasked"] == 0.0    # only the masked pixels change
