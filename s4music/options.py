"""Options that the library takes as text, as a user types them: `key=value` assignments.

    split_assignment("genre=piano", "--tag")        -> ("genre", "piano")
    split_assignment("model.d_model=32", "--set")   -> ("model.d_model", "32")

`--tag` (prepare) and `--set` (train) both read this form; the option's name goes into the error.
"""

from __future__ import annotations

from s4music.errors import S4MusicError


class OptionError(S4MusicError):
    pass


def split_assignment(item: str, option: str) -> tuple[str, str]:
    """`key=value` -> (key, value); a one-line OptionError naming `option` otherwise."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise OptionError(f"{option} {item!r}: expected key=value")
    return key.strip(), value
