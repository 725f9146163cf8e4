"""What the training tests share: the "loss falls" check, and subprocess runs: a run killed at a step (exact-resume
tests) and a two-process ``accelerate launch`` data-parallel run whose ranks dump their weights (DDP tests)."""
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

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
