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

Beyond one machine: with a `shard` ("i/n", see `s4music.options.Shard`) a run reads only the files
at sorted positions i-1, i-1+n, ... into a shard directory of its own, and `merge_shards` joins the
n shard directories into the dataset one run without shards would have written, byte for byte
(unless a file is a copy of one in another shard: a shard skips copies among its own files only).
The split assignment never depends on sharding: every shard lists the whole collection and assigns
every file its split, as one run does, then reads only its own. A shard directory records which
shard it is, of which sources and settings, each file's position, and whether it finished, so that
the merge can refuse shards that do not belong together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from s4music.audio import AUDIO_EXTENSIONS, encode, load_audio
from s4music.data.options import PrepareOptions
from s4music.data.progress import FileCounter, FileProgress
from s4music.data.format import FORMAT, SPLITS, DatasetError, committed, read_meta, stratum_key, verify_dataset
from s4music.errors import S4MusicError
from s4music.files import (DirectoryLock, atomic_directory, atomic_path, remove_stale_temporaries, visible_files,
                           write_json)
from s4music.options import Shard

log = logging.getLogger(__name__)
SILENCE_PEAK = 1e-3  # -60 dBFS
COMMIT_EVERY = 32  # files between commits


@dataclass
class PrepareReport:
    added: list[tuple[Path, str, int]] = field(default_factory=list)  # (file, split, windows)
    unchanged: int = 0
    copies: int = 0  # of these, files known by their bytes: under another name or path, or touched
    failed: list[tuple[Path, str]] = field(default_factory=list)
    summary: dict[tuple[str, str], float] = field(default_factory=dict)  # (split, stratum) -> hours
    unmatched_pins: list[str] = field(default_factory=list)  # names in the split file that no file under the sources has


def find_audio(sources: list[str | Path]) -> list[tuple[Path, str, str]]:
    """(file, folder stratum, name) for each audio file under `sources` (directories searched
    recursively); the name is the file's path relative to its source directory, or its file name."""
    found = []
    for source in map(Path, sources):
        if source.is_dir():
            for p in visible_files(source, AUDIO_EXTENSIONS):
                rel = p.relative_to(source)
                found.append((p, rel.parts[0] if len(rel.parts) > 1 else source.resolve().name, rel.as_posix()))
        else:
            found.append((source, source.resolve().parent.name, source.name))
    return found


def _source_id(path: Path) -> str:
    return hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]


