"""`s4music eval`: test negative log-likelihood in bits per sample, by stratum, with baselines.

The model's NLL is the cross-entropy over the 8-bit codes divided by ln 2, with the official input
shift (the first code is predicted from the start code alone), averaged over every test sample.
Each window is scored in segments of `context` samples, each read from rest; the default context
is the whole window, as the paper scores whole clips.

Two baselines come in the same table, and a trained model should beat both:
    unigram  the entropy of the test codes' own histogram (the best context-free coder for them)
    bigram   p(code | previous code), counted on the train split with add-one smoothing

The 95% interval comes from a bootstrap over source files (windows of one file are not
independent, so resampling windows would understate the uncertainty).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from s4music.audio import decode, spectral_flatness
from s4music.data.dataset import PreparedDataset
from s4music.data.format import stratum_key
from s4music.dsp import dbfs, loudness_lufs
from s4music.errors import S4MusicError
from s4music.eval_options import EvalOptions
from s4music.model.fast import reader
from s4music.model.registry import load_model
from s4music.model.sashimi import SaShiMi

log = logging.getLogger(__name__)
FLATNESS_QUANTILES = {"min": 0, "p5": 5, "median": 50, "p95": 95, "max": 100}  # name -> percentile


class EvalError(S4MusicError):
    pass


@dataclass
class StratumResult:
    stratum: str
    windows: int
    samples: int
    model_bits: float
    unigram_bits: float
    bigram_bits: float


@dataclass
class EvalReport:
    model: str
    dataset: str
    split: str
    context: int
    strata: list[StratumResult]
    overall: StratumResult
    interval: tuple[float, float]  # bootstrap 95% interval of the overall model bits/sample
    flatness: dict[str, float] = field(default_factory=dict)  # spectral flatness of the windows: FLATNESS_QUANTILES
    level: dict[str, float | None] = field(default_factory=dict)  # the windows' loudness: audio_level
    per_source: dict[str, tuple[float, int]] = field(default_factory=dict)  # source -> (bits sum, samples)

    def to_dict(self) -> dict:
        return {"model": self.model, "dataset": self.dataset, "split": self.split, "context": self.context,
                "strata": [asdict(r) for r in self.strata], "overall": asdict(self.overall),
                "interval_95": list(self.interval), "flatness": self.flatness, "level": self.level}


def entropy_bits(counts: np.ndarray) -> float:
    """Entropy of a histogram, in bits."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def bigram_table(windows: np.ndarray, n_codes: int = 256) -> np.ndarray:
    """-log2 p(code | previous code) as (n_codes, n_codes), counted over windows with add-one smoothing."""
    counts = np.ones((n_codes, n_codes), dtype=np.float64)
    for w in windows:
        w = np.asarray(w, dtype=np.int64)
        np.add.at(counts, (w[:-1], w[1:]), 1)
    return -np.log2(counts / counts.sum(axis=1, keepdims=True))


