"""`s4music prepare`: audio files -> a training dataset of fixed windows of 8-bit codes.

The directory's layout is in `s4music.data.format`.

Every source file goes through `s4music.audio` (decode, mono, resample, quantize), as prompts do.
Whole files go to one split, so no file straddles two. Strata come from the first folder below the
source root (or the root's name) plus any `tags`; within each stratum, val and test receive their
share of files (at least one each from three files on). Assignment is reproducible from the seed
and each file's path relative to the source it was found under (so a copy of the collection in
another place splits the same way), and incremental: files already in the dataset keep their split;
new files fill the shortfalls. A split file (`pinned`) fixes the split of the files it lists, to
rebuild a published held-out set exactly.

Nothing is lost to a crash: windows are appended to the split files first and become part of the
dataset only when dataset.json (written last, atomically) counts them; bytes beyond those counts
are cut off at the next run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from s4music.audio import AUDIO_EXTENSIONS, SCHEMES, encode, load_audio
from s4music.data.progress import FileCounter, FileProgress
from s4music.data.format import FORMAT, SPLITS, DatasetError, committed, read_meta, stratum_key
from s4music.errors import S4MusicError
from s4music.files import DirectoryLock, atomic_path, remove_stale_temporaries, write_json
from s4music.options import split_assignment

log = logging.getLogger(__name__)
SILENCE_PEAK = 1e-3  # -60 dBFS
COMMIT_EVERY = 32  # files between commits


@dataclass
class PrepareOptions:
    seconds: float = 8.192  # the official window: 131,072 samples at 16 kHz
    sample_rate: int = 16000
    quantization: str = "mulaw-official"  # see s4music.audio.SCHEMES
    val_fraction: float = 0.06
    test_fraction: float = 0.06
    seed: int = 0
    tags: dict[str, str] | list[str] = field(default_factory=dict)  # stratum tags; "key=value" strings are parsed
    pinned: dict[str, str] = field(default_factory=dict)  # file name (as find_audio gives it) -> split, kept as given

    def __post_init__(self) -> None:
        """Check every option before anything is created, so a bad one leaves nothing behind."""
        if not isinstance(self.tags, dict):
            self.tags = dict(split_assignment(t, "--tag") for t in self.tags)
        problems = {
            "quantization": (self.quantization not in SCHEMES, f"use one of {', '.join(SCHEMES)}"),
            "seconds": (not self.seconds > 0, "must be positive"),
            "sample_rate": (not self.sample_rate > 0, "must be positive"),
            "val_fraction": (not 0 <= self.val_fraction < 1, "must be in [0, 1)"),
            "test_fraction": (not 0 <= self.test_fraction < 1, "must be in [0, 1)"),
        }
        for name, (bad, rule) in problems.items():
            if bad:
                raise DatasetError(f"{name}={getattr(self, name)!r}: {rule}")
        if self.val_fraction + self.test_fraction >= 1:
            raise DatasetError(f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g}: "
                               "leaves nothing to train on")
        if self.window < 1:
            raise DatasetError(f"seconds={self.seconds}: shorter than one sample at {self.sample_rate} Hz")

    @property
    def window(self) -> int:
        return int(round(self.seconds * self.sample_rate))


@dataclass
class PrepareReport:
    added: list[tuple[Path, str, int]] = field(default_factory=list)  # (file, split, windows)
    unchanged: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    summary: dict[tuple[str, str], float] = field(default_factory=dict)  # (split, stratum) -> hours
    unmatched_pins: list[str] = field(default_factory=list)  # names in the split file that no file under the sources has


def find_audio(sources: list[str | Path]) -> list[tuple[Path, str, str]]:
    """(file, folder stratum, name) for each audio file under `sources` (directories searched
    recursively); the name is the file's path relative to its source directory, or its file name."""
    found = []
    for source in map(Path, sources):
        if source.is_dir():
            for p in sorted(source.rglob("*")):
                rel = p.relative_to(source)
                # hidden files and folders are temporaries (a render or a download in progress)
                if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS and not any(s.startswith(".") for s in rel.parts):
                    found.append((p, rel.parts[0] if len(rel.parts) > 1 else source.resolve().name, rel.as_posix()))
        else:
            found.append((source, source.resolve().parent.name, source.name))
    return found


