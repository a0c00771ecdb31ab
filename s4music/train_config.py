"""What a training run is asked to do (`TrainConfig`, saved as config.yaml beside the run), apart
from the loop in `s4music.train`, so the command line reads its defaults without importing torch."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from s4music.errors import S4MusicError
from s4music.model.config import read_yaml
from s4music.options import split_assignment

MODES = ("scratch", "finetune", "reparam")


log = logging.getLogger(__name__)


class TrainingError(S4MusicError):
    pass


SCRATCH_LR = 4e-3  # the official SaShiMi learning rate
# From trained weights the scratch rate undoes them: fine-tuning the bundled model at the default
# batch on 0.36 h of recordings, 4e-3 with no warm-up took its validation bits from 3.12 to 19.7 in
# 5 steps; 3e-4 after a warm-up moved them least of the rates tried (benchmarks/RESULTS.md).
WEIGHTS_LR = 3e-4
WEIGHTS_WARMUP = 20


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as config.yaml beside it."""

    data: list[str] = field(default_factory=list)  # prepared datasets, "path" or "path:weight"
    out: str = "runs/s4music"
    mode: str | None = None  # scratch, finetune or reparam; None: finetune with init, scratch without
    init: str | None = None  # the checkpoint finetune and reparam start from (--from)
    model: dict[str, Any] = field(default_factory=dict)  # SaShiMiConfig fields, for scratch
    domain: str | None = None  # what the data is, in words; prompt guidance quotes it in its advice
    # reparam: copies of Lambda per layer (None: one per channel), untie P and B, per-state dt
    groups: int | None = None
    untie_pb: bool = False
    dt_per_state: bool = False

    seq_len: int = 16000  # samples per training window
    batch_size: int = 4  # windows per micro-batch, over all processes
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: int = 1000  # optimizer steps
    lr: float | None = None  # None: SCRATCH_LR from scratch, WEIGHTS_LR from weights (--from)
    ssm_lr: float | None = None  # A, P, B, dt (no weight decay); None: lr / 4, as the official 4e-3 and 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine, plateau or constant
    warmup: int | None = None  # linear warm-up steps; None: none from scratch, WEIGHTS_WARMUP from weights
    plateau_patience: int = 3  # evaluations without improvement before the LR halves
    clip: float = 1.0  # gradient norm clip (0: off)
    precision: str = "no"  # no, bf16 or fp16 (GPU only) autocast (the FFTs stay in fp32)
    fast: bool = False  # the fast training step (SaShiMi.fast_training): element-wise chains compiled
    conv_chunk: int = 0  # with fast: S4D convolutions as matrix products over chunks of this many samples (0: FFT)
    max_minutes: float | None = None  # plan the steps to fit in this many minutes, and stop in time
    gradient_checkpointing: bool = False
    seed: int = 0

    eval_every: int = 100
    eval_windows: int = 16  # validation windows per dataset, spread over its val split (each cut to seq_len)
    save_every: int = 100
    keep_last: int = 2
    log: str = "csv"  # csv, or tensorboard (needs the tensorboard package) as well
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops

    def __post_init__(self) -> None:
        if self.mode is None:
            self.mode = "finetune" if self.init else "scratch"
        checks = {
            "mode": (self.mode, MODES), "schedule": (self.schedule, ("cosine", "plateau", "constant")),
            "precision": (self.precision, ("no", "bf16", "fp16")), "log": (self.log, ("csv", "tensorboard")),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise TrainingError(f"{name}={value!r}: use one of {', '.join(allowed)}")
        if self.mode != "scratch" and not self.init:
            raise TrainingError(f"mode {self.mode} needs a checkpoint to start from (--from)")
        if self.mode == "scratch" and self.init:
            raise TrainingError(f"mode scratch starts from nothing, not {self.init}: leave out --mode (or give "
                                "--mode finetune) to start from it")
        scratch = self.mode == "scratch"
        if self.lr is None:
            self.lr = SCRATCH_LR if scratch else WEIGHTS_LR
        if self.ssm_lr is None:
            self.ssm_lr = self.lr / 4
        if self.warmup is None:
            self.warmup = 0 if scratch else WEIGHTS_WARMUP
        if not self.data:
            raise TrainingError("no training data: give --data DATASET (built by `s4music prepare`)")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "eval_windows", "save_every",
                     "keep_last"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be at least 1")
        if self.conv_chunk < 0:
            raise TrainingError(f"conv_chunk={self.conv_chunk}: give a number of samples, or 0 for the FFT")
        if self.conv_chunk and not self.fast:
            raise TrainingError(f"conv_chunk={self.conv_chunk} is an option of the fast step: add --fast")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise TrainingError("max_minutes must be above 0")

    # ------------------------------------------------------------------ YAML
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise TrainingError(f"unknown training config keys: {unknown}")
        values = {}
        for key, value in data.items():
            # YAML reads 1e-3 as a string; numbers are converted by the field's declared type.
            kind = {"float": float, "int": int, "int | None": int, "float | None": float}.get(fields[key])
            try:
                values[key] = kind(value) if kind is not None and value is not None else value
            except (TypeError, ValueError):
                raise TrainingError(f"{key}={value!r}: expected {fields[key]}") from None
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None, resume: bool = False,
             **values) -> TrainConfig:
        """A YAML file (or nothing), then `values` that are not None, then `key=value` overrides.

        With `resume` and no file, the run's own config (`out`/config.yaml) is the base, so
        `TrainConfig.load(out="runs/x", resume=True)` gives the config to continue that run with."""
        out = values.get("out")
        if path is None and resume and out is not None and (Path(out) / "config.yaml").exists():
            path = Path(out) / "config.yaml"
        data: dict[str, Any] = {}
        if path is not None:
            try:
                data = read_yaml(Path(path).read_text()) or {}
            except (OSError, yaml.YAMLError) as e:
                raise TrainingError(f"{path}: cannot read the config ({e})") from None
            if not isinstance(data, dict):
                raise TrainingError(f"{path}: a config must be a YAML mapping")
            if data.get("mode") == "scratch" and data.get("init"):  # saved before --from implied finetune
                log.warning("%s: mode scratch ignored init %s, so that run trained from scratch; resuming it so",
                            path, data["init"])
                data["init"] = None
        data.update({k: v for k, v in values.items() if v is not None})
        for item in overrides or []:
            apply_override(data, item)
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def apply_override(data: dict[str, Any], item: str) -> None:
    """`a.b=value` sets data['a']['b'] to value parsed as YAML (so 3, 1e-3, true, [4, 4] work)."""
    key, raw = split_assignment(item, "--set")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise TrainingError(f"--set {item!r}: {part} is not a mapping")
    try:
        node[leaf] = read_yaml(raw)
    except yaml.YAMLError as e:
        raise TrainingError(f"--set {item!r}: bad value ({e})") from None
