"""What the training tests share: the "loss falls" check, and subprocess runs: a run killed at a step (exact-resume
tests) and a two-process ``accelerate launch`` data-parallel run whose ranks dump their weights (DDP tests)."""
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from faithful_inpaint.training.core import CoreConfig, Task

ROOT = Path(__file__).resolve().parent.parent


def assert_loss_falls(losses: list[float], factor: float, last: int = 5) -> None:
    """The mean of the last ``last`` losses is below ``factor`` x the first. Overfitting a fixed batch is chaotic
    step to step (float results differ between CPUs and thread counts, and one step's value can jump), so a single
    last value would decide by chance; the mean of a few does not."""
    tail = sum(losses[-last:]) / last
    assert tail < factor * losses[0], f"mean of the last {last} losses {tail:.4f} >= {factor} x first " \
                                      f"{losses[0]:.4f}; losses: {[round(x, 4) for x in losses]}"


_KILL = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from faithful_inpaint.training import {module}

    def kill(step, losses, modules):
        if step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)       # no clean-up of any kind: a real kill

    {module}.main({argv!r}, callbacks=(kill,))
""")

_DUMP = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    from accelerate import PartialState
    from faithful_inpaint.training import {module}

    def dump(step, losses, modules):
        if step == {steps}:
            state = {{k: v.detach().clone() for k, v in modules.state_dict().items()}}
            torch.save(state, {out!r} + f"/rank{{PartialState().process_index}}.pt")

    {module}.main(sys.argv[1:], callbacks=(dump,))
""")


def run_killed(module: str, kill_at: int, argv: list, env: dict) -> None:
    """Run ``faithful_inpaint.training.<module>.main(argv)`` in a subprocess that SIGKILLs itself after step
    ``kill_at`` (no clean-up of any kind: a real kill)."""
    code = _KILL.format(root=str(ROOT), module=module, kill_at=kill_at, argv=argv)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def run_two_processes(module: str, steps: int, out: Path, script_args: list, env: dict) -> list[dict]:
    """``accelerate launch`` two CPU processes of ``faithful_inpaint.training.<module>.main(script_args + ["--cpu"])``
    and return each rank's trained weights after step ``steps``. accelerate's --cpu launcher starts one process
    (several need MPI); its torchrun launcher (--multi_gpu) starts two, and the script's --cpu makes them a CPU process group (gloo)."""
    import torch

    driver = out / "driver.py"
    driver.write_text(_DUMP.format(root=str(ROOT), module=module, steps=steps, out=str(out)))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(driver), "--cpu", *script_args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



class _Keyed(torch.utils.data.Dataset):
    """Tensors indexed by the core's ``epoch * N + index`` keys."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        return self.x[key % len(self.x)], self.y[key % len(self.x)]


class TinyTask(Task):
    """A training-core task that runs in a second: a linear layer fitting sum(x) with noise drawn from the process
    RNG, so an exact resume needs the model, optimizer, LR schedule, EMA, RNG and data position."""

    name = "tiny"

    def __init__(self):
        torch.manual_seed(0)
        self.modules = nn.ModuleDict({"net": nn.Linear(4, 1)})

    def dataset(self):
        x = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
        return _Keyed(x, x.sum(1, keepdim=True))

    def collate(self, items):
        return {"x": torch.stack([i[0] for i in items]), "y": torch.stack([i[1] for i in items])}

    def loss(self, modules, batch):
        noise = 0.01 * torch.randn_like(batch["y"])
        return {"loss": ((modules["net"](batch["x"]) + noise - batch["y"]) ** 2).mean()}

    def export(self, modules, path):
        save_file({k: v.contiguous() for k, v in modules.state_dict().items()}, str(path))
        return path

def tiny_config(out, **kw) -> CoreConfig:
    return CoreConfig(output_dir=str(out), **{**dict(max_steps=6, batch_size=2, learning_rate=1e-2, lr_warmup_steps=2,
                                                      lr_schedule="cosine", ema_decay=0.9, checkpoint_every=2,
                                                      keep_checkpoints=3, log_every=1, num_workers=0, cpu=True), **kw})


_KILL_IN_SAVE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from faithful_inpaint.training import core
    from training_drivers import TinyTask, tiny_config

    original = core.CoreStates.save

    def save(self, folder):
        if self.train_state.step == {kill_at}:
            if {where!r} == "core state":      # half of core_state.json written, then killed
                original(self, folder)
                text = (folder / core.CORE_STATE_FILE).read_text()
                (folder / core.CORE_STATE_FILE).write_text(text[: len(text) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        original(self, folder)

    core.CoreStates.save = save
    core.train(tiny_config({out!r}, max_steps={max_steps}), TinyTask())
""")


def run_tiny_killed_in_checkpoint_write(out: Path, kill_at: int, max_steps: int, where: str, env: dict) -> None:
    """Train :class:`TinyTask` in a subprocess that SIGKILLs itself while writing the checkpoint of step ``kill_at``:
    ``where`` = "core state" (accelerate's files written, core_state.json half written) or "accelerate" (right after
    accelerate's save_state, before the core's files)."""
    code = _KILL_IN_SAVE.format(root=str(ROOT), tests=str(ROOT / "tests"), kill_at=kill_at, where=where,
                                out=str(out), max_steps=max_steps)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
