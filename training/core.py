"""The training core every training script of the pack shares (branches, LAR-Gen's two stages, the toy world).

What it does, once, for every task:
  * ``accelerate``: one or many GPUs / nodes (DDP), DeepSpeed or FSDP from ``accelerate config``, mixed precision
    (``--mixed_precision`` of ``accelerate launch`` or the config file), gradient accumulation;
  * AdamW with per-module parameter groups, constant learning rate after a linear warm-up, gradient clipping;
  * an exponential moving average of the trained weights (optional, used for validation and export);
  * logging (``log.jsonl`` in the output folder, plus TensorBoard / W&B through accelerate's trackers);
  * checkpoints every N steps, written to ``checkpoint-XXXXXXXX.tmp`` and renamed when complete (a kill never
    leaves a half-written checkpoint that looks complete), the oldest beyond ``keep_checkpoints`` deleted; the
    core's own states (LR schedule, train state, EMA) are JSON + safetensors, never pickles, and a checkpoint
    holding a pickle that does not load with ``weights_only`` is refused (:class:`CheckpointRefused`);
  * EXACT resume from the newest complete checkpoint: model, optimizer, scheduler, EMA, every process's RNG
    states (accelerate), and the data position (epoch and micro-batches consumed, see ``ResumableSampler``);
    a run resumed after a kill continues with the same batches, noise and weights as an uninterrupted one
    (same number of processes and batch size required; otherwise it continues at the nearest position);
  * validation images on the main process every N steps, export of the trained weights at the end.

A task (see :class:`Task`) supplies the trainable modules, the data set and the loss; the core does the rest.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from faithful_inpaint.training.data import ResumableSampler

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
CORE_STATE_FILE = "core_state.json"         # LR schedule, train state, EMA step count (JSON)
EMA_FILE = "ema.safetensors"                # the EMA's shadow weights
ACCELERATE_PICKLES = re.compile(r"^random_states_\d+\.pkl$")   # accelerate's RNG states, read with weights_only


class CheckpointRefused(RuntimeError):
    """A checkpoint folder holds a file the core will not load (a pickle that is not plain tensors and numbers,
    or one it did not write); the message names the file."""


LR_SCHEDULES = ("constant", "cosine")


@dataclass
class CoreConfig:
    output_dir: str
    max_steps: int = 1000
    batch_size: int = 4                   # per process and micro-step
    gradient_accumulation: int = 1
    learning_rate: float = 1e-5
    lr_warmup_steps: int = 0
    lr_schedule: str = "constant"         # after the warm-up: "constant" | "cosine" (to 0 at max_steps)
    weight_decay: float = 1e-2
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0            # 0: no clipping
    mixed_precision: Optional[str] = None # None: as accelerate launch / config says; "no" | "fp16" | "bf16"
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0                # 0: no EMA; e.g. 0.9999
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validate_every: int = 0               # 0: only at the end
    log_every: int = 10
    log_with: Optional[str] = None        # "tensorboard" | "wandb" | None
    seed: int = 0
    num_workers: int = 2
    resume: str = "latest"                # "latest" | "none" | a checkpoint folder
    find_unused_parameters: bool = False
    cpu: bool = False                     # force the CPU (several CPU processes: gloo)


def add_core_options(optimisation: argparse._ArgumentGroup, checkpoints: argparse._ArgumentGroup, *,
                     max_steps: int, lr: Optional[float], lr_help: str, max_steps_help: Optional[str] = None,
                     output_dir_required: bool = True) -> None:
    """The command-line options of :class:`CoreConfig` every training script shares (``--output-dir``,
    ``--batch-size``, ``--lr``, ``--resume`` ...), added to the script's optimisation and checkpoint groups."""
    g = optimisation
    g.add_argument("--output-dir", required=output_dir_required)
    g.add_argument("--max-steps", type=int, default=max_steps, help=max_steps_help)
    g.add_argument("--batch-size", type=int, default=4, help="per process and micro-step")
    g.add_argument("--gradient-accumulation", type=int, default=1)
    g.add_argument("--lr", type=float, default=lr, help=lr_help)
    g.add_argument("--lr-warmup-steps", type=int, default=500)
    g.add_argument("--lr-schedule", default="constant", choices=list(LR_SCHEDULES),
                   help="after the warm-up: constant, or cosine decay to 0 at --max-steps")
    g.add_argument("--weight-decay", type=float, default=1e-2)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"],
                   help="default: as accelerate launch / accelerate config says")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--ema-decay", type=float, default=0.0, help="0 = no EMA (e.g. 0.9999)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-workers", type=int, default=2)
    g.add_argument("--cpu", action="store_true",
                   help="train on the CPU even if a GPU is present; with several processes they talk over gloo")
    g = checkpoints
    g.add_argument("--checkpoint-every", type=int, default=500)
    g.add_argument("--keep-checkpoints", type=int, default=3)
    g.add_argument("--resume", default="latest", help="latest | none | a checkpoint folder")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--log-with", default=None, choices=["tensorboard", "wandb"])
    g.add_argument("--export-dtype", default="fp32", choices=["fp32", "fp16", "bf16"])


