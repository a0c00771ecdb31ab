"""The toolkit's error type, and how a failure becomes one line.

Every user-facing failure is an `S4MusicError` whose message names the file or URL and the reason,
on one line. The CLI prints it and exits non-zero.
"""

from __future__ import annotations


class S4MusicError(Exception):
    pass


def first_line(message: str | bytes | BaseException, fallback: str = "", last: bool = False) -> str:
    """The one line of a message worth showing: its first non-blank line, or with `last` its last one
    (a program's error output ends with the error). An exception with no message gives its type
    name; an empty text gives `fallback`."""
    if isinstance(message, bytes):
        message = message.decode(errors="replace")
    if isinstance(message, BaseException):
        fallback = fallback or type(message).__name__
        message = str(message)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return fallback
    return lines[-1] if last else lines[0]


def did_you_mean(word: str, names: list[str]) -> str:
    """"; did you mean a or b?" for the names closest to a mistyped one, else ""."""
    import difflib

    close = difflib.get_close_matches(word, names, n=2)
    return f"; did you mean {' or '.join(close)}?" if close else ""