def _content(path: Path) -> str:
    """A digest of the file's bytes: copies of one file, under any name, have the same."""
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except OSError as e:
        raise DatasetError(f"{path}: {e.strerror or e}") from None
    return digest.hexdigest()[:16]


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
        n, held = sum(have.values()), have["val"] + have["test"]
        forced = [s for s, f in (("val", options.val_fraction), ("test", options.test_fraction))
                  if f > 0 and round(n * f) == 0]
        if forced and held and len(free) == n:  # a new stratum, split by the fractions alone
            log.warning("%s: %d of its %d files are held out, as %s take%s at least one file each; for more to "
                        "train on, add files%s", key, held, n, " and ".join(forced),
                        "" if len(forced) > 1 else "s", " or give --test 0" if "test" in forced else "")


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
    dataset), "added" or "failed". One run at a time writes a dataset: a second one fails at once.

    With `options.shard`, `out` is a shard directory: only that shard's files are read (and
    followed by `on_file`), with the splits the whole collection gives them; a shard run that
    stopped resumes like any other. `merge_shards` joins the finished shards."""
    options = options or PrepareOptions()
    root = Path(out)
    with DirectoryLock(root, "prepare"):
        remove_stale_temporaries(root)
        return _prepare(sources, root, options, on_file)


def _prepare(sources: list[str | Path], root: Path, options: PrepareOptions, on_file: FileProgress | None) -> PrepareReport:
    found = find_audio(sources)
    shard = options.shard
    block = _shard_block(shard, sources, found, options) if shard is not None else None
    meta = read_meta(root)
    if meta is None:
        meta = {
            "format": FORMAT, "version": 1, "sample_rate": options.sample_rate,
            "quantization": options.quantization, "window": options.window,
            "val_fraction": options.val_fraction, "test_fraction": options.test_fraction, "seed": options.seed,
            "splits": {s: 0 for s in SPLITS}, "sources": [],
        }
        if block is not None:
            meta["shard"] = block
    else:  # an existing dataset fixes the conversion; a mismatch would mix two kinds of codes
        for key, value in (("sample_rate", options.sample_rate), ("quantization", options.quantization),
                           ("window", options.window)):
            if meta[key] != value:
                raise DatasetError(f"{root}: dataset has {key}={meta[key]}, not {value}; use a new directory")
        _check_same_shard(root, meta.get("shard"), block)
        options = dataclasses.replace(options, seed=meta["seed"], val_fraction=meta["val_fraction"],
                                      test_fraction=meta["test_fraction"])
    if block is not None:  # until this run has tried every file of the shard, the merge refuses it
        meta["shard"] = {**meta["shard"], "complete": False}
    window = meta["window"]
    _drop_uncommitted(root, meta)

    report = PrepareReport()
    known = {(s["path"], s["size"], s["mtime"]) for s in meta["sources"]}
    names = {name for _, _, name in found}
    report.unmatched_pins = sorted(n for n in options.pinned if n not in names)
    # Every file found that is not in the dataset yet takes part in the split assignment, whether
    # this run reads it (its shard's) or not, and whether it then fails or not: so a file's split
    # never depends on the shards, nor on another file's failure.
    assigned: list[dict] = []
    candidates = []  # the files this run reads
    mine = len(found) if shard is None else len(range(shard.index - 1, len(found), shard.count))
    progress = FileCounter(on_file, mine)
    for position, (path, folder, name) in enumerate(found):
        strata = {"folder": folder, **options.tags}
        if shard is not None and not shard.owns(position):
            assigned.append({"name": name, "strata": strata})
            continue
        try:
            stat = path.stat()
        except OSError as e:
            report.failed.append((path, f"{path}: {e.strerror or e}"))
            progress(path, "failed")
            assigned.append({"name": name, "strata": strata})
            continue
        key = (str(path.resolve()), stat.st_size, stat.st_mtime)
        if key in known:
            report.unchanged += 1
            progress(path, "unchanged")
            continue
        src = {"id": _source_id(path), "name": name, "path": key[0], "size": key[1], "mtime": key[2], "strata": strata}
        if shard is not None:
            src["position"] = position  # where the merge puts it back
        candidates.append(src)
        assigned.append(src)

    assign_splits(meta["sources"], assigned, options)
    handles = {s: open(root / f"{s}.u8", "ab") for s in SPLITS}
    pending: list[dict] = []
    lost: set[str] = set()  # splits that a file which failed was drawn for
    # A copy of a file already in the dataset would be the same music twice, maybe in train and test;
    # and a file moved or touched would be added again.
    contents = {s["content"]: s["name"] for s in meta["sources"] if "content" in s}
    try:
        for src in candidates:
            path = Path(src["path"])
            try:
                src["content"] = _content(path)
                if src["content"] in contents:  # a copy, moved, or touched: its music is in already
                    log.info("%s: the same file as %s, already in the dataset", path, contents[src["content"]])
                    report.unchanged += 1
                    report.copies += 1
                    progress(path, "unchanged")
                    continue
                codes = _windows(path, options, window)
            except S4MusicError as e:
                report.failed.append((path, str(e)))
                progress(path, "failed")
                lost.add(src["split"])
                continue
            contents[src["content"]] = src["name"]
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
    if shard is not None:  # every file of the shard has been tried: the merge may take it
        meta["shard"] = {**meta["shard"], "complete": True,
                         "failed": [{"path": str(p), "reason": r} for p, r in report.failed]}
        write_json(root / "dataset.json", meta)
    report.summary = summarize(meta)
    if shard is None:
        for split, fraction in (("val", options.val_fraction), ("test", options.test_fraction)):
            if fraction > 0 and meta["splits"][split] == 0:
                log.warning("%s: the %s split is empty (%s); new files fill it first: add music (or the failed "
                            "files, fixed) and prepare again", root, split,
                            "its files failed to read" if split in lost else "no file went to it")
    return report


# What a shard records of the run that wrote it: shards merge only when these agree.
SHARD_SETTINGS = ("sample_rate", "quantization", "window", "val_fraction", "test_fraction", "seed")
SHARD_SOURCES = ("files", "listing", "tags", "pinned")


def _shard_block(shard: Shard, sources: list[str | Path], found: list[tuple[Path, str, str]],
                 options: PrepareOptions) -> dict:
    """dataset.json's "shard" entry: which shard, of which collection (a digest of the sources and
    every file's name and stratum folder) and stratum tags and pinned splits; not yet complete."""
    listing = hashlib.sha256()
    for source in sources:
        listing.update(f"{Path(source).resolve()}\n".encode())
    for _, folder, name in found:
        listing.update(f"{folder}\t{name}\n".encode())
    pinned = hashlib.sha256(json.dumps(sorted(options.pinned.items())).encode()).hexdigest()
    return {"index": shard.index, "count": shard.count, "files": len(found), "listing": listing.hexdigest(),
            "tags": dict(options.tags), "pinned": pinned, "complete": False, "failed": []}


