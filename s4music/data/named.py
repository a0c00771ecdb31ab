"""The paper's datasets by name: downloaded from the Hugging Face Hub, unpacked safely, and prepared
with the official split, so `eval` on them is the paper's evaluation.

    report = fetch_dataset("youtubemix", "data/youtubemix")

The official loader (state-spaces/s4, src/dataloaders/audio.py, QuantizedAudioDataset) sorts the
file names naturally and takes the first 88% for train, the next 6% for val and the rest for test
(`int(0.88 n)` and `int(0.94 n)` files), cuts each file into 131,072-sample windows, drops the
remainder, and quantizes each window with 8-bit official mu-law. `official_split` reproduces the
split; `prepare` with these files pinned reproduces the rest.
"""

from __future__ import annotations

import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from s4music import hub
from s4music.audio import AUDIO_EXTENSIONS
from s4music.data.format import DatasetError
from s4music.data.prepare import PrepareOptions, PrepareReport, find_audio, prepare
from s4music.data.progress import FileProgress
from s4music.errors import did_you_mean
from s4music.files import atomic_path, write_json

MAX_UNPACKED_BYTES = 100 * 2**30  # an archive that says it unpacks to more is refused
MAX_RATIO = 200  # audio barely compresses; a member that claims more is a bomb
OFFICIAL_WINDOW_SECONDS = 8.192  # 131,072 samples at 16 kHz


@dataclass(frozen=True)
class NamedDataset:
    name: str
    repo: str  # a dataset repository on the Hub, holding zip archives of audio files
    revision: str
    about: str


NAMED = {d.name: d for d in (
    NamedDataset("youtubemix", "krandiash/youtubemix", "main", "4 hours of solo piano from YouTube (the paper's "
                 "YouTubeMix); the released youtubemix model scores 1.294 bits/sample on its test split"),
    NamedDataset("beethoven", "krandiash/beethoven", "main", "Beethoven's piano sonatas (the SampleRNN dataset)"),
    NamedDataset("sc09", "krandiash/sc09", "main", "SC09: spoken digits, one second each (speech)"),
)}


def natural_key(name: str) -> list:
    """Sort key that orders digits by value, as natsort does: out9 < out10 < out100."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def official_split(names: list[str]) -> dict[str, str]:
    """name -> split by the official rule: natural order, then [0, int(.88 n)) train,
    [int(.88 n), int(.94 n)) val, the rest test."""
    ordered = sorted(names, key=natural_key)
    n = len(ordered)
    val_from, test_from = int(0.88 * n), int(0.94 * n)
    return {name: "train" if i < val_from else "val" if i < test_from else "test" for i, name in enumerate(ordered)}


class ArchiveDamaged(DatasetError):
    """The download itself is bad (not a zip, a member fails its CRC): fetching it again may help."""


def unpack(archive: Path, dest: Path) -> list[Path]:
    """Extract a zip's audio files under `dest`, refusing the whole archive if a member would escape
    it (absolute paths, '..', links) or it unpacks to implausibly much (a zip bomb). A damaged
    archive raises ArchiveDamaged; a destination that cannot be written (a full disk) DatasetError."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArchiveDamaged(f"{archive.name}: not a zip archive ({e})") from None
    with zf:
        members, total = [], 0
        for info in zf.infolist():
            name = info.filename
            parts = Path(name).parts
            if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts or "\\" in name:
                raise DatasetError(f"{archive.name}: member {name!r} would be written outside the dataset; refused")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DatasetError(f"{archive.name}: member {name!r} is a link; refused")
            if info.is_dir() or Path(name).suffix.lower() not in AUDIO_EXTENSIONS:
                continue
            if info.file_size > MAX_RATIO * max(info.compress_size, 1) + 2**20:
                raise DatasetError(f"{archive.name}: member {name!r} unpacks {info.file_size / max(info.compress_size, 1):.0f}"
                                   "-fold; refused as a zip bomb")
            total += info.file_size
            members.append(info)
        if total > MAX_UNPACKED_BYTES:
            raise DatasetError(f"{archive.name}: unpacks to {total / 2**30:.0f} GiB, more than the "
                               f"{MAX_UNPACKED_BYTES / 2**30:.0f} GiB allowed")
        written = []
        for info in members:
            target = dest / info.filename
            try:
                with zf.open(info) as src, atomic_path(target) as tmp, open(tmp, "wb") as out:
                    while block := _read_member(src, archive, info):
                        out.write(block)
            except OSError as e:
                raise DatasetError(f"{target.parent}: cannot write the unpacked audio ({e.strerror or e})") from None
            written.append(target)
        return written


def _read_member(src, archive: Path, info: zipfile.ZipInfo) -> bytes:
    """The next MiB of a member; zipfile stops it at its stated size and checks its CRC at the end."""
    try:
        return src.read(1 << 20)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise ArchiveDamaged(f"{archive.name}: member {info.filename!r} is damaged ({e})") from None


@dataclass
class FetchedDataset:
    dataset: Path
    audio: list[Path]  # the unpacked archives, in the Hub cache
    files: int
    splits: dict[str, int]  # files per split
    report: PrepareReport


def fetch_dataset(name: str, out: str | Path, on_file: FileProgress | None = None) -> FetchedDataset:
    """Download the dataset `name`, unpack it (once, into the cache beside the download), and prepare
    it at `out` with the official split and windows."""
    if name not in NAMED:
        raise DatasetError(f"{name}: not a dataset name{did_you_mean(name, list(NAMED))} (names: {', '.join(NAMED)})")
    named = NAMED[name]
    archives = [f for f in hub.list_files(named.repo, named.revision, repo_type="dataset") if f.lower().endswith(".zip")]
    if not archives:
        raise DatasetError(f"{named.repo}: no zip archive in the dataset repository")
    unpacked = [_unpacked(hub.download(named.repo, f, named.revision, repo_type="dataset")) for f in archives]
    files = [n for _, _, n in find_audio(unpacked)]
    split = official_split(files)
    out = Path(out)
    report = prepare(unpacked, out, PrepareOptions(seconds=OFFICIAL_WINDOW_SECONDS, pinned=split), on_file=on_file)
    counts = {s: sum(1 for v in split.values() if v == s) for s in ("train", "val", "test")}
    write_json(out / "source.json", {"name": name, "repo": named.repo, "revision": named.revision,
                                     "archives": archives, "split_rule": "official: natural order, 88/6/6 by file",
                                     "files": counts})
    return FetchedDataset(out, unpacked, len(files), counts, report)


def _unpacked(archive: Path) -> Path:
    """The archive's audio, unpacked once beside the download in the Hub cache."""
    audio = archive.parent / f".{archive.name}.unpacked"
    if not (audio / ".complete").exists():
        with tempfile.TemporaryDirectory(prefix=".unpack-", dir=audio.parent) as tmp:
            try:
                unpack(archive, Path(tmp) / "audio")
            except ArchiveDamaged:
                hub.forget(archive)  # a broken download does not stay cached (a full disk keeps a good one)
                raise
            (Path(tmp) / "audio" / ".complete").touch()
            shutil.rmtree(audio, ignore_errors=True)
            (Path(tmp) / "audio").rename(audio)
    return audio
