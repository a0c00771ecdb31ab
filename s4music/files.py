"""Writing files so that a crash, a kill or a full disk never leaves half of one.

    with atomic_path("out.wav") as tmp:      # write tmp; it replaces out.wav in one rename
        ...
    write_json("meta.json", {...})           # the same, for a JSON document

A reader sees the old file or the new one, never a mixture. Temporary names start with a dot and
hold ".tmp", so directory listings and globs for the real files never pick them up.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicFile:
    """A temporary file beside `path` that becomes `path` in one rename on `commit()`, or is removed
    by `abort()`: for a file written over a long time (a stream of audio), whose writer may stop."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=f".tmp{self.path.suffix}",
                                   dir=self.path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; finished files get the usual mode
        self.tmp = Path(tmp)

    def commit(self, path: str | Path | None = None) -> Path:
        """Rename the finished file to `path` (default: the one it was made for)."""
        dest = Path(path) if path is not None else self.path
        os.replace(self.tmp, dest)
        return dest

    def abort(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    f = AtomicFile(path)
    try:
        yield f.tmp
        f.commit()
    finally:
        f.abort()


def write_json(path: str | Path, data) -> None:
    """`data` as indented UTF-8 JSON at `path`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
