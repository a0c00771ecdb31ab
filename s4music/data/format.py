"""The on-disk format of a prepared dataset, shared by its writer (`prepare`) and its readers.

    dataset.json     format, sample rate, quantization scheme, window length, split fractions,
                     seed, the windows held by each split, and every source file it was built from
    manifest.jsonl   one line per window: id, source, path, duration, sample_rate, split, strata,
                     and its offset (window index) in its split file
    train.u8 ...     one flat uint8 file per split, windows back to back, read with np.memmap

dataset.json is the commit point: windows and manifest rows beyond the counts it gives are not
part of the dataset (a run that was killed wrote them), and the next `prepare` cuts them off.
"""

from __future__ import annotations

import json
from pathlib import Path

from s4music.errors import S4MusicError

FORMAT = "s4music-dataset"
SPLITS = ("train", "val", "test")


class DatasetError(S4MusicError):
    pass


def stratum_key(strata: dict[str, str]) -> str:
    """A stratum's name: its tags as sorted key=value pairs."""
    return ",".join(f"{k}={v}" for k, v in sorted(strata.items()))


def read_meta(root: Path) -> dict | None:
    """The dataset.json of `root`, checked; None when there is none."""
    path = root / "dataset.json"
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DatasetError(f"{path}: not an s4music dataset")
    return meta


def committed(row: dict, meta: dict) -> bool:
    """Whether a manifest row lies within the windows dataset.json counts."""
    return row["offset"] < meta["splits"][row["split"]]
