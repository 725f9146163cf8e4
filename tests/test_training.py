"""Branch training on a tiny random SD1.5 (ComfyUI's own UNet and CLIP, a small VAE): overfitting, exact resume
after a real kill, gradient checkpointing, and the exported file in the loader node and ComfyUI's sampling."""
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from faithful_inpaint.training import train_branch
from faithful_inpaint.training.core import checkpoints
from faithful_inpaint.training.data import collate
from faithful_inpaint.training.make_synthetic_data import write_dataset
from training_drivers import assert_loss_falls, run_killed


pytestmark = pytest.mark.usefixtures("one_thread")


def one_thread_env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), count=12, size=32, per_shard=6, seed=0)


def argv(data_dir, out, *extra):
    # object masks only: the captions are the 12 local ones, so the (full-size, random) CLIP encodes few prompts
    return ["--base", "random:sd15", "--data", str(data_dir), "--output-dir", str(out), "--resolution", "32",
            "--batch-size", "2", "--num-workers", "0", "--lr", "1e-3", "--lr-warmup-steps", "2",
            "--object-prob", "1", "--caption-dropout", "0", "--log-every", "1", "--num-validation", "2",
            "--validation-steps", "3", *extra]


def make_task(data_dir, tmp_path, *extra):
    args = train_branch.parser().parse_args(argv(data_dir, tmp_path, *extra))
    task = train_branch.BranchTask(args)
    task.setup(torch.device("cpu"), torch.float32)
    data = task.dataset()
    batch = task.prepare(collate([data[i] for i in range(4)]))
    return task, batch


def step_loss(task, batch, seed=0):
    torch.manual_seed(seed)                 # the same noise and timesteps: a truly fixed batch
    return task.loss(task.modules, batch)