def core_config_from_args(args: argparse.Namespace, **overrides) -> CoreConfig:
    """The :class:`CoreConfig` of the options :func:`add_core_options` added; ``overrides`` set other fields
    (or replace one, e.g. a recipe's default ``learning_rate``)."""
    fields = dict(
        output_dir=args.output_dir, max_steps=args.max_steps, batch_size=args.batch_size,
        gradient_accumulation=args.gradient_accumulation, learning_rate=args.lr,
        lr_warmup_steps=args.lr_warmup_steps, lr_schedule=args.lr_schedule, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        ema_decay=args.ema_decay, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        log_every=args.log_every, log_with=args.log_with, seed=args.seed, num_workers=args.num_workers,
        resume=args.resume, cpu=args.cpu)
    fields.update(overrides)
    return CoreConfig(**fields)


class Task:
    """What a recipe provides to the core. ``modules`` are the trainable modules (an ``nn.ModuleDict``)."""

    modules: nn.ModuleDict
    name: str = "model"

    def setup(self, device: torch.device, frozen_dtype: torch.dtype) -> None:
        """Load frozen models on ``device`` (called before the optimizer is built)."""

    def param_groups(self, learning_rate: float) -> list[dict]:
        return [{"params": [p for p in self.modules.parameters() if p.requires_grad], "lr": learning_rate}]

    def dataset(self) -> torch.utils.data.Dataset:
        """Map-style; item key = epoch * len(dataset) + index (see :class:`training.data.ShardDataset`)."""
        raise NotImplementedError

    def collate(self, items: list) -> dict:
        raise NotImplementedError

    def prepare(self, batch: dict) -> dict:
        """Frozen, gradient-free work on a batch (VAE, text encoder), outside the DDP forward."""
        return batch

    def loss(self, modules: nn.ModuleDict, batch: dict) -> dict:
        """{"loss": total, other named terms...} for one micro-batch."""
        raise NotImplementedError

    def enable_gradient_checkpointing(self) -> None:
        raise NotImplementedError

    def validate(self, modules: nn.ModuleDict, step: int, folder: Path) -> Optional[Path]:
        return None

    def export(self, modules: nn.ModuleDict, path: Path) -> Path:
        raise NotImplementedError


class TaskModule(nn.Module):
    """The one module accelerate wraps (DDP needs the loss computed inside its forward)."""

    def __init__(self, task: Task):
        super().__init__()
        self.trainable = task.modules
        self.task = task

    def forward(self, batch: dict) -> dict:
        return self.task.loss(self.trainable, batch)


