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


def verify_dataset(root: str | Path) -> list[str]:
    """What is wrong with the dataset at `root`, one line each; [] when dataset.json, the manifest
    and the split files agree. Bytes or rows beyond what dataset.json counts are a killed run's,
    not damage (the next `prepare` cuts them), and are not reported."""
    root = Path(root)
    try:
        meta = read_meta(root)
    except DatasetError as e:
        return [str(e)]
    if meta is None:
        return [f"{root}: no dataset.json"]
    problems = []
    window = meta["window"]
    for split in SPLITS:
        path, need = root / f"{split}.u8", meta["splits"][split] * window
        size = path.stat().st_size if path.exists() else 0
        if size < need:
            problems.append(f"{path}: {size} bytes, but dataset.json counts {meta['splits'][split]} windows "
                            f"({need} bytes)")
    try:
        lines = (root / "manifest.jsonl").read_text().splitlines() if meta["sources"] else []
        rows = [json.loads(line) for line in lines if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        return [*problems, f"{root / 'manifest.jsonl'}: unreadable ({e})"]
    kept = [r for r in rows if r["split"] in SPLITS and committed(r, meta)]
    for split in SPLITS:
        offsets = sorted(r["offset"] for r in kept if r["split"] == split)
        if offsets != list(range(meta["splits"][split])):
            problems.append(f"{root / 'manifest.jsonl'}: the {split} rows cover {len(set(offsets))} distinct windows "
                            f"of the {meta['splits'][split]} that dataset.json counts")
    by_source: dict[str, int] = {}
    for r in kept:
        by_source[r["source"]] = by_source.get(r["source"], 0) + 1
    for src in meta["sources"]:
        if by_source.get(src["id"], 0) != src["windows"]:
            problems.append(f"{root / 'manifest.jsonl'}: {by_source.get(src['id'], 0)} rows for {src['name']}, "
                            f"which dataset.json says has {src['windows']} windows")
    return problems
