"""Options that the library takes as text, as a user types them: `key=value` assignments and shards.

    split_assignment("genre=piano", "--tag")        -> ("genre", "piano")
    split_assignment("model.d_model=32", "--set")   -> ("model.d_model", "32")
    parse_shard("2/8")                              -> Shard(index=2, count=8)

`--tag` (prepare) and `--set` (train) both read the first form; `--shard` (render-midi, prepare)
the second. The option's name goes into the error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from s4music.errors import S4MusicError


class OptionError(S4MusicError):
    pass


def split_assignment(item: str, option: str) -> tuple[str, str]:
    """`key=value` -> (key, value); a one-line OptionError naming `option` otherwise."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise OptionError(f"{option} {item!r}: expected key=value")
    return key.strip(), value


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (1-based: 1/4 to 4/4) of a collection: the files at sorted positions
    p (from 0) with p % count == index - 1, so every file falls in exactly one shard and each shard
    gets an even share of every folder."""

    index: int
    count: int

    def owns(self, position: int) -> bool:
        return position % self.count == self.index - 1

    @property
    def label(self) -> str:
        """A name for files of this shard's own: "shard-2-of-8"."""
        return f"shard-{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(spec: str | Shard, option: str = "--shard") -> Shard:
    """"i/n" (1 <= i <= n) -> Shard(i, n); a one-line OptionError naming `option` otherwise."""
    if isinstance(spec, Shard):
        spec = str(spec)
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not m:
        raise OptionError(f"{option} {spec!r}: expected i/n, two whole numbers with 1 <= i <= n (2/8: "
                          "the second of eight shards)")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1:
        raise OptionError(f"{option} {spec!r}: n, the number of shards, must be at least 1")
    if index < 1:
        raise OptionError(f"{option} {spec!r}: shards count from 1 to {count}; from a 0-based index "
                          f"(Kubernetes' JOB_COMPLETION_INDEX) pass index+1")
    if index > count:
        raise OptionError(f"{option} {spec!r}: there is no shard {index} of {count} (shards count from 1 to {count})")
    return Shard(index, count)
