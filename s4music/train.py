"""`s4music train`: the training loop, on HF Accelerate (CPU, one GPU, or many processes).

    config = TrainConfig(data=["piano"], out="runs/piano", steps=2000)
    result = train(config)                       # or train(config, resume=True) after a crash

Modes:
    scratch   a new model from `model` (a SaShiMiConfig mapping)
    finetune  start from `init`: an s4music checkpoint or an official SaShiMi .pt
    reparam   as finetune, after `untie` (Lambda per group, optionally P/B and a per-state dt)

One optimizer step takes `grad_accum` micro-batches of `batch_size` windows each. `batch_size` is
the global batch: every process draws the same windows from the same seeded sampler and trains on
its own slice, so 1 process and N processes see the same data and compute the same update.

A run directory holds config.yaml (the resolved config), seed, log.csv, checkpoints/step-N/ (model
plus training state, each written atomically), best/ (lowest validation bits/sample), model/
(the final model), loss.png and world.json (the ranks that took part).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from s4music.data.dataset import PreparedDataset, WindowMixture, parse_spec
from s4music.errors import S4MusicError
from s4music.files import DirectoryLock, atomic_path, interrupts_deferred, remove_stale_temporaries, write_json
from s4music.model.checkpoint import CheckpointError, read_summary, save_model, verify_checkpoint
from s4music.model.config import AudioFormat, SaShiMiConfig
from s4music.model.fast import fused_available, reader
from s4music.model.registry import load_model, resolve_model
from s4music.model.reparam import untie
from s4music.model.sashimi import SaShiMi, code_bits
from s4music.train_config import TrainConfig, TrainingError

log = logging.getLogger(__name__)
SSM_PARAMETERS = ("A_real", "A_imag", "P", "B", "inv_dt")  # the official S4 optimizer group
TRAINING_TENSORS, TRAINING_JSON = "training.safetensors", "training.json"


# What may change when a run is resumed; every other key must be the run's own.
# `out` too: a run goes on wherever its directory is, reached by another path or copied.
RESUMABLE_CHANGES = ("out", "steps", "eval_every", "eval_windows", "save_every", "keep_last", "log", "max_bad_steps",
                     "max_minutes", "fast", "conv_chunk")


def _datasets(specs: list[str]) -> list[tuple[Path, float]]:
    return [(Path(path).resolve(), weight) for path, weight in map(parse_spec, specs)]


def _same_data(saved: list[str], given: list[str]) -> bool:
    """The same datasets by other paths, or datasets that moved: none is where the run's config says
    any more, and as many are given, with the same weights, where they are now."""
    before, now = _datasets(saved), _datasets(given)
    if before == now:
        return True
    moved = len(before) == len(now) and not any(path.exists() for path, _ in before)
    return moved and [w for _, w in before] == [w for _, w in now]


def absolute_data(specs: list[str]) -> list[str]:
    """Dataset specs with absolute paths (the weight kept), so a run resumes from any directory."""
    absolute = []
    for spec in specs:
        path = parse_spec(spec)[0]
        absolute.append(str(Path(path).resolve()) + spec[len(path):])
    return absolute


def check_resume_config(config: TrainConfig, out: Path) -> None:
    """Refuse to resume the run in `out` with a config that would train another model."""
    try:
        saved = TrainConfig.load(out / "config.yaml")
    except TrainingError:
        return  # a run killed before it wrote its config: nothing to compare with
    before = saved.to_dict()
    changed = [k for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES and before[k] != v
               and not (k == "data" and _same_data(before[k], v))]
    if changed:
        shown = ", ".join(f"{k}={getattr(saved, k)!r}" for k in changed[:4])
        raise TrainingError(f"{out / 'config.yaml'}: the run was started with {shown}; resume it with its own config "
                            "(TrainConfig.load(out=..., resume=True), or `s4music train --out DIR --resume`)")


@dataclass
class StepInfo:
    """What the progress display shows after each optimizer step."""

    step: int
    steps: int | None  # None: a run fitted into minutes, before its first plan
    bits: float  # training loss, bits per sample
    lr: float
    audio_seconds_per_second: float
    val_bits: float | None = None
    eta_seconds: float | None = None  # until the last step, from the recent step rate (None before a plan)


@dataclass
class TrainResult:
    out: Path
    model: Path
    best: Path | None
    step: int
    val_bits: float | None
    parameters: int
    added_parameters: int
    world_size: int


# ---------------------------------------------------------------------------------- state files


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """Nested dicts/lists with tensors -> JSON-able structure; tensors go to `tensors` by key."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__items__": [[k, _flatten(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__items__" in obj:
        return {k: _unflatten(v, tensors) for k, v in obj["__items__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """Training state as safetensors (tensors) + JSON (the rest); nothing pickled."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(state, tensors, "s")
    save_file(tensors, str(directory / TRAINING_TENSORS))
    (directory / TRAINING_JSON).write_text(json.dumps(structure))


def read_state(directory: Path) -> dict[str, Any]:
    tensors = load_file(str(directory / TRAINING_TENSORS))
    return _unflatten(json.loads((directory / TRAINING_JSON).read_text()), tensors)


def checkpoints(out: Path) -> list[Path]:
    """A run's complete checkpoints, oldest first (directories appear only once complete)."""
    found = sorted((out / "checkpoints").glob("step-*"))
    return [p for p in found if (p / TRAINING_JSON).exists()]


def resumable_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint of a run whose files verify (sizes and checksums recorded at save time);
    a damaged one is skipped, with a warning that names it and the reason."""
    for path in reversed(checkpoints(out)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            log.warning("skipping %s: %s", path.name, e)
    return None


# ---------------------------------------------------------------------------------- building


def build_model(config: TrainConfig, mixture: WindowMixture) -> tuple[SaShiMi, int]:
    """The model a run starts from, and how many parameters `reparam` added."""
    if config.mode == "scratch":
        try:
            model = SaShiMi(SaShiMiConfig.from_dict(config.model))
        except (TypeError, ValueError) as e:
            raise TrainingError(f"model config: {e}") from None
        model.audio = AudioFormat(sample_rate=mixture.sample_rate, quantization=mixture.quantization)
        return model, 0
    model = load_model(config.init).train()
    why = model.audio.mismatch(mixture.sample_rate, mixture.quantization)
    if why:
        raise TrainingError(f"{config.init}: {why}")
    if config.mode == "reparam":
        return untie(model, config.groups, config.untie_pb, config.dt_per_state)
    return model, 0


def parameter_groups(model: SaShiMi, config: TrainConfig) -> list[dict]:
    """The official S4 recipe: SSM parameters at their own LR without weight decay; no decay for
    biases, norms, embeddings and other vectors; weight decay for the remaining matrices."""
    ssm, no_decay, decay = [], [], []
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in SSM_PARAMETERS:
            ssm.append(p)
        elif p.dim() < 2 or name.startswith("encoder") or name.endswith((".C", ".D")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": config.weight_decay, "lr": config.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": config.lr},
        {"params": ssm, "weight_decay": 0.0, "lr": config.ssm_lr},
    ]


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=config.plateau_patience)

    def factor(step: int) -> float:
        # a run fitted into minutes warms up over at most a fifth of the steps that fit
        warmup = config.warmup if config.max_minutes is None else min(config.warmup, config.steps // 5)
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, config.steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def validation_windows(mixture: WindowMixture, config: TrainConfig) -> list[torch.Tensor] | None:
    """Each dataset's `eval_windows` val windows, spread evenly over its split (so over its files, not
    the first file's first seconds), cut to seq_len: a (V, L) tensor each. A split with fewer windows
    gives each more of its length, up to the whole window, for as many samples in all (two windows
    cut to 4,096 samples were half a second of audio to choose best/ by)."""
    chunks = []
    for ds in mixture.datasets:
        windows = ds.windows("val")
        if len(windows):
            count = min(config.eval_windows, len(windows))
            length = min(ds.window, config.seq_len * config.eval_windows // count)
            spread = np.unique(np.linspace(0, len(windows) - 1, count).round())
            chunks.append(torch.from_numpy(np.stack([windows[int(i), :length] for i in spread]).astype(np.int64)))
    return chunks or None


@torch.no_grad()
def mean_bits(model: SaShiMi, chunks: list[torch.Tensor], batch: int = 4) -> float:
    """Mean bits per sample of the codes in `chunks` ((V, L) each) under `model`, in eval mode."""
    was_training = model.training
    model.eval()
    read = reader(model)
    total = sum(read.bits(codes[i : i + batch].to(model.device)).sum().item()
                for codes in chunks for i in range(0, len(codes), batch))
    model.train(was_training)
    return total / sum(codes.numel() for codes in chunks)


# ---------------------------------------------------------------------------------- logging


class RunLog:
    """log.csv (step, train and val bits, lr, throughput), and TensorBoard when asked."""

    COLUMNS = ("step", "train_bits", "val_bits", "lr", "audio_s_per_s", "time")

    def __init__(self, out: Path, kind: str, resume_step: int):
        self.path = out / "log.csv"
        rows = self.read(self.path)
        rows = [r for r in rows if int(r["step"]) <= resume_step]  # drop steps a crash took away
        with atomic_path(self.path) as tmp:
            tmp.write_text(",".join(self.COLUMNS) + "\n" + "".join(self._line(r) for r in rows))
        self.file = open(self.path, "a")
        self.writer = None
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainingError("log=tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def _line(self, row: dict) -> str:
        return ",".join("" if row.get(c) in (None, "") else str(row[c]) for c in self.COLUMNS) + "\n"

    @staticmethod
    def read(path: Path) -> list[dict]:
        if not path.exists():
            return []
        text = path.read_text()
        lines = text.split("\n")[:-1]  # a line cut short by a kill has no newline: dropped
        header = lines[0].split(",") if lines else []
        return [dict(zip(header, line.split(","), strict=True)) for line in lines[1:] if line.count(",") == len(header) - 1]

    def write(self, row: dict) -> None:
        self.file.write(self._line(row))
        self.file.flush()
        if self.writer is not None:
            for key in ("train_bits", "val_bits", "lr", "audio_s_per_s"):
                if row.get(key) is not None:
                    self.writer.add_scalar(key, row[key], row["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def plot_losses(log_path: Path, png: Path) -> None:
    """The loss curve (train and validation bits/sample against step) as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global figure manager or backend to set

    rows = RunLog.read(log_path)
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    for key, style in (("train_bits", "-"), ("val_bits", "o-")):
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=key.replace("_bits", ""), markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per sample")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")


# ---------------------------------------------------------------------------------- time budget


class Budget:
    """Fit a run into `minutes` of wall time. After the first steps (the first compiles and warms
    up), plan how many steps fit, keeping room for the validations and checkpoints (their median
    cost, the first one left out once there are others: it compiles too) and for the final save;
    re-plan as the figures settle, whenever the fit moves by more than 2%, and stop when time is
    up. `plan` returns the new step count, or None to keep the current one."""

    MEASURE = 5  # steps timed before the first plan
    RESERVE = 0.05  # of the budget kept for the final validation and save (at least 20 s of a long one)

    def __init__(self, minutes: float, eval_every: int, spent: float = 0.0):
        """`spent`: seconds a run resumed here had used of its minutes before (the clock starts there)."""
        self.start = time.perf_counter() - spent
        self.seconds = 60 * minutes
        self.reserve = max(self.RESERVE * self.seconds, min(20.0, 0.25 * self.seconds))
        self.eval_every = eval_every
        self.last: float | None = None
        self.steps_timed: list[float] = []  # the recent steps' own seconds
        self.extras: list[float] = []  # seconds of each validation or save
        self.per_step: float | None = None

    def spent(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.spent()

    def plan(self, step: int, steps: int, extra_seconds: float) -> int | None:
        now = time.perf_counter()
        if self.left() < self.reserve:
            return step  # out of time, planned or not: stop here
        if extra_seconds > 0.0:
            self.extras.append(extra_seconds)
        if self.last is not None:
            self.steps_timed = [*self.steps_timed[-49:], now - self.last - extra_seconds]
        self.last = now
        if len(self.steps_timed) < self.MEASURE:
            return None
        self.per_step = statistics.median(self.steps_timed)
        extras = self.extras[1:] if len(self.extras) > 1 else self.extras
        per_extra = statistics.median(extras) if extras else 0.0
        fit = max(step, step + int((self.left() - self.reserve) / (self.per_step + per_extra / self.eval_every)))
        if len(self.steps_timed) == self.MEASURE or abs(fit - steps) > 0.02 * steps:
            return fit
        return None


# ---------------------------------------------------------------------------------- the run directory


# What a run from weights keeps of its starting model's summary: the sampling rules chosen for it.
CARRIED = ("sampling", "sampling_unfamiliar")


def carried_rules(init: str) -> dict:
    """The CARRIED keys of the model a run started from, from its config.json ({} when it has none)."""
    try:
        summary = read_summary(resolve_model(init))
    except (S4MusicError, OSError):  # an official .pt, or a name the Hub cannot give now
        return {}
    return {k: summary[k] for k in CARRIED if k in summary}


class RunDirectory:
    """A run's folder and its chores, apart from the loop: one writer at a time (the main process;
    the others hold and write nothing), what a killed writer left half-written removed, the
    checks before a resume, the run's settings, the log, checkpoints saved and pruned, the best and
    the final model."""

    def __init__(self, config: TrainConfig, main: bool):
        self.out, self.config, self.main = Path(config.out), config, main
        self.runlog: RunLog | None = None
        self.carried: dict = {}  # summary keys of the starting model that its saves keep (CARRIED)
        self._lock = DirectoryLock(self.out, "training run") if main else contextlib.nullcontext()

    def __enter__(self) -> RunDirectory:
        self._lock.__enter__()
        if self.main:
            for directory in (self.out, self.out / "checkpoints"):
                for stale in remove_stale_temporaries(directory):
                    log.info("removed %s, left by a run that was killed", stale)
        return self

    def __exit__(self, *exc) -> None:
        self._lock.__exit__(*exc)

    def checkpoint_to_resume(self, resume: bool) -> Path | None:
        """With `resume`, the newest checkpoint that verifies and a config that trains the same
        model; else None, and the directory must hold no run yet."""
        if not resume:
            if checkpoints(self.out):
                raise TrainingError(f"{self.out}: already holds a run; resume it with --resume or choose another --out")
            return None
        checkpoint = resumable_checkpoint(self.out)
        if checkpoint is None:
            raise TrainingError(f"{self.out}: every checkpoint is damaged (see the warnings above); nothing to resume from")
        check_resume_config(self.config, self.out)
        return checkpoint

    def begin(self, step: int, world: int, ranks: list[dict]) -> None:
        """The resolved config, the seed, the ranks; the log opened at `step`."""
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.out / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        (self.out / "seed").write_text(f"{self.config.seed}\n")
        write_json(self.out / "world.json", {"world_size": world, "ranks": ranks})
        self.runlog = RunLog(self.out, self.config.log, step)

    def summary(self, step: int, val_bits: float | None, world: int, added: int) -> dict:
        """What a saved model records about the run, and the sampling rules of the model it started
        from (`carried`): without them a fine-tune, even best/ at step 0, would sample at the neutral
        rule, not at the one chosen for those weights."""
        c = self.config
        return {"mode": c.mode, "from": c.init, "data": c.data, "step": step, "seed": c.seed, "val_bits": val_bits,
                "world_size": world, "added_parameters": added, **({"domain": c.domain} if c.domain else {}),
                **self.carried}

    def record(self, row: dict) -> None:
        if self.runlog is not None:
            self.runlog.write(row)

    def save_best(self, model: SaShiMi, summary: dict) -> None:
        if self.main:
            save_model(model, self.out / "best", summary=summary)

    def save_checkpoint(self, model: SaShiMi, state: dict, summary: dict) -> None:
        """checkpoints/step-N (model + training state), then all but the newest keep_last pruned."""
        if not self.main:
            return
        path = self.out / "checkpoints" / f"step-{state['step']:07d}"
        save_model(model, path, summary=summary, extra=lambda d: write_state(d, state))
        # the newest keep_last up to this step stay; any later one is a damaged checkpoint the
        # resume skipped (and warned of), which must not displace the one just saved
        kept = [p for p in sorted((self.out / "checkpoints").glob("step-*")) if p.name <= path.name]
        for old in kept[: -self.config.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def finish(self, model: SaShiMi, summary: dict, trained: bool) -> Path:
        """The final model, the log closed, the loss curve drawn. A resume that `trained` nothing keeps
        the final model already there at this step, with the figures it was saved with."""
        final = self.out / "model"
        if self.main:
            try:
                kept = not trained and read_summary(final).get("step") == summary["step"]
            except (CheckpointError, OSError):  # none there yet, or damaged
                kept = False
            if not kept:
                save_model(model, final, summary=summary)
            self.runlog.close()
            plot_losses(self.out / "log.csv", self.out / "loss.png")
        return final


def training_state(step: int, best: float, optimizer, scheduler, mixture: WindowMixture, scaler,
                   config: TrainConfig, seconds: float) -> dict:
    """Everything but the weights that a resume needs to go on exactly, and the run's `seconds` so
    far, which any later --max-minutes counts (for a run fitted into minutes, "config" holds the
    steps planned)."""
    state = {"step": step, "best": best, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "mixture": mixture.state_dict(), "rng": torch.get_rng_state(), "config": config.to_dict(),
             "seconds_spent": seconds}
    if scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    return state


def restore_training_state(state: dict, optimizer, scheduler, mixture: WindowMixture, scaler) -> tuple[int, float]:
    """The optimizer, schedule, sampler, random state and scaler as saved; returns (step, best)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    mixture.load_state_dict(state["mixture"])
    torch.set_rng_state(state["rng"])
    if scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state["step"], state["best"]


# ---------------------------------------------------------------------------------- the loop


def backward(ddp_model, model: SaShiMi, mixture: WindowMixture, config: TrainConfig, accelerator, scaler,
             autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """One optimizer step's micro-batches, forward and backward, this process's slice of each global
    batch -> (summed bits, non-finite micro-batches) over every process, (2,)."""
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    per_rank = config.batch_size // world
    total = torch.zeros(2, device=device)
    for micro in range(config.grad_accum):
        codes = mixture.sample(config.batch_size)[rank * per_rank : (rank + 1) * per_rank].to(device)
        sync = micro == config.grad_accum - 1
        # Every rank always runs backward (a rank that skipped would stall the others' all-reduce);
        # a non-finite loss makes the reduced gradient norm non-finite everywhere, and all skip.
        with accelerator.no_sync(ddp_model) if not sync else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                bits = code_bits(ddp_model(model.shift_right(codes)), codes).mean()
            scaler.scale(bits / config.grad_accum).backward()
        total[0] += bits.detach().float()
        total[1] += 0 if torch.isfinite(bits) else 1
    return accelerator.reduce(total, "sum")


def plan_resumed(config: TrainConfig, budget: Budget | None, step: int, spent: float,
                 minutes_before: float | None) -> None:
    """A resumed run's step count. Given more minutes than it had (or minutes where it had none), as
    many more steps as its pace so far says fit in what is left of them, until the next steps are
    timed and planned. It reads the checkpoint's figures, not a clock, so every process plans alike.
    A finished run given nothing more says so, and how to ask for more."""
    if budget is not None and (minutes_before is None or config.max_minutes > minutes_before):
        usable = budget.seconds - budget.reserve - spent
        if usable > 0:
            fit = int(usable * step / spent) if spent > 0 else 0  # unknown pace: the first plan decides
            config.steps = max(config.steps, step + max(Budget.MEASURE + 1, fit))
            log.info("%.1f of its %g minutes left: going on from step %d", (budget.seconds - spent) / 60,
                     config.max_minutes, step)
            return
    if step >= config.steps or budget is not None and budget.left() <= budget.reserve:
        had = f"used {spent / 60:.1f} minutes of its {config.max_minutes:g}" if budget else f"done its {step} steps"
        log.warning("%s: nothing left to train: the run has %s; give --resume a larger %s to go on", config.out, had,
                    "--max-minutes" if budget else "--steps")


def train(config: TrainConfig, resume: bool = False, on_step: Callable[[StepInfo], None] | None = None) -> TrainResult:
    """Run (or, with `resume`, continue) training as `config` says. See the module docstring."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed

    out = Path(config.out)
    # Accelerate places the processes and wraps the model for DDP; the precision is ours (autocast and,
    # for fp16, a gradient scaler, below), so one process can run several trainings of other precisions.
    accelerator = Accelerator(mixed_precision="no")
    device = accelerator.device
    if config.precision == "fp16" and device.type == "cpu":
        raise TrainingError("precision=fp16 needs a GPU (autocast to fp16 does not run on a CPU); use bf16 or no")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise TrainingError(f"batch_size={config.batch_size} must be a multiple of the {world} processes")
    set_seed(config.seed)
    missing = [path for path, _ in map(parse_spec, config.data) if not Path(path).exists()]
    if missing:
        moved = "; if the run's data moved, give --data where it is now" if resume else ""
        raise TrainingError(f"{missing[0]}: no such dataset (build one with `s4music prepare`{moved})")
    mixture = WindowMixture([(PreparedDataset(p), w) for p, w in map(parse_spec, config.data)],
                            config.seq_len, "train", config.seed)
    config.data = absolute_data(config.data)
    if resume and not checkpoints(out):
        raise TrainingError(f"{out}: no checkpoint to resume from")
    if not resume:  # before anything is written: a bad --from or model config leaves no run behind
        model, added = build_model(config, mixture)
    with RunDirectory(config, accelerator.is_main_process) as run:
        accelerator.wait_for_everyone()  # what a killed writer left is gone before anyone reads
        checkpoint = run.checkpoint_to_resume(resume)
        if checkpoint is not None:
            model = load_model(checkpoint).train()
            why = model.audio.mismatch(mixture.sample_rate, mixture.quantization)  # data given anew (moved)
            if why:
                raise TrainingError(f"{', '.join(config.data)}: {why}")
            added = model.summary.get("added_parameters", 0)
        run.carried = {k: model.summary[k] for k in CARRIED if k in model.summary}
        if checkpoint is not None and config.init and not run.carried:  # saved before they were carried
            run.carried = carried_rules(config.init)
        model.gradient_checkpointing = config.gradient_checkpointing
        model.to(device)  # before the optimizer, so its restored state lands beside the weights
        if config.fast:
            model.fast_training(conv_chunk=config.conv_chunk)
        optimizer = torch.optim.AdamW(parameter_groups(model, config), betas=(0.9, 0.999))
        scheduler = make_scheduler(optimizer, config)
        val_codes = validation_windows(mixture, config)
        if val_codes is None:
            log.warning("%s: no val windows, so the run cannot validate: no best/, only the final model",
                        ", ".join(config.data))

        step, best, bad_steps, spent = 0, math.inf, 0, 0.0
        start_bits = None  # a run from weights: the starting model's validation, which best/ must beat
        if checkpoint is not None:
            state = read_state(checkpoint)
            step, best = restore_training_state(state, optimizer, scheduler, mixture, scaler)
            spent = state.get("seconds_spent", state.get("budget_spent", 0.0))  # budget_spent: before 2026-12-08
            if config.max_minutes:  # the same minutes go on: the plan holds until the first steps are timed
                config.steps = state["config"]["steps"]
            log.info("resumed %s at step %d", checkpoint, step)

        ddp_model = accelerator.prepare(model)
        run.begin(step, world, gather_object([{"rank": rank, "pid": os.getpid(), "host": socket.gethostname()}]))
        log.info("run %s: %s, seed %d; %d process(es); %s parameters%s", out, config.mode, config.seed, world,
                 f"{model.num_parameters():,}", f" ({added:,} added by reparam)" if added else "")

        samples_per_step = config.batch_size * config.grad_accum * config.seq_len
        val_bits = None
        if val_codes is not None and device.type == "cpu":
            fused_available()  # the fused reader's one-time build (about 40 s) is the machine's, not the run's minutes
        clock = time.perf_counter() - spent  # the run's seconds so far, across resumes
        budget = Budget(config.max_minutes, config.eval_every, spent) if config.max_minutes else None
        if checkpoint is None and config.init and val_codes is not None:  # inside the budget's minutes
            start_bits = best = mean_bits(model, val_codes)
            run.save_best(model, run.summary(0, start_bits, world, added))
            log.info("step 0 (%s as it starts): val %.4f bits/sample; best/ keeps it until a step beats it",
                     config.init, start_bits)
        if checkpoint is not None:
            plan_resumed(config, budget, step, spent, state["config"].get("max_minutes"))
        extra = 0.0  # seconds the last step spent validating and saving
        # Steps: where this call began; the newest checkpoint's; the last whose update and schedule are
        # whole; the one whose windows are being learned from, with the data and random state before them.
        begun = saved = done = drawn_at = step
        before = None
        ddp_model.train()
        try:
            while step < config.steps:
                started = time.perf_counter()
                drawn_at, before = step, (mixture.state_dict(), torch.get_rng_state())
                optimizer.zero_grad(set_to_none=True)
                total = backward(ddp_model, model, mixture, config, accelerator, scaler, autocast_dtype)
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip or math.inf)
                if scaler.is_enabled() and total[1] == 0 and not torch.isfinite(grad_norm):
                    scaler.step(optimizer)  # fp16 gradients overflowed: the scaler skips the step and lowers its scale
                    scaler.update()
                    continue
                if total[1] > 0 or not torch.isfinite(grad_norm):
                    bad_steps += 1
                    optimizer.zero_grad(set_to_none=True)
                    scaler.update()  # forgets this step's unscale (a no-op without fp16)
                    log.warning("step %d: non-finite loss or gradient; step skipped (%d in a row)", step + 1, bad_steps)
                    if bad_steps >= config.max_bad_steps:
                        raise TrainingError(
                            f"{out}: the loss was NaN or inf for {bad_steps} steps in a row at step {step + 1}; stopped. "
                            f"The last good checkpoint is kept. Try a lower lr, precision=no, or clip > 0")
                    continue
                bad_steps = 0
                with interrupts_deferred():  # Ctrl-C finds an update whole or not begun
                    scaler.step(optimizer)
                    scaler.update()
                    step += 1
                train_bits = total[0].item() / (world * config.grad_accum)

                stepped = time.perf_counter()
                if budget is not None:
                    planned = budget.plan(step, config.steps, extra)
                    mine = torch.tensor([-1 if planned is None else planned], device=device)
                    plans = accelerator.gather(mine) if world > 1 else mine
                    planned = int(plans[plans >= 0].min().item()) if (plans >= 0).any() else -1
                    if planned >= 0 and planned != config.steps:  # every rank plans alike (the slowest's figure)
                        if budget.per_step is None:  # out of time before the first steps were timed
                            log.info("step %d: out of the %g minutes; stopping", step, config.max_minutes)
                        else:
                            log.info("step %d: %.2f s a step; %d steps fit in %g minutes", step, budget.per_step,
                                     int(planned), config.max_minutes)
                        config.steps = int(planned)  # the cosine schedule reads config.steps
                val_bits = None
                if val_codes is not None and (step % config.eval_every == 0 or step == config.steps):
                    val_bits = mean_bits(model, val_codes)
                if config.schedule == "plateau":
                    if val_bits is not None:
                        scheduler.step(val_bits)
                else:
                    scheduler.step()
                done = step
                lr = optimizer.param_groups[0]["lr"]
                rate = samples_per_step / mixture.sample_rate / (time.perf_counter() - started)
                run.record({"step": step, "train_bits": f"{train_bits:.5f}",
                            "val_bits": None if val_bits is None else f"{val_bits:.5f}", "lr": f"{lr:.3e}",
                            "audio_s_per_s": f"{rate:.3f}", "time": f"{time.time():.1f}"})
                if val_bits is not None and val_bits < best:
                    best = val_bits
                    run.save_best(model, run.summary(step, val_bits, world, added))
                if step % config.save_every == 0 or step == config.steps:
                    state = training_state(step, best, optimizer, scheduler, mixture, scaler, config, time.perf_counter() - clock)
                    run.save_checkpoint(model, state, run.summary(step, val_bits, world, added))
                    saved = step
                extra = time.perf_counter() - stepped
                if on_step is not None and accelerator.is_main_process:
                    if budget is None:
                        info = config.steps, (config.steps - step) * (time.perf_counter() - started)
                    elif budget.per_step is None:  # not planned yet
                        info = None, None
                    else:
                        info = config.steps, min((config.steps - step) * budget.per_step, max(0.0, budget.left()))
                    on_step(StepInfo(step, info[0], train_bits, lr, rate, val_bits, info[1]))
                accelerator.wait_for_everyone()
        except KeyboardInterrupt:  # keep what was trained; the step under way, if any, is dropped
            if step > saved:
                if step == drawn_at:  # its windows were drawn, not learned from: a resume draws them again
                    mixture.load_state_dict(before[0])
                    torch.set_rng_state(before[1])
                elif step > done and config.schedule != "plateau":  # updated, its schedule not yet stepped
                    scheduler.step()
                state = training_state(step, best, optimizer, scheduler, mixture, scaler, config, time.perf_counter() - clock)
                run.save_checkpoint(model, state, run.summary(step, None, world, added))
            if accelerator.is_main_process and checkpoints(out):  # (several processes: a best effort)
                log.warning("interrupted at step %d, %s in %s; go on with --resume", step,
                            "saved" if step > saved else "already saved", out / "checkpoints")
            elif accelerator.is_main_process:
                kept = "; best/ holds the model it started from" if (out / "best").exists() else ""
                log.warning("interrupted before the first step: nothing to resume%s", kept)
            raise

        if start_bits is not None and best >= start_bits:
            log.warning("%s: no step beat the model it started from on validation (%.4f bits/sample), so best/ is "
                        "that model; try more steps or minutes, more data, or a lower --lr", out, start_bits)
        final = run.finish(model, run.summary(step, val_bits, world, added), trained=step > begun)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return TrainResult(out=out, model=final, best=out / "best" if (out / "best").exists() else None, step=step,
                           val_bits=val_bits, parameters=model.num_parameters(), added_parameters=added,
                           world_size=world)