def _check_same_shard(root: Path, have: dict | None, want: dict | None) -> None:
    """Refuse to continue a dataset as another kind: a shard as a whole dataset, or as another shard."""
    if have is None and want is None:
        return
    if have is None:
        raise DatasetError(f"{root}: a whole dataset, not a shard; give each shard a new directory")
    held = f"shard {have['index']}/{have['count']}"
    if want is None:
        raise DatasetError(f"{root}: holds {held}; continue it with --shard {have['index']}/{have['count']}, "
                           "or merge the shards with --merge")
    if (have["index"], have["count"]) != (want["index"], want["count"]):
        raise DatasetError(f"{root}: holds {held}, not shard {want['index']}/{want['count']}; "
                           "give each shard its own directory")
    for key in SHARD_SOURCES:
        if have[key] != want[key]:
            raise DatasetError(f"{root}: holds {held} of other sources or settings ({_what_differs(key)}); "
                               "use a new directory")


def _what_differs(key: str) -> str:
    return {"files": "the sources list other files", "listing": "the sources list other files",
            "tags": "other --tag", "pinned": "another --splits file"}.get(key, f"another {key}")


def _commit(root: Path, meta: dict, added: list[dict], handles) -> None:
    """Make appended windows part of the dataset: data synced, manifest rows, then dataset.json."""
    if not added:
        return
    for h in handles.values():
        h.flush()
        os.fsync(h.fileno())
    lines = "".join(_manifest_lines(meta, src, src.pop("first")) for src in added)
    with open(root / "manifest.jsonl", "a") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())
    for src in added:
        meta["splits"][src["split"]] += src["windows"]
    meta["sources"].extend(added)
    write_json(root / "dataset.json", meta)  # the commit point


def _manifest_lines(meta: dict, src: dict, first: int) -> str:
    """manifest.jsonl's lines for the windows of `src`, the first at offset `first` of its split."""
    return "".join(json.dumps({
        "id": f"{src['id']}:{k}", "source": src["id"], "path": src["path"],
        "duration": meta["window"] / meta["sample_rate"], "sample_rate": meta["sample_rate"],
        "split": src["split"], "strata": src["strata"], "offset": first + k,
    }) + "\n" for k in range(src["windows"]))


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


def merge_shards(shards: list[str | Path], out: str | Path) -> PrepareReport:
    """Join the shard directories that `prepare` wrote with shards 1/n to n/n into one dataset at
    `out`: the dataset one run without shards would have written, byte for byte (dataset.json,
    manifest.jsonl and the split files).

    Every shard must be given once and have finished, and all must come from the same sources with
    the same settings; anything else is a one-line error naming the shard's directory, before
    anything is written. `out` must be new (or an empty directory); it is written in a temporary
    directory beside it and renamed into place, so it appears whole or not at all. The report lists
    every file in the dataset as added, the files the shards failed on, and the hours per split and
    stratum."""
    dirs = [Path(d) for d in shards]
    out = Path(out)
    if not dirs:
        raise DatasetError("no shard directories to merge")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out}: exists; merge the shards into a new directory")
    if any(out.resolve() == d.resolve() for d in dirs):
        raise DatasetError(f"{out}: is one of the shards; merge them into a new directory")
    with contextlib.ExitStack() as locks:
        metas, given = [], set()
        for d in dirs:
            if d.resolve() in given:
                raise DatasetError(f"{d}: given twice; give each shard directory once")
            given.add(d.resolve())
            if not (d / "dataset.json").exists():  # before the lock, which would create the directory
                raise DatasetError(f"{d}: no dataset.json; not a shard that prepare --shard wrote")
            locks.enter_context(DirectoryLock(d, "prepare"))
            metas.append((d, _read_shard(d)))
        entries = _merge_order(metas)
        report = PrepareReport()
        with atomic_directory(out) as tmp:
            merged = _write_merged(metas, entries, tmp)
    for _, meta in metas:
        report.failed += [(Path(f["path"]), f["reason"]) for f in meta["shard"]["failed"]]
    report.added = [(Path(src["path"]), src["split"], src["windows"]) for src in merged["sources"]]
    report.summary = summarize(merged)
    return report


def _read_shard(root: Path) -> dict:
    meta = read_meta(root)
    if meta is None:
        raise DatasetError(f"{root}: no dataset.json; not a shard that prepare --shard wrote")
    if "shard" not in meta:
        raise DatasetError(f"{root}: a whole dataset (prepared without --shard), not a shard")
    return meta