def bigram_bits(table: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Bits of each window's transitions (its first code is not scored): (n,) sums."""
    w = np.asarray(windows, dtype=np.int64)
    return table[w[:, :-1], w[:, 1:]].sum(axis=1)


@torch.no_grad()
def window_bits(model: SaShiMi, codes: torch.Tensor, context: int) -> torch.Tensor:
    """Summed model bits of each window: codes (B, W) -> (B,), segments of `context` read from rest."""
    total = torch.zeros(codes.shape[0], dtype=torch.float64)
    read = reader(model)
    for start in range(0, codes.shape[1], context):
        total += read.bits(codes[:, start : start + context].to(model.device)).double().sum(dim=1).cpu()
    return total


def evaluate(model_path: str | Path, data: str | Path, options: EvalOptions | None = None,
             on_progress: Callable[[int, int], None] | None = None) -> EvalReport:
    """Score `options.split` of a prepared dataset with a checkpoint. See the module docstring."""
    options = options or EvalOptions()
    split, batch_size, max_windows = options.split, options.batch_size, options.max_windows
    model = load_model(model_path, device=options.device)
    dataset = PreparedDataset(data)
    why = model.audio.mismatch(dataset.sample_rate, dataset.quantization)
    if why:  # a model scores only codes made the way its training data was
        raise EvalError(f"{model_path} on {dataset.root}: {why}")
    windows = dataset.windows(split)
    rows = dataset.manifest(split)
    if max_windows is not None:
        if max_windows < 1:
            raise EvalError(f"max_windows must be at least 1, not {max_windows}")
        windows, rows = windows[:max_windows], rows[:max_windows]
    if len(windows) == 0:
        others = [s for s in ("test", "val", "train") if s != split and dataset.count(s)]
        hint = f"; score another with --split {others[0]}" if others else ""
        raise EvalError(f"{dataset.root}: the {split} split is empty{hint}")
    context = options.context or dataset.window
    if context < 1:
        raise EvalError(f"context must be positive, not {context}")

    model_sums = np.zeros(len(windows))
    for start in range(0, len(windows), batch_size):
        chunk = torch.from_numpy(np.asarray(windows[start : start + batch_size], dtype=np.int64))
        model_sums[start : start + len(chunk)] = window_bits(model, chunk, context).numpy()
        if on_progress is not None:
            on_progress(start + len(chunk), len(windows))
    table = bigram_table(dataset.windows("train") if dataset.count("train") else windows)
    bigram_sums = bigram_bits(table, windows)

    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[stratum_key(row.get("strata") or {}) or "all"].append(i)
    width = windows.shape[1]

    def result(name: str, idx: list[int]) -> StratumResult:
        codes = np.asarray(windows[idx])
        return StratumResult(
            stratum=name, windows=len(idx), samples=len(idx) * width,
            model_bits=float(model_sums[idx].sum() / (len(idx) * width)),
            unigram_bits=entropy_bits(np.bincount(codes.ravel(), minlength=256)),
            bigram_bits=float(bigram_sums[idx].sum() / (len(idx) * (width - 1))),
        )

    strata = [result(name, idx) for name, idx in sorted(groups.items())]
    overall = result("all", list(range(len(windows))))
    if dataset.count("train") and overall.model_bits >= overall.bigram_bits:  # a bigram of the scored codes would flatter itself
        log.warning("%s: the model is no better here than the bigram baseline (each code predicted from the one "
                    "before it, counted on the train split): it has not learned this music", dataset.root)
    sources: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        sources[row["source"]].append(i)
    per_source = {s: (float(model_sums[idx].sum()), len(idx) * width) for s, idx in sources.items()}
    interval = bootstrap_interval(list(per_source.values()), options.bootstrap, options.seed)
    flat, lufs, peaks = [], [], []
    for w in windows:  # one window decoded at a time: a test split can hold hours
        wave = decode(torch.from_numpy(np.array(w)), dataset.quantization)
        flat.append(spectral_flatness(wave))
        lufs.append(loudness_lufs(wave, dataset.sample_rate))
        peaks.append(float(wave.abs().max()))
    quantiles = np.percentile(flat, list(FLATNESS_QUANTILES.values()))
    return EvalReport(model=str(model_path), dataset=str(dataset.root), split=split, context=context,
                      strata=strata, overall=overall, interval=interval, per_source=per_source,
                      flatness={k: float(v) for k, v in zip(FLATNESS_QUANTILES, quantiles, strict=True)},
                      level=audio_level(lufs, peaks))


def audio_level(lufs: list[float | None], peaks: list[float]) -> dict[str, float | None]:
    """How loud the scored audio is, for `generate` to set an improvisation's gain by, from each
    window's integrated loudness (None where silent) and peak: the power mean of the loudness
    (LUFS) and the median window's peak (dBFS; the loudest window's peak is near full scale in 8-bit
    mu-law, whatever the music)."""
    powers = [10 ** (v / 10) for v in lufs if v is not None]
    peak = float(np.median(peaks)) if peaks else 0.0
    return {"lufs": 10 * math.log10(sum(powers) / len(powers)) if powers else None,
            "peak_dbfs": dbfs(peak) if peak > 0 else None}


def bootstrap_interval(units: list[tuple[float, int]], rounds: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of sum(bits)/sum(samples), resampling (bits, samples) units."""
    bits = np.array([b for b, _ in units])
    counts = np.array([n for _, n in units], dtype=np.float64)
    point = bits.sum() / counts.sum()
    if len(units) < 2 or rounds < 1:
        return (point, point)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(units), size=(rounds, len(units)))
    estimates = bits[picks].sum(axis=1) / counts[picks].sum(axis=1)
    lo, hi = np.percentile(estimates, [2.5, 97.5])
    return (float(lo), float(hi))


def record_result(checkpoint: str | Path, report: EvalReport) -> None:
    """Keep the overall result in the checkpoint summary, where prompt guidance reads it."""
    from s4music.model.checkpoint import update_summary

    o = report.overall
    update_summary(checkpoint, {"test_bits": o.model_bits, "eval": {
        "dataset": Path(report.dataset).name, "split": report.split, "context": report.context, "windows": o.windows,
        "model_bits": o.model_bits, "unigram_bits": o.unigram_bits, "bigram_bits": o.bigram_bits,
        "interval_95": list(report.interval), "flatness": report.flatness, "level": report.level,
        "strata": [vars(r) for r in report.strata]}})