class EMA:
    """Exponential moving average of trainable parameters (fp32 shadow), decay warmed up as
    min(decay, (1 + n) / (10 + n)) after n updates (the usual diffusers warm-up)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].mul_(d).add_(p.detach().float().to(self.shadow[n].device), alpha=1 - d)

    @contextmanager
    def applied(self, module: nn.Module):
        """Temporarily load the averaged weights into ``module``."""
        saved = {}
        with torch.no_grad():
            for n, p in module.named_parameters():
                if n in self.shadow:
                    saved[n] = p.detach().clone()
                    p.copy_(self.shadow[n].to(p.device, p.dtype))
        try:
            yield module
        finally:
            with torch.no_grad():
                for n, p in module.named_parameters():
                    if n in saved:
                        p.copy_(saved[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        self.shadow = {n: t.float() for n, t in state["shadow"].items()}


@dataclass
class TrainState:
    """Where the run is; saved with every checkpoint."""
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0             # micro-batches this process consumed in ``epoch``
    world_size: int = 1
    batch_size: int = 0
    samples_seen: int = 0                 # all processes

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


@dataclass
class RunResult:
    step: int
    output_dir: Path
    export: Optional[Path]
    losses: list = field(default_factory=list)     # (step, {name: value}) every step, on the main process
    samples_per_second: float = 0.0
    peak_memory_bytes: int = 0


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def lr_factor(schedule: str, warmup: int, max_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier at optimizer step ``step``: a linear warm-up over ``warmup`` steps, then
    constant or a cosine from 1 down to 0 at ``max_steps``."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {sorted(LR_SCHEDULES)}, got {schedule!r}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor



def train(config: CoreConfig, task: Task, callbacks: tuple = ()) -> RunResult:
    """Run (or resume) training; ``callbacks`` are called as cb(step, losses, trainable_modules) on every process
    after every optimizer step (tests use them to stop a run or read its weights)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed

    out = Path(config.output_dir)
    ckpt_dir = out / "checkpoints"
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=config.find_unused_parameters)]
    accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation,
                              mixed_precision=config.mixed_precision, log_with=config.log_with,
                              project_dir=str(out), kwargs_handlers=handlers, cpu=config.cpu)
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt_dir.mkdir(exist_ok=True)
        for stale in ckpt_dir.glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()

    frozen_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    task.setup(accelerator.device, frozen_dtype)
    set_seed(config.seed, device_specific=True)     # after setup: each process draws its own noise
    if config.gradient_checkpointing:
        task.enable_gradient_checkpointing()
    model = TaskModule(task).to(accelerator.device)
    optimizer = torch.optim.AdamW(task.param_groups(config.learning_rate), betas=tuple(config.adam_betas),
                                  eps=config.adam_eps, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(config.lr_schedule, config.lr_warmup_steps, config.max_steps))
    if accelerator.state.deepspeed_plugin is not None:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
    model, optimizer = accelerator.prepare(model, optimizer)
    trainable = accelerator.unwrap_model(model).trainable
    state = TrainState(world_size=accelerator.num_processes, batch_size=config.batch_size)
    # The scheduler is stepped here once per optimizer step (not through accelerate, which steps it once per
    # process); it, the train state and the EMA are saved by the core as JSON + safetensors (accelerate would
    # pickle them as "custom states", and load those pickles with weights_only=False).
    ema = EMA(trainable, config.ema_decay) if config.ema_decay > 0 else None
    core_states = CoreStates(scheduler, state, ema)

    resume_from = _resume_path(config.resume, ckpt_dir)
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from, core_states)
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
        if (state.world_size, state.batch_size) != (accelerator.num_processes, config.batch_size):
            accelerator.print("warning: the number of processes or the batch size changed; the data position "
                              "is mapped to the nearest batch, so this is not an exact continuation")
            per_process = state.batches_in_epoch * state.batch_size * state.world_size // accelerator.num_processes
            state.batches_in_epoch = per_process // config.batch_size
            state.world_size, state.batch_size = accelerator.num_processes, config.batch_size
    if main:
        (out / "run_config.json").write_text(json.dumps(asdict(config), indent=1, default=str))
    if config.log_with:
        accelerator.init_trackers(task.name, config={k: str(v) for k, v in asdict(config).items()})

    dataset = task.dataset()
    sampler = ResumableSampler(len(dataset), accelerator.process_index, accelerator.num_processes, config.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, sampler=sampler, collate_fn=task.collate,
        num_workers=config.num_workers, persistent_workers=config.num_workers > 0,
        generator=torch.Generator().manual_seed(config.seed))

    result = RunResult(state.step, out, None)
    log_file = out / "log.jsonl"
    started, start_step = time.perf_counter(), state.step
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    running: dict[str, float] = {}
    model.train()

    while state.step < config.max_steps:
        sampler.set_position(state.epoch, state.batches_in_epoch * config.batch_size)
        for batch in loader:
            batch = task.prepare(_to_device(batch, accelerator.device))
            with accelerator.accumulate(model):
                losses = model(batch)
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            state.samples_seen += config.batch_size * accelerator.num_processes
            for k, v in losses.items():
                running[k] = running.get(k, 0.0) + float(v.detach()) / config.gradient_accumulation
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state.step += 1
            if ema is not None:
                ema.update(trainable)
            step_losses, running = running, {}
            result.losses.append((state.step, step_losses))
            for cb in callbacks:
                cb(state.step, step_losses, trainable)
            if state.step % config.log_every == 0 or state.step == config.max_steps:
                _log(accelerator, log_file, state, step_losses, scheduler, started, start_step, config)
            if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                save_checkpoint(accelerator, ckpt_dir, state.step, config.keep_checkpoints, core_states)
            if config.validate_every and state.step % config.validate_every == 0:
                _validate(accelerator, task, trainable, ema, state.step, out)
            if state.step >= config.max_steps:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0

    elapsed = time.perf_counter() - started
    steps_done = state.step - start_step
    result.samples_per_second = (steps_done * config.batch_size * config.gradient_accumulation
                                 * accelerator.num_processes / elapsed) if elapsed > 0 and steps_done else 0.0
    if accelerator.device.type == "cuda":
        result.peak_memory_bytes = torch.cuda.max_memory_allocated(accelerator.device)
    if not (config.checkpoint_every and state.step % config.checkpoint_every == 0):
        save_checkpoint(accelerator, ckpt_dir, state.step, config.keep_checkpoints, core_states)
    if not config.validate_every or state.step % config.validate_every:
        _validate(accelerator, task, trainable, ema, state.step, out)
    if main:
        with (ema.applied(trainable) if ema is not None else _nothing()):
            result.export = _atomic_export(task, trainable, out / f"{task.name}.safetensors")
    accelerator.wait_for_everyone()
    if config.log_with:
        accelerator.end_training()
    result.step = state.step
    return result