def _merge_order(metas: list[tuple[Path, dict]]) -> list[tuple[int, Path, dict, int]]:
    """Check that the shards belong together; (position, shard directory, source, offset of its
    first window in the shard's split file) for every source, in the order one run reads them."""
    first_dir, first = metas[0]
    count = first["shard"]["count"]
    seen: dict[int, Path] = {}
    for d, meta in metas:
        shard = meta["shard"]
        name = f"shard {shard['index']}/{shard['count']}"
        if shard["count"] != count:
            raise DatasetError(f"{d}: {name}, but {first_dir} is a shard of {count}; "
                               "merge shards of one --shard i/n run")
        if shard["index"] in seen:
            raise DatasetError(f"{d}: {name} again ({seen[shard['index']]} holds it too)")
        seen[shard["index"]] = d
        for key in SHARD_SETTINGS:
            if meta[key] != first[key]:
                raise DatasetError(f"{d}: {name} has {key}={meta[key]}, but {first_dir} has {key}={first[key]}; "
                                   "shards must share every prepare setting")
        for key in SHARD_SOURCES:
            if shard[key] != first["shard"][key]:
                raise DatasetError(f"{d}: {name} differs from {first_dir} ({_what_differs(key)}); "
                                   "shards must read the same sources with the same settings")
        if not shard["complete"]:
            raise DatasetError(f"{d}: {name} has not finished; run its prepare --shard again (it resumes)")
        problems = verify_dataset(d)
        if problems:
            raise DatasetError(f"{d}: {name} is damaged ({problems[0]})")
    missing = [i for i in range(1, count + 1) if i not in seen]
    if missing:
        given = ", ".join(str(d) for d in list(seen.values())[:4]) + (", ..." if len(seen) > 4 else "")
        raise DatasetError(f"shard {missing[0]}/{count} is missing: no directory given holds it "
                           f"({len(missing)} of {count} missing; given {given})")
    entries = []
    for d, meta in metas:
        shard = Shard(meta["shard"]["index"], count)
        at = dict.fromkeys(SPLITS, 0)
        for src in meta["sources"]:  # a split file holds its sources' windows in their order
            position = src.get("position")
            if not isinstance(position, int) or not shard.owns(position):
                raise DatasetError(f"{d}: {src['name']} is not a file of shard {shard}")
            entries.append((position, d, src, at[src["split"]]))
            at[src["split"]] += src["windows"]
    entries.sort(key=lambda e: e[0])
    for a, b in itertools.pairwise(entries):
        if a[0] == b[0]:
            raise DatasetError(f"{b[1]}: holds {b[2]['name']} twice (it changed between runs); "
                               "prepare this shard again into a new directory")
    return entries


def _write_merged(metas: list[tuple[Path, dict]], entries: list[tuple[int, Path, dict, int]], tmp: Path) -> dict:
    """Write the merged dataset into `tmp`, as one run would have appended it; returns its dataset.json."""
    merged = {k: v for k, v in metas[0][1].items() if k != "shard"}
    merged["splits"], merged["sources"] = {s: 0 for s in SPLITS}, []
    window = merged["window"]
    with contextlib.ExitStack() as files:
        outputs = {s: files.enter_context(open(tmp / f"{s}.u8", "wb")) for s in SPLITS}
        manifest = files.enter_context(open(tmp / "manifest.jsonl", "w")) if entries else None
        inputs: dict[tuple[Path, str], object] = {}
        for _, d, src, offset in entries:
            split = src["split"]
            if (d, split) not in inputs:
                inputs[(d, split)] = files.enter_context(open(d / f"{split}.u8", "rb"))
            source = inputs[(d, split)]
            source.seek(offset * window)
            left = src["windows"] * window
            while left:
                block = source.read(min(left, 1 << 26))
                if not block:
                    raise DatasetError(f"{d / f'{split}.u8'}: ends before the windows of {src['name']}")
                outputs[split].write(block)
                left -= len(block)
            src = {k: v for k, v in src.items() if k != "position"}
            manifest.write(_manifest_lines(merged, src, merged["splits"][split]))
            merged["splits"][split] += src["windows"]
            merged["sources"].append(src)
    write_json(tmp / "dataset.json", merged)
    return merged


def summarize(meta: dict) -> dict[tuple[str, str], float]:
    """Hours of audio per (split, stratum)."""
    hours: dict[tuple[str, str], float] = defaultdict(float)
    for src in meta["sources"]:
        stratum = stratum_key(src["strata"])
        hours[(src["split"], stratum)] += src["windows"] * meta["window"] / meta["sample_rate"] / 3600
    return dict(sorted(hours.items()))
