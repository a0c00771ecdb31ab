"""The training corpus's held-out set, by work: every rendering and every movement of a work share a split.

A corpus file's name is `RENDERING/COMPOSER/.../PIECE.wav` (as `prepare` names files under a
source). `work_of` strips the rendering folder and the movement: `piano/bach/bwv66.6.wav` and
`ensemble/bach/bwv66.4.wav` are both the cantata `bach/bwv66`; `*/beethoven/opus18no1/movement3.wav`
is `beethoven/opus18no1`; Palestrina's `Kyrie_12_b` belongs to mass 12. `split_by_work` assigns whole
works to val and test by a seeded order, keeps the works a pinned split file names where it put
them (the chorale model's test split stays test), and writes the file a `prepare --splits`
reads, so the split is fixed in the repository once and for all.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from pathlib import PurePosixPath

SPLITS = ("train", "val", "test")
_BACH = re.compile(r"^(bwv\d+[a-z]?)(?:\.\d+[a-z]?)?$", re.IGNORECASE)
_PALESTRINA = re.compile(r"^[A-Za-z_]+?_(\d+)(?:_[a-z])?$")


def work_of(name: str) -> str:
    """The work a corpus file belongs to (see the module docstring)."""
    parts = PurePosixPath(name).with_suffix("").parts
    if len(parts) < 2:
        return parts[0] if parts else name
    inner = parts[1:]  # without the rendering folder
    if len(inner) >= 3:  # composer/work/movement
        return "/".join(inner[:-1])
    if len(inner) == 1:
        return inner[0]
    composer, piece = inner
    if composer == "bach" and (m := _BACH.match(piece)):
        return f"bach/{m.group(1).lower()}"
    if composer == "palestrina" and (m := _PALESTRINA.match(piece)):
        return f"palestrina/mass{int(m.group(1))}"
    return f"{composer}/{piece}"


def _order(seed: int, work: str) -> str:
    return hashlib.sha256(f"{seed}:{work}".encode()).hexdigest()


def split_by_work(names: list[str], val: float = 0.05, test: float = 0.05, seed: int = 0,
                  pinned: dict[str, str] | None = None) -> dict[str, list[str]]:
    """{"train": [...], "val": [...], "test": [...]} of `names`, whole works to a split.

    `pinned` maps file names or works to a split (a name pins its work); the other works fill val
    and test up to their shares of all works, in an order fixed by `seed` and each work's name, so
    adding files never moves a work already placed by the same rule."""
    works: dict[str, list[str]] = defaultdict(list)
    for name in names:
        works[work_of(name)].append(name)
    fixed: dict[str, str] = {}
    for key, split in (pinned or {}).items():
        if split not in SPLITS:
            raise ValueError(f"pinned split {split!r} for {key}: use one of {', '.join(SPLITS)}")
        work = key if key in works else work_of(key)
        if work not in works:
            continue  # a work none of `names` belongs to (work_of would misread a work's dotted name)
        if fixed.setdefault(work, split) != split:
            raise ValueError(f"work {work} is pinned to both {fixed[work]} and {split}")
    targets = {"val": round(val * len(works)), "test": round(test * len(works))}
    have = {s: sum(1 for w in works if fixed.get(w) == s) for s in SPLITS}
    assignment = {}
    for work in sorted(works, key=lambda w: _order(seed, w)):
        if work in fixed:
            assignment[work] = fixed[work]
            continue
        short = [s for s in ("test", "val") if have[s] < targets[s]]
        assignment[work] = short[0] if short else "train"
        have[assignment[work]] += 1
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for work, files in works.items():
        out[assignment[work]] += sorted(files)
    return {s: sorted(v) for s, v in out.items()}
