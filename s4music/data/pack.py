"""`s4music pack` and `unpack`: a prepared dataset as parts small enough to travel (to a GPU machine
whose transfers are limited), and back.

`pack` deals whole source files to parts in a seeded order, so every part is a random sample of
the whole dataset, and writes each part as one complete small dataset (its windows, manifest rows
and dataset.json) compressed as it is filled: a part takes each source offered to it that the bytes
compressed so far say still fits, and skips the rest, so parts come out nearly full and are
compressed once (again, without its last source, in the rare case one compressed worse than its
margin allowed).
The compression is lossless: LZMA2 after a delta filter, which brings 8-bit mu-law
codes of music to about 4.7-5.3 bits a sample (about 35 MB an hour) at about 200x real time a core.
Its match finder (a 3-byte hash chain, one link deep) is 3x faster than preset 6's for 0.6-0.9%
more size; preset 9e was 1% larger than preset 6 and 1.3-1.6x slower, presets 0-1 11-13% larger,
and size is what limits a lease. A lossy codec was measured and refused: Opus even at 64 kbit/s
moved the bundled model's bits per sample by 0.2-0.4, far past the 0.02 allowed (both in
examples/corpus/README.md). `pack.json` lists each part with its size, SHA-256, windows and hours.
A pack stopped part-way resumes: a part an earlier run wrote from the same dataset, dealt the same
way (planner, `part_mb`, seed), holding sources offered to it, and whole, is kept as it is;
once every source is dealt, part files an earlier pack wrote past the new count are removed.

`unpack` checks every part it is given against its checksum first, then decompresses the parts in
parallel (a process per core) into OUT/NAME/, each written to a temporary folder and renamed into
place: a missing or damaged part is a one-line error that names it, and nothing half-written is
left. Training reads the unpacked parts as a mixture (`--data OUT/part-000 --data OUT/part-001 ...`).
"""

from __future__ import annotations

import json
import lzma
import os
import random
import shutil
import struct
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from s4music.data.format import SPLITS, DatasetError, committed, read_meta
from s4music.files import DirectoryLock, atomic_path, remove_stale_temporaries, sha256_of, write_json

PACK_FORMAT = "s4music-pack"
INDEX = "pack.json"
# lc=4, pb=0: a literal's context is the previous delta's top 4 bits, not byte positions (1% smaller).
# A 3-byte hash chain followed one link deep: audio codes rarely repeat for long, so preset 6's binary
# tree and 64-byte matches cost 3x the time to save 0.6-0.9% of the size (benchmarks/bench_data.py).
LZMA_FILTERS = [{"id": lzma.FILTER_DELTA, "dist": 1},
                {"id": lzma.FILTER_LZMA2, "preset": 6, "lc": 4, "lp": 0, "pb": 0, "mf": lzma.MF_HC3, "nice_len": 8,
                 "depth": 1}]
_MAGIC = b"S4MPACK2"
_OFFER = 1.25  # a part is offered sources for this many parts, by the ratio so far, and gives back the rest
_ENCODER_LAG = 2**17  # compressed bytes LZMA2 may hold back (its chunks are at most 64 KiB)


class PackError(DatasetError):
    pass


@dataclass
class PackedPart:
    name: str
    path: Path
    bytes: int
    windows: int
    hours: float
    kept: bool = False  # written by an earlier run, and kept
    windows_left: int = 0  # of the dataset, not yet in a part