@contextmanager
def _nothing():
    yield


def _resume_path(resume: str, ckpt_dir: Path) -> Optional[Path]:
    if resume == "none":
        return None
    if resume == "latest":
        found = checkpoints(ckpt_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder")
    return path


@dataclass
class CoreStates:
    """The core's own states saved with every checkpoint, beside accelerate's (model, optimizer, RNG)."""
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_state: TrainState
    ema: Optional[EMA] = None

    def save(self, folder: Path) -> None:
        """``core_state.json`` (scheduler, train state, EMA step count; JSON floats round-trip exactly) and
        ``ema.safetensors``."""
        from safetensors.torch import save_file

        record = {"scheduler": self.scheduler.state_dict(), "train_state": self.train_state.state_dict()}
        if self.ema is not None:
            record["ema"] = {"decay": self.ema.decay, "updates": self.ema.updates}
            save_file({n: t.detach().contiguous().cpu() for n, t in self.ema.shadow.items()}, str(folder / EMA_FILE))
        (folder / CORE_STATE_FILE).write_text(json.dumps(record))

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        path = folder / CORE_STATE_FILE
        if not path.is_file():
            raise CheckpointRefused(f"{path} is missing: not a checkpoint of this training core (checkpoints written "
                                    "before it stored its states as JSON pickled them, and pickles are not loaded); "
                                    "start again with --resume none")
        try:
            record = json.loads(path.read_text())
            self.scheduler.load_state_dict(record["scheduler"])
            self.train_state.load_state_dict(record["train_state"])
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointRefused(f"{path}: not a training-core state ({type(err).__name__}: {err})") from err
        if self.ema is not None:
            if "ema" not in record or not (folder / EMA_FILE).is_file():
                raise CheckpointRefused(f"{folder} has no EMA state, but this run has --ema-decay "
                                        f"{self.ema.decay}; resume with the options of the run that wrote it")
            try:
                shadow = load_file(str(folder / EMA_FILE))
            except Exception as err:
                raise CheckpointRefused(f"{folder / EMA_FILE}: not a safetensors file ({err})") from err
            if shadow.keys() != self.ema.shadow.keys():
                raise CheckpointRefused(f"{folder / EMA_FILE}: its weights are not those of the trained modules")
            self.ema.load_state_dict({**record["ema"], "shadow": shadow})


def check_checkpoint_files(folder: Path) -> None:
    """Refuse a checkpoint folder with a pickle the core does not expect (accelerate's ``custom_checkpoint_*.pkl``
    is unpickled with weights_only=False, i.e. it can run code), or RNG states that are not plain data."""
    from accelerate.utils import load

    for path in sorted(folder.iterdir()):
        if path.suffix == ".pkl" and not ACCELERATE_PICKLES.match(path.name):
            raise CheckpointRefused(f"{path}: refused, a pickle the training core does not write (loading it could "
                                    "run code); this core keeps its states in core_state.json / ema.safetensors")
        if ACCELERATE_PICKLES.match(path.name):
            try:
                load(path)   # weights_only, with accelerate's allow-list for numpy's RNG state
            except Exception as err:
                raise CheckpointRefused(f"{path}: refused, not plain RNG state data ({type(err).__name__}: "
                                        f"{str(err).splitlines()[0] if str(err) else ''})") from err


def load_checkpoint(accelerator, folder: Path, core_states: CoreStates) -> None:
    """accelerate's state (model: safetensors; optimizer, RNG: torch.load with weights_only) and the core's, after
    :func:`check_checkpoint_files`; any file that would need a full unpickler raises :class:`CheckpointRefused`."""
    folder = Path(folder)
    check_checkpoint_files(folder)
    try:
        accelerator.load_state(str(folder))
    except pickle.UnpicklingError as err:
        raise CheckpointRefused(f"{folder}: refused, a file in it is not plain tensor data "
                                f"({str(err).splitlines()[0]})") from err
    core_states.load(folder)


def save_checkpoint(accelerator, folder: Path, step: int, keep: int, core_states: CoreStates) -> Path:
    """accelerate's full state and the core's states into ``checkpoint-<step>.tmp``, renamed to ``checkpoint-<step>``
    once every process has written its part; then the oldest complete checkpoints beyond ``keep`` are removed."""
    final = folder / f"checkpoint-{step:08d}"
    tmp = folder / (final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        core_states.save(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        for old in checkpoints(folder)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _atomic_export(task: Task, modules: nn.ModuleDict, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    task.export(modules, tmp)
    os.replace(tmp, path)
    return path


def _validate(accelerator, task: Task, trainable, ema, step: int, out: Path) -> None:
    if accelerator.is_main_process:
        folder = out / "validation"
        folder.mkdir(exist_ok=True)
        with torch.no_grad(), (ema.applied(trainable) if ema is not None else _nothing()):
            was_training = trainable.training
            trainable.eval()
            path = task.validate(trainable, step, folder)
            trainable.train(was_training)
        if path is not None:
            accelerator.print(f"step {step}: validation images {path}")
    accelerator.wait_for_everyone()


def _log(accelerator, log_file: Path, state: TrainState, losses: dict, scheduler, started: float,
         start_step: int, config: CoreConfig) -> None:
    names = sorted(losses)
    values = torch.tensor([losses[n] for n in names], device=accelerator.device)
    values = accelerator.reduce(values, reduction="mean")
    record = {"step": state.step, **{n: float(v) for n, v in zip(names, values)},
              "lr": scheduler.get_last_lr()[0], "epoch": state.epoch}
    elapsed = time.perf_counter() - started
    if elapsed > 0 and state.step > start_step:
        record["samples_per_s"] = ((state.step - start_step) * config.batch_size * config.gradient_accumulation
                                   * accelerator.num_processes / elapsed)
    if accelerator.is_main_process:
        with open(log_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        accelerator.print(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in record.items()))
    if config.log_with:
        accelerator.log(record, step=state.step)


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

