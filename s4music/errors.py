"""The toolkit's error type: every user-facing failure is one of these, with a one-line message
that names the file or URL and the reason. The CLI prints it and exits non-zero."""


class S4MusicError(Exception):
    pass
