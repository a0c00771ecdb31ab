"""Reading prepared datasets, and sampling training windows from a weighted mixture of them.

    mixture = WindowMixture.from_specs(["piano:0.7", "jazz:0.3"], length=16000, seed=0)
    codes = mixture.sample(batch=4)            # (4, 16000) int64 codes
    mixture.proportions()                      # the shares actually drawn so far, per dataset

Windows are memory-mapped, never loaded whole. The sampler's position is its generator state, so a
resumed training run draws exactly the windows an uninterrupted one would have.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from s4music.data.format import SPLITS, DatasetError, committed, read_meta


class PreparedDataset:
    """A dataset directory written by `prepare`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta = read_meta(self.root)
        if meta is None:
            raise DatasetError(f"{self.root}: not a dataset (no dataset.json; build one with `s4music prepare`)")
        self.meta = meta
        self.window: int = self.meta["window"]
        self.sample_rate: int = self.meta["sample_rate"]
        self.quantization: str = self.meta["quantization"]

    @property
    def name(self) -> str:
        return self.root.name

    def count(self, split: str) -> int:
        return self.meta["splits"][split]

    def windows(self, split: str) -> np.ndarray:
        """(n, window) uint8, memory-mapped; only what dataset.json counts."""
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; use one of {SPLITS}")
        n = self.count(split)
        if n == 0:
            return np.zeros((0, self.window), dtype=np.uint8)
        return np.memmap(self.root / f"{split}.u8", dtype=np.uint8, mode="r", shape=(n, self.window))

    def manifest(self, split: str | None = None) -> list[dict]:
        """Manifest rows of committed windows, in split-file order."""
        rows = []
        with open(self.root / "manifest.jsonl") as f:
            for line in f:
                row = json.loads(line)
                if committed(row, self.meta) and (split is None or row["split"] == split):
                    rows.append(row)
        return sorted(rows, key=lambda r: (r["split"], r["offset"]))


def parse_spec(spec: str) -> tuple[str, float]:
    """'path:weight' (weight optional, default 1) -> (path, weight)."""
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            value = float(weight)
        except ValueError:
            return spec, 1.0
        if value <= 0:
            raise DatasetError(f"{spec}: a mixture weight must be positive")
        return path, value
    return spec, 1.0


class WindowMixture:
    """Random training windows from several datasets, each chosen with probability ~ its weight."""

    def __init__(self, datasets: list[tuple[PreparedDataset, float]], length: int, split: str = "train",
                 seed: int = 0):
        if not datasets:
            raise DatasetError("no datasets given")
        first = datasets[0][0]
        for ds, _ in datasets:
            if (ds.sample_rate, ds.quantization) != (first.sample_rate, first.quantization):
                raise DatasetError(
                    f"{ds.root}: {ds.sample_rate} Hz {ds.quantization} does not match {first.root}: "
                    f"{first.sample_rate} Hz {first.quantization}; a mixture needs one conversion")
            if ds.window < length:
                raise DatasetError(f"{ds.root}: windows of {ds.window} samples are shorter than {length}")
            if ds.count(split) == 0:
                raise DatasetError(f"{ds.root}: the {split} split is empty")
        self.datasets = [ds for ds, _ in datasets]
        weights = torch.tensor([w for _, w in datasets], dtype=torch.float64)
        self.weights = weights / weights.sum()
        self.length, self.split = length, split
        self.arrays = [ds.windows(split) for ds in self.datasets]
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = [0] * len(self.datasets)

    @classmethod
    def from_specs(cls, specs: list[str], length: int, split: str = "train", seed: int = 0) -> WindowMixture:
        parsed = [parse_spec(s) for s in specs]
        return cls([(PreparedDataset(p), w) for p, w in parsed], length, split, seed)

    @property
    def sample_rate(self) -> int:
        return self.datasets[0].sample_rate

    @property
    def quantization(self) -> str:
        return self.datasets[0].quantization

    def sample(self, batch: int) -> torch.Tensor:
        """(batch, length) int64 codes: a dataset by weight, a window, an offset within it."""
        which = torch.multinomial(self.weights, batch, replacement=True, generator=self.generator)
        out = torch.empty(batch, self.length, dtype=torch.long)
        for i, d in enumerate(which.tolist()):
            arr = self.arrays[d]
            w = int(torch.randint(len(arr), (1,), generator=self.generator))
            start = int(torch.randint(arr.shape[1] - self.length + 1, (1,), generator=self.generator))
            out[i] = torch.from_numpy(np.asarray(arr[w, start : start + self.length], dtype=np.int64))
            self.drawn[d] += 1
        return out

    def proportions(self) -> dict[str, float]:
        """Share of windows actually drawn from each dataset so far."""
        total = max(1, sum(self.drawn))
        return {ds.name: n / total for ds, n in zip(self.datasets, self.drawn, strict=True)}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "drawn": list(self.drawn)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.drawn = list(state["drawn"])