def _rows_by_source(root: Path, meta: dict) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = defaultdict(list)
    for line in (root / "manifest.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if committed(row, meta):
                rows[row["source"]].append(row)
    return rows


def _encode_part(meta: dict, take: list[dict], rows: dict[str, list[dict]], splits: dict[str, np.ndarray],
                 dealt: dict, limit: int, ratio: float) -> tuple[bytes, list[dict]]:
    """Compress the sources of `take` that fit in `limit` bytes, in one pass: a source is fed to the
    compressor while the bytes out so far, the ratio so far (`ratio` before 2 MiB are in) and a margin
    say it fits, and skipped otherwise. (The part, the sources it holds.)

    A part is its windows, source by source, then its header (its dataset.json, manifest and how
    parts were dealt) and the header's length, so the header can list what was fed."""
    window = meta["window"]
    compressor = lzma.LZMACompressor(format=lzma.FORMAT_XZ, filters=LZMA_FILTERS)
    out = [compressor.compress(_MAGIC)]
    produced, consumed = len(out[0]), 0
    held, manifest, counts = [], [], {s: 0 for s in SPLITS}
    header = len(json.dumps({"dataset": _without_sources(meta), "dealt": dealt}))  # bounds its compressed size, as it grows
    for src in take:
        src_rows = sorted(rows[src["id"]], key=lambda r: r["offset"])
        raw = len(src_rows) * window
        more = sum(len(json.dumps(r)) for r in src_rows) + len(json.dumps(src))
        so_far = produced / consumed if consumed >= 2**21 else ratio
        if held and produced + _ENCODER_LAG + header + more + 1.1 * so_far * raw > limit:
            continue  # a smaller source later in `take` may still fit
        for row in src_rows:
            produced += len(chunk := compressor.compress(splits[row["split"]][row["offset"]]))
            out.append(chunk)
            manifest.append({**row, "offset": counts[row["split"]]})
            counts[row["split"]] += 1
        consumed += raw
        header += more
        held.append(src)
    part_meta = {**meta, "sources": held, "splits": counts}
    head = json.dumps({"format": PACK_FORMAT, "dataset": part_meta, "manifest": manifest, "dealt": dealt}).encode()
    out += [compressor.compress(head + struct.pack("<Q", len(head))), compressor.flush()]
    return b"".join(out), held


def _without_sources(meta: dict) -> dict:
    """A dataset.json without what differs from part to part."""
    return {k: v for k, v in meta.items() if k not in ("sources", "splits")}


def _read_part(path: str | Path) -> tuple[dict, memoryview]:
    """A part's header and its windows' bytes (in manifest order), decompressed (which checks its CRC)."""
    try:
        raw = lzma.decompress(Path(path).read_bytes())
    except lzma.LZMAError as e:
        raise PackError(f"{path}: damaged part ({e})") from None
    if raw[:8] == b"S4MPACK1":
        raise PackError(f"{path}: packed by an earlier s4music, which put the header first; pack the dataset again")
    if raw[:8] != _MAGIC or len(raw) < 16:
        raise PackError(f"{path}: not an s4music pack part")
    (size,) = struct.unpack("<Q", raw[-8:])
    if size > len(raw) - 16:
        raise PackError(f"{path}: its header's length, {size} bytes, is more than the part holds")
    return json.loads(raw[-8 - size : -8]), memoryview(raw)[8 : -8 - size]


def _kept_part(path: Path, meta: dict, take: list[dict], dealt: dict, limit: int) -> list[dict] | None:
    """The sources of a part an earlier run of the same pack wrote at `path`, if they are drawn, in
    order, from `take`; else None (the part is written afresh, as is one damaged on disk)."""
    if not path.is_file() or path.stat().st_size > limit:
        return None
    try:
        header, _ = _read_part(path)
    except (PackError, OSError, ValueError):
        return None
    if header.get("dealt") != dealt:
        return None
    sources = header["dataset"].get("sources", [])
    offered = iter(take)  # a part always holds the first source offered to it, then some of the rest in order
    if not sources or sources[0] != take[0] or _without_sources(header["dataset"]) != _without_sources(meta) or \
            not all(any(src == other for other in offered) for src in sources):
        return None
    return sources


def _write_part(root: str, meta: dict, take: list[dict], rows: dict[str, list[dict]], dealt: dict, limit: int,
                ratio: float, path: str) -> tuple[list[str], int, bool]:
    """Write the sources of `take` that fit as the part at `path`, or keep the one an earlier run wrote
    there. (The ids of the sources it holds, its bytes, whether it was kept.) Runs in a worker process."""
    path = Path(path)
    kept = _kept_part(path, meta, take, dealt, limit)
    if kept is not None:
        return [src["id"] for src in kept], path.stat().st_size, True
    window = meta["window"]
    splits = {s: np.memmap(Path(root) / f"{s}.u8", dtype=np.uint8, mode="r").reshape(-1, window)
              if meta["splits"][s] else np.zeros((0, window), np.uint8) for s in SPLITS}
    blob, held = _encode_part(meta, take, rows, splits, dealt, limit, ratio)
    while len(blob) > limit and len(held) > 1:  # a source compressed worse than its margin: rare, so encode again
        blob, held = _encode_part(meta, held[:-1], rows, splits, dealt, limit, ratio)
    if len(blob) > limit:
        raise PackError(f"{held[0]['name']}: one file compresses to {len(blob) / 2**20:.1f} MiB, over --part-mb")
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return [src["id"] for src in held], len(blob), False


def pack(dataset: str | Path, out: str | Path, part_mb: float = 27.0, seed: int = 0, max_parts: int | None = None,
         workers: int | None = None, on_part: Callable[[PackedPart], None] | None = None) -> list[PackedPart]:
    """Write `dataset` as parts of at most `part_mb` MiB each under `out`, with `out`/pack.json;
    only the first `max_parts` (each a random sample of the whole) when given.

    Sources are dealt in a seeded order, each part offered a quarter more than the compression ratio so
    far says fits; what a part cannot hold goes to the parts dealt after it, as does a short last
    offer while other parts may still give sources back. The first part is
    written alone to measure the ratio; then `workers` processes (default: one per core; each holds
    a part's codes, and LZMA2 under 100 MB more) compress parts at once. Any number of workers deals
    the same parts."""
    root, out = Path(dataset), Path(out)
    meta = read_meta(root)
    if meta is None:
        raise PackError(f"{root}: no dataset.json (build it with `s4music prepare`)")
    limit = int(part_mb * 2**20)
    window = meta["window"]
    if window > limit:
        raise PackError(f"--part-mb {part_mb:g}: smaller than one window")
    rows = _rows_by_source(root, meta)
    order = sorted(meta["sources"], key=lambda s: s["id"])
    random.Random(seed).shuffle(order)
    out.mkdir(parents=True, exist_ok=True)
    dealt = {"planner": 3, "part_mb": part_mb, "seed": seed}  # planner: the dealing below
    parts: list[PackedPart] = []
    pending = list(order)
    ratio = 0.75  # compressed bytes per raw byte, assumed until the first part is measured

    def plan(room: int | None) -> list[list[dict]]:
        """Deal `pending` into offers for parts, as many as `room` allows. A short last offer waits
        for the sources the others give back, unless it is all there is."""
        takes, raw = [], 0
        while pending and (room is None or len(takes) < room):
            take = [pending.pop(0)]
            raw = take[0]["windows"] * window
            while pending and (raw + pending[0]["windows"] * window) * ratio <= _OFFER * limit:
                raw += pending[0]["windows"] * window
                take.append(pending.pop(0))
            takes.append(take)
        if not pending and len(takes) > 1 and raw * ratio < limit:
            pending[:0] = takes.pop()
        return takes

    workers = max(1, workers or len(os.sched_getaffinity(0)))
    with DirectoryLock(out, "pack"), ProcessPoolExecutor(max_workers=workers) as pool:
        remove_stale_temporaries(out)  # what a killed run was writing
        try:
            first = True
            while pending and (max_parts is None or len(parts) < max_parts):
                room = 1 if first else None if max_parts is None else max_parts - len(parts)
                takes = plan(room)
                names = [f"part-{len(parts) + i:03d}" for i in range(len(takes))]
                jobs = [pool.submit(_write_part, str(root), meta, take, {src["id"]: rows[src["id"]] for src in take},
                                    dealt, limit, ratio, str(out / f"{name}.s4pack"))
                        for take, name in zip(takes, names, strict=True)]
                given_back = []
                left = sum(src["windows"] for take in takes for src in take) + sum(src["windows"] for src in pending)
                for take, name, job in zip(takes, names, jobs, strict=True):
                    held, size, kept = job.result()
                    given_back += [src for src in take if src["id"] not in held]
                    windows = sum(src["windows"] for src in take if src["id"] in held)
                    left -= windows
                    part = PackedPart(name, out / f"{name}.s4pack", size, windows, windows * window / meta["sample_rate"] / 3600,
                                      kept=kept, windows_left=left)
                    parts.append(part)
                    if on_part is not None:
                        on_part(part)
                pending[:0] = given_back
                ratio = max(sum(p.bytes for p in parts) / (sum(p.windows for p in parts) * window), 0.1)
                first = False
        except BaseException:
            pool.shutdown(cancel_futures=True)  # an error or Ctrl-C stops now, not after every queued part
            raise
        if not pending:  # the whole dataset is dealt: a part file past these is an earlier pack's
            written = {p.path.name for p in parts}
            for stale in out.glob("part-*.s4pack"):
                if stale.name not in written:
                    stale.unlink()
        write_json(out / INDEX, {"format": PACK_FORMAT, "dataset": str(root), "seed": seed, "part_mb": part_mb,
                                 "parts": [{"name": p.name, "file": p.path.name, "bytes": p.bytes,
                                            "sha256": sha256_of(p.path), "windows": p.windows,
                                            "hours": round(p.hours, 4)} for p in parts]})
    return parts


def _read_index(index: Path) -> dict:
    try:
        data = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PackError(f"{index}: cannot read the pack index ({e})") from None
    if data.get("format") != PACK_FORMAT:
        raise PackError(f"{index}: not an s4music pack index")
    return data


def _unpack_one(path: str, dest: str) -> str:
    """Decompress one part into `dest` (through a temporary folder); returns dest."""
    header, body = _read_part(path)
    meta, manifest = header["dataset"], header["manifest"]
    window = meta["window"]
    if len(body) != len(manifest) * window:
        raise PackError(f"{path}: {len(body)} bytes of windows where its header counts {len(manifest) * window}")
    target = Path(dest)
    tmp = target.with_name(f".{target.name}.unpacking-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split in SPLITS:
        with open(tmp / f"{split}.u8", "wb") as f:
            for i, row in enumerate(manifest):
                if row["split"] == split:
                    f.write(body[i * window : (i + 1) * window])
    (tmp / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in manifest))
    write_json(tmp / "dataset.json", meta)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return str(target)


def unpack(index: str | Path, out: str | Path, workers: int | None = None, only: list[str] | None = None,
           on_part: Callable[[Path], None] | None = None) -> list[Path]:
    """Every part `index` (a pack.json, or the folder holding it) lists, or the parts named in
    `only`, checked, then decompressed in parallel into `out`/NAME/. Returns the dataset folders,
    in part order."""
    index = Path(index)
    if index.is_dir():
        index = index / INDEX
    data = _read_index(index)
    out = Path(out)
    jobs = []
    unknown = sorted(set(only or []) - {p["name"] for p in data["parts"]})
    if unknown:
        names = [p["name"] for p in data["parts"]]
        raise PackError(f"{index}: lists no part {unknown[0]} (its parts are {names[0]} to {names[-1]})")
    for part in data["parts"]:
        if only is not None and part["name"] not in only:
            continue
        path = index.parent / part["file"]
        if not path.is_file():
            raise PackError(f"{path}: part missing (pack.json lists {len(data['parts'])} parts)")
        if path.stat().st_size != part["bytes"] or sha256_of(path) != part["sha256"]:
            raise PackError(f"{path}: checksum mismatch; the part is damaged or from another pack")
        jobs.append((str(path), str(out / part["name"])))
    out.mkdir(parents=True, exist_ok=True)
    done = []
    with ProcessPoolExecutor(max_workers=min(len(jobs), workers or os.cpu_count() or 1) or 1) as pool:
        for dest in pool.map(_unpack_one, *zip(*jobs, strict=True)) if jobs else []:
            done.append(Path(dest))
            if on_part is not None:
                on_part(Path(dest))
    return done