def _source_id(path: Path) -> str:
    return hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]


def _order_key(seed: int, name: str) -> str:
    return hashlib.sha1(f"{seed}:{name}".encode()).hexdigest()


def _targets(n: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Files each split should hold in a stratum of n files."""
    if n < 3:
        return {"train": n, "val": 0, "test": 0}
    test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    return {"train": n - val - test, "val": val, "test": test}


def assign_splits(existing: list[dict], new: list[dict], options: PrepareOptions) -> None:
    """Set new[i]["split"]: existing files keep theirs, pinned ones take theirs; the others fill each
    stratum's shortfalls, in an order fixed by the seed."""
    by_stratum: dict[str, list[dict]] = defaultdict(list)
    for src in new:
        by_stratum[stratum_key(src["strata"])].append(src)
    for key, items in by_stratum.items():
        have = defaultdict(int)
        for src in existing:
            if stratum_key(src["strata"]) == key:
                have[src["split"]] += 1
        target = _targets(sum(have.values()) + len(items), options.val_fraction, options.test_fraction)
        for src in items:
            if src["name"] in options.pinned:
                src["split"] = options.pinned[src["name"]]
                have[src["split"]] += 1
        free = [src for src in items if src["name"] not in options.pinned]
        for src in sorted(free, key=lambda s: _order_key(options.seed, s["name"])):
            short = [s for s in ("test", "val", "train") if have[s] < target[s]]
            src["split"] = short[0] if short else "train"
            have[src["split"]] += 1


def read_pinned_splits(path: str | Path) -> dict[str, str]:
    """A split file, {"train": [names], "val": [...], "test": [...]}, as file name -> split."""
    path = Path(path)
    try:
        lists = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read the split file ({e})") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(lists, dict) or not set(lists) <= set(SPLITS) or \
            not all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in lists.values()):
        raise DatasetError(f"{path}: expected {{\"train\": [file names], \"val\": [...], \"test\": [...]}}")
    pinned = {}
    for split, names in lists.items():
        for name in names:
            if pinned.setdefault(name, split) != split:
                raise DatasetError(f"{path}: {name} is listed in both {pinned[name]} and {split}")
    return pinned


def prepare(sources: list[str | Path], out: str | Path, options: PrepareOptions | None = None,
            on_file: FileProgress | None = None) -> PrepareReport:
    """Add the audio files under `sources` to the dataset at `out` (created if needed).

    `on_file(path, status, done, total)` follows every file found: "unchanged" (already in the
    dataset), "added" or "failed". One run at a time writes a dataset: a second one fails at once."""
    options = options or PrepareOptions()
    root = Path(out)
    with DirectoryLock(root, "prepare"):
        remove_stale_temporaries(root)
        return _prepare(sources, root, options, on_file)


def _prepare(sources: list[str | Path], root: Path, options: PrepareOptions, on_file: FileProgress | None) -> PrepareReport:
    meta = read_meta(root)
    if meta is None:
        meta = {
            "format": FORMAT, "version": 1, "sample_rate": options.sample_rate,
            "quantization": options.quantization, "window": options.window,
            "val_fraction": options.val_fraction, "test_fraction": options.test_fraction, "seed": options.seed,
            "splits": {s: 0 for s in SPLITS}, "sources": [],
        }
    else:  # an existing dataset fixes the conversion; a mismatch would mix two kinds of codes
        for key, value in (("sample_rate", options.sample_rate), ("quantization", options.quantization),
                           ("window", options.window)):
            if meta[key] != value:
                raise DatasetError(f"{root}: dataset has {key}={meta[key]}, not {value}; use a new directory")
        options = dataclasses.replace(options, seed=meta["seed"], val_fraction=meta["val_fraction"],
                                      test_fraction=meta["test_fraction"])
    window = meta["window"]
    _drop_uncommitted(root, meta)

    report = PrepareReport()
    known = {(s["path"], s["size"], s["mtime"]) for s in meta["sources"]}
    candidates = []
    found = find_audio(sources)
    names = {name for _, _, name in found}
    report.unmatched_pins = sorted(n for n in options.pinned if n not in names)
    progress = FileCounter(on_file, len(found))
    for path, folder, name in found:
        try:
            stat = path.stat()
        except OSError as e:
            report.failed.append((path, f"{path}: {e.strerror or e}"))
            progress(path, "failed")
            continue
        key = (str(path.resolve()), stat.st_size, stat.st_mtime)
        if key in known:
            report.unchanged += 1
            progress(path, "unchanged")
            continue
        candidates.append({"id": _source_id(path), "name": name, "path": key[0], "size": key[1], "mtime": key[2],
                           "strata": {"folder": folder, **options.tags}})

    assign_splits(meta["sources"], candidates, options)
    handles = {s: open(root / f"{s}.u8", "ab") for s in SPLITS}
    pending: list[dict] = []
    try:
        for src in candidates:
            path = Path(src["path"])
            try:
                codes = _windows(path, options, window)
            except S4MusicError as e:
                report.failed.append((path, str(e)))
                progress(path, "failed")
                continue
            split = src["split"]
            handles[split].write(codes.tobytes())
            src["windows"] = len(codes)
            src["first"] = meta["splits"][split] + sum(p["windows"] for p in pending if p["split"] == split)
            pending.append(src)
            report.added.append((path, split, len(codes)))
            progress(path, "added")
            if len(pending) >= COMMIT_EVERY:
                _commit(root, meta, pending, handles)
                pending = []
        _commit(root, meta, pending, handles)
    finally:
        for h in handles.values():
            h.close()
    report.summary = summarize(meta)
    return report


def _commit(root: Path, meta: dict, added: list[dict], handles) -> None:
    """Make appended windows part of the dataset: data synced, manifest rows, then dataset.json."""
    if not added:
        return
    for h in handles.values():
        h.flush()
        os.fsync(h.fileno())
    rows = []
    for src in added:
        first = src.pop("first")
        rows += [{
            "id": f"{src['id']}:{k}", "source": src["id"], "path": src["path"],
            "duration": meta["window"] / meta["sample_rate"], "sample_rate": meta["sample_rate"],
            "split": src["split"], "strata": src["strata"], "offset": first + k,
        } for k in range(src["windows"])]
    with open(root / "manifest.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())
    for src in added:
        meta["splits"][src["split"]] += src["windows"]
    meta["sources"].extend(added)
    write_json(root / "dataset.json", meta)  # the commit point


def _drop_uncommitted(root: Path, meta: dict) -> None:
    """Cut split files and manifest back to what dataset.json counts (after a crashed run)."""
    window = meta["window"]
    for split in SPLITS:
        path = root / f"{split}.u8"
        if path.exists() and path.stat().st_size > meta["splits"][split] * window:
            os.truncate(path, meta["splits"][split] * window)
    manifest = root / "manifest.jsonl"
    if manifest.exists():
        lines = manifest.read_text().splitlines()
        kept = [ln for ln in lines if ln.strip() and committed(json.loads(ln), meta)] if lines else []
        if len(kept) != len(lines):
            with atomic_path(manifest) as tmp:
                tmp.write_text("".join(ln + "\n" for ln in kept))


def _windows(path: Path, options: PrepareOptions, window: int) -> np.ndarray:
    audio = load_audio(path, options.sample_rate)
    if audio.samples.abs().max() < SILENCE_PEAK:
        raise DatasetError(f"{path}: silent (peak below -60 dBFS)")
    n = audio.samples.numel() // window
    if n == 0:
        raise DatasetError(f"{path}: shorter than one window ({audio.seconds:.2f} s < {options.seconds:g} s)")
    clips = audio.samples[: n * window].view(n, window)
    return encode(clips, options.quantization).numpy()


def summarize(meta: dict) -> dict[tuple[str, str], float]:
    """Hours of audio per (split, stratum)."""
    hours: dict[tuple[str, str], float] = defaultdict(float)
    for src in meta["sources"]:
        stratum = stratum_key(src["strata"])
        hours[(src["split"], stratum)] += src["windows"] * meta["window"] / meta["sample_rate"] / 3600
    return dict(sorted(hours.items()))
