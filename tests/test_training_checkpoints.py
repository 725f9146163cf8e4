"""Training-core checkpoints as files (issue 18): the core's own states are JSON + safetensors, a checkpoint folder
holding a pickle that could run code is refused by name (and the code never runs), and a kill while a checkpoint
is being written leaves the previous one complete and the run resumable exactly."""
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from faithful_inpaint.training.core import CORE_STATE_FILE, EMA_FILE, CheckpointRefused, checkpoints, train
from training_drivers import TinyTask, run_tiny_killed_in_checkpoint_write, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this creates ``marker`` (builtins.open with mode "w"): real code from a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class Stop(Exception):
    pass


def stop_at(step):
    def cb(s, losses, modules):
        if s == step:
            raise Stop
    return cb


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out) / "log.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = train(tiny_config(out), TinyTask())
    return out, result


def test_core_states_are_json_and_safetensors_and_resume_is_exact(straight, tmp_path):
    out, result = straight
    ckpt = checkpoints(out / "checkpoints")[-1]
    assert not list(ckpt.glob("custom_checkpoint_*"))
    record = json.loads((ckpt / CORE_STATE_FILE).read_text())
    assert record["train_state"]["step"] == 6 and record["ema"]["updates"] == 6
    assert record["scheduler"]["last_epoch"] == 6
    assert set(load_file(ckpt / EMA_FILE)) == {"net.weight", "net.bias"}

    with pytest.raises(Stop):
        train(tiny_config(tmp_path), TinyTask(), callbacks=(stop_at(5),))
    assert [p.name for p in checkpoints(tmp_path / "checkpoints")] == ["checkpoint-00000002", "checkpoint-00000004"]
    resumed = train(tiny_config(tmp_path), TinyTask())
    assert [s for s, _ in resumed.losses] == [5, 6]
    assert losses(out) == losses(tmp_path)            # steps 5 and 6: same batches, noise, LR and weights
    a, b = load_file(result.export), load_file(resumed.export)   # exported with the EMA applied
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"])
def test_a_malicious_pickle_in_a_checkpoint_is_refused_and_never_runs(straight, tmp_path, name):
    out, _ = straight
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Payload(tmp_path / "control")))      # the payload is real: plain pickle runs it
    assert (tmp_path / "control").exists()

    run = tmp_path / "run"
    bad = run / "checkpoints" / "checkpoint-00000004"
    shutil.copytree(checkpoints(out / "checkpoints")[1], bad)
    torch.save({"state": Payload(marker)}, bad / name) if name.endswith(".bin") else \
        (bad / name).write_bytes(pickle.dumps({"state": Payload(marker)}))
    for resume in ("latest", str(bad)):                  # dropped into output-dir/checkpoints, or named
        with pytest.raises(CheckpointRefused, match="refused") as err:
            train(tiny_config(run, resume=resume), TinyTask())
        assert name in str(err.value) or str(bad) in str(err.value)
        assert not marker.exists()


def test_a_checkpoint_without_the_core_state_is_refused(straight, tmp_path):
    out, _ = straight
    bad = tmp_path / "checkpoints" / "checkpoint-00000004"
    shutil.copytree(checkpoints(out / "checkpoints")[1], bad)
    (bad / CORE_STATE_FILE).unlink()
    with pytest.raises(CheckpointRefused, match=CORE_STATE_FILE):
        train(tiny_config(tmp_path), TinyTask())


@pytest.mark.parametrize("where", ["accelerate", "core state"])
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(straight, tmp_path, where):
    out, result = straight
    run_tiny_killed_in_checkpoint_write(tmp_path, kill_at=4, max_steps=6, where=where,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert [p.name for p in checkpoints(tmp_path / "checkpoints")] == ["checkpoint-00000002"]
    assert (tmp_path / "checkpoints" / "checkpoint-00000004.tmp").is_dir()      # the half-written one
    resumed = train(tiny_config(tmp_path), TinyTask())
    assert [s for s, _ in resumed.losses] == [3, 4, 5, 6]
    assert not (tmp_path / "checkpoints" / "checkpoint-00000004.tmp").exists()
    assert losses(out) == losses(tmp_path)
    a, b = load_file(result.export), load_file(resumed.export)
    assert all(torch.equal(a[k], b[k]) for k in a)
