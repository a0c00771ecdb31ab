"""Writing files so that a crash, a kill or a full disk never leaves half of one.

    with atomic_path("out.wav") as tmp:      # write tmp; it replaces out.wav in one rename
        ...
    write_json("meta.json", {...})           # the same, for a JSON document
    with atomic_directory("dataset") as tmp: # fill tmp; it becomes dataset (new) in one rename
        ...

A reader sees the old file or the new one, never a mixture. Temporary names start with a dot and
hold ".tmp", so directory listings and globs for the real files never pick them up, and a later
writer (holding the directory's `DirectoryLock`) can remove those a killed one left.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from s4music.errors import S4MusicError


class AtomicFile:
    """A temporary file beside `path` that becomes `path` in one rename on `commit()`, or is removed
    by `abort()`: for a file written over a long time (a stream of audio), whose writer may stop."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:  # a fresh name; mode 0666 less the umask, as any new file (mkstemp would make 0600)
            tmp = self.path.parent / f".{self.path.stem}.{secrets.token_hex(4)}.tmp{self.path.suffix}"
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                break
            except FileExistsError:
                continue
        self.tmp = tmp

    def commit(self, path: str | Path | None = None) -> Path:
        """Rename the finished file to `path` (default: the one it was made for), its data on disk
        first, so that after a power cut the name holds the old file or the whole new one."""
        dest = Path(path) if path is not None else self.path
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.tmp, dest)
        return dest

    def abort(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C (SIGINT) back for the block, so that a file being opened (made, and handed to
    whatever removes it if the run stops) or finished (closed and renamed into place) is done
    whole; the interrupt comes right after. The handler that was in place is put back and given the
    signal then, so a program's own handling of Ctrl-C still applies. Outside the main thread,
    where Python delivers no signal, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            if callable(previous):
                previous(signal.SIGINT, caught[0])
            elif previous != signal.SIG_IGN:
                raise KeyboardInterrupt


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    f = AtomicFile(path)
    try:
        yield f.tmp
        f.commit()
    finally:
        f.abort()


@contextlib.contextmanager
def atomic_directory(path: str | Path):
    """Yield a temporary directory beside `path`, which must not exist yet (an empty directory may);
    on success its files are synced and it becomes `path` in one rename, so `path` appears whole or
    not at all. Another writer's `path` that appeared meanwhile is never replaced: that is an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:  # a fresh name; mode 0777 less the umask, as any new directory (mkdtemp would make 0700)
        tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp)
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        try:
            os.rename(tmp, path)  # over an empty directory or nothing; a full one refuses (ENOTEMPTY)
        except OSError as e:
            raise S4MusicError(f"{path}: exists and is not empty; not replacing it ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, data) -> None:
    """`data` as indented UTF-8 JSON at `path`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


class DirectoryLock:
    """One writer at a time for a directory (a dataset, a training run): an exclusive `flock` on its
    `.lock` file, taken at once or refused with a one-line error. The kernel releases it when the
    process ends, however it ends, so a killed writer never leaves it stuck.

        with DirectoryLock(root, "prepare"):
            ...  # the only writer: temporaries left in `root` are a dead writer's
    """

    def __init__(self, directory: str | Path, what: str):
        self.directory, self.what = Path(directory), what
        self.fd: int | None = None

    def __enter__(self) -> DirectoryLock:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise S4MusicError(f"{self.directory}: cannot write here ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise S4MusicError(f"{self.directory}: another {self.what} is writing here (pid {holder}); "
                               "wait for it to finish, or choose another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None


def visible_files(folder: Path, suffixes: set[str]) -> list[Path]:
    """The files under `folder`, searched recursively and sorted, whose suffix (in lower case) is one
    of `suffixes`. Hidden files and folders are passed over: they are writers' temporaries (a
    render, an export or a download in progress)."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Remove what writers that died left in `directory` (files and directories named `.<name>.tmp...`
    or `.<name>.old-...`). Call it only as the directory's sole writer (holding its DirectoryLock)."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if entry.name.startswith(".") and (".tmp" in entry.name or ".old-" in entry.name):
            removed.append(_remove(entry))
    return removed


def _remove(entry: Path) -> Path:
    """Remove a file, a link or a directory tree; returns it."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)
    return entry


@contextlib.contextmanager
def scratch_directory(path: str | Path):
    """Yield a temporary directory beside `path` for the work that makes it, removed afterwards (one a
    killed writer left, `remove_stale_temporaries_of(path)` removes)."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.tmp-scratch-", dir=path.parent) as tmp:
        yield Path(tmp)


def remove_stale_temporaries_of(path: str | Path) -> list[Path]:
    """Remove what a killed writer of `path` left beside it (its `atomic_path` file, its
    `scratch_directory`) and nothing of another file's: for a directory several processes fill, each
    with files of its own (render-midi's shards). Call it only as `path`'s sole writer."""
    path = Path(path)
    own = re.compile(rf"\.{re.escape(path.stem)}\.[0-9a-f]{{8}}\.tmp{re.escape(path.suffix)}"
                     rf"|\.{re.escape(path.name)}\.tmp-scratch-\w{{8}}")
    removed = []
    for entry in path.parent.glob(f".{glob.escape(path.stem)}.*") if path.parent.is_dir() else []:
        if own.fullmatch(entry.name):
            removed.append(_remove(entry))
    return removed


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex, read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