def test_a_fixed_batch_is_overfitted(data_dir, tmp_path):
    task, batch = make_task(data_dir, tmp_path)
    # At lr 1e-2 the mean of the last 5 of 40 steps was 0.02-0.05 x the first (noise seed 0 with 1 and 2 threads,
    # seed 1 with 1 thread).
    opt = torch.optim.AdamW(task.param_groups(1e-2), weight_decay=0.0)
    losses = []
    for _ in range(40):
        loss = step_loss(task, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert_loss_falls(losses, 0.5)


def test_a_painternet_step_trains_every_parameter_attention_control_points_included(data_dir, tmp_path):
    """The ACP reach the UNet through the shared injection path, so one step gives their zero-initialised weights a
    non-zero gradient; no trainable parameter is left without a gradient (DDP runs without find_unused_parameters)."""
    task, batch = make_task(data_dir, tmp_path, "--recipe", "painternet")
    step_loss(task, batch)["loss"].backward()
    unused = [n for n, p in task.modules.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused
    acp = task.modules["branch"].attention_control_points
    assert len(acp) > 0 and all(p.grad.abs().sum() > 0 for p in acp.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(data_dir, tmp_path):
    task, batch = make_task(data_dir, tmp_path, "--recipe", "powerpaint-atal")
    # a branch that already adds something, so gradients flow through the frozen UNet's checkpointed blocks
    with torch.no_grad():
        for n, p in task.modules["branch"].named_parameters():
            if n.startswith("brushnet_"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))

    def grads():
        task.modules.zero_grad()
        losses = step_loss(task, batch)
        losses["loss"].backward()
        return {k: float(v.detach()) for k, v in losses.items()}, [p.grad.clone() for p in task.modules.parameters()]

    plain_losses, plain = grads()
    assert plain_losses["atal"] > 0
    task.enable_gradient_checkpointing()
    ckpt_losses, ckpt = grads()
    assert ckpt_losses == pytest.approx(plain_losses, rel=1e-5)
    for a, b in zip(plain, ckpt):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def _log(out):
    return {r["step"]: r for r in map(json.loads, (Path(out) / "log.jsonl").read_text().splitlines())}


def test_kill_and_resume_continues_exactly(data_dir, tmp_path):
    """An uninterrupted run and a run SIGKILLed mid-way then restarted end with identical losses, optimizer state,
    weights and exported file."""
    common = ("--max-steps", "8", "--checkpoint-every", "4", "--keep-checkpoints", "2", "--ema-decay", "0.9")
    straight = train_branch.main(argv(data_dir, tmp_path / "straight", *common))

    killed = tmp_path / "killed"
    run_killed("train_branch", 6, argv(data_dir, killed, *common), one_thread_env())
    assert [p.name for p in checkpoints(killed / "checkpoints")] == ["checkpoint-00000004"]
    assert not (killed / "brushnet-branch.safetensors").exists()

    resumed = train_branch.main(argv(data_dir, killed, *common))
    assert resumed.step == 8 and [s for s, _ in resumed.losses] == [5, 6, 7, 8]

    a, b = _log(tmp_path / "straight"), _log(killed)
    for step in range(1, 9):                         # steps 5 and 6 were run twice in the killed folder: same
        assert a[step]["loss"] == b[step]["loss"], step
    assert dict(straight.losses)[8] == dict(resumed.losses)[8]

    ca, cb = (p / "checkpoints" / "checkpoint-00000008" for p in (tmp_path / "straight", killed))
    wa, wb = load_file(ca / "model.safetensors"), load_file(cb / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = (torch.load(c / "optimizer.bin", weights_only=False) for c in (ca, cb))
    assert oa["param_groups"] == ob["param_groups"]
    for i, state in oa["state"].items():
        assert all(torch.equal(state[k], ob["state"][i][k]) for k in state)
    ea, eb = (load_file(p / "brushnet-branch.safetensors") for p in (tmp_path / "straight", killed))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    # rotation kept the newest two; validation images were written
    assert [p.name for p in checkpoints(ca.parent)] == ["checkpoint-00000004", "checkpoint-00000008"]
    assert (tmp_path / "straight" / "validation" / "step-00000008.png").is_file()


def test_exported_branch_loads_in_the_node_and_samples(data_dir, tmp_path):
    """The exported file is recognised by BrushBranchLoader's reader as the pack's own branch, loads strictly with
    the trained weights, and changes ComfyUI's sampling through BrushBranchApply."""
    import comfy.sample
    from faithful_inpaint.nodes.brush_branch import BrushBranchApply
    from faithful_inpaint.patching.brush_branch import load_branch
    from faithful_inpaint.training.base import FrozenBase

    result = train_branch.main(argv(data_dir, tmp_path, "--max-steps", "3", "--checkpoint-every", "0",
                                    "--num-validation", "0"))
    path = result.export
    loaded = load_branch(str(path))
    assert loaded.kind.kind == "brushnet" and not loaded.kind.public
    trained = load_file(path)
    assert any(k.startswith("brushnet_down_blocks.") and v.abs().sum() > 0 for k, v in trained.items())
    state = loaded.patcher.model.state_dict()
    assert state.keys() == trained.keys() and all(torch.equal(state[k].float(), trained[k]) for k in state)

    base = FrozenBase("random:sd15", torch.device("cpu"))
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1
    text = base.encode_text(["a red circle"])
    positive = [[text.context, {}]]
    negative = [[base.encode_text([""]).context, {}]]

    def run(strength):
        model, pos, neg, latent = BrushBranchApply.execute(base.patcher, loaded, base.vae, image, mask, positive,
                                                           negative, strength, 0.0, 1.0).args
        noise = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            return comfy.sample.sample(model, noise, 3, 5.0, "euler", "normal", pos, neg, latent["samples"])

    with_branch, without = run(1.0), run(0.0)
    assert with_branch.shape == (1, 4, 4, 4) and torch.isfinite(with_branch).all()
    assert not torch.allclose(with_branch, without)


@pytest.mark.parametrize("recipe, extra", [
    ("painternet", ("--gradient-checkpointing",)),            # ATAL + ACP through patching.painternet
    # noise + style + edge; the style VGG's 3 poolings before relu4_3 need an 8x8 latent
    ("mtadiffusion", ("--ema-decay", "0.9", "--edge-reduction", "mean", "--resolution", "64")),
])
def test_recipes_train_and_export_files_the_loader_reads(data_dir, tmp_path, recipe, extra):
    from faithful_inpaint.patching.brush_branch import load_branch

    result = train_branch.main(argv(data_dir, tmp_path, "--recipe", recipe, "--max-steps", "2",
                                    "--checkpoint-every", "0", "--num-validation", "1", *extra))
    losses = dict(result.losses)[2]
    expected = {"painternet": {"noise", "atal"}, "mtadiffusion": {"noise", "style", "edge"}}[recipe]
    assert set(losses) == expected | {"loss"} and all(math.isfinite(v) for v in losses.values())
    loaded = load_branch(str(result.export))
    assert loaded.kind.kind == recipe
    trained = load_file(result.export)
    state = loaded.patcher.model.state_dict()
    assert state.keys() == trained.keys() and all(torch.equal(state[k].float(), trained[k]) for k in state)
    assert (tmp_path / "validation" / "step-00000002.png").is_file()


def test_learning_rate_schedules():
    from faithful_inpaint.training.core import lr_factor

    constant = lr_factor("constant", warmup=4, max_steps=20)
    assert [constant(s) for s in (0, 3, 4, 19)] == [0.25, 1.0, 1.0, 1.0]
    cosine = lr_factor("cosine", warmup=4, max_steps=20)
    assert [cosine(s) for s in (0, 3)] == [0.25, 1.0]                     # the same linear warm-up
    assert cosine(4) == 1.0 and cosine(12) == pytest.approx(0.5) and cosine(20) == pytest.approx(0.0)
    assert all(cosine(s) >= cosine(s + 1) for s in range(4, 20))          # decays monotonically after it
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor("linear", warmup=0, max_steps=10)
