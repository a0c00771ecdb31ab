"""`s4music fetch`: download the audio of web pages with yt-dlp, and convert it.

For each URL (a playlist yields several items) this writes, into the output directory:
    <name>.wav              the toolkit's format: mono at the chosen rate (16 kHz by default)
    original/<name>.<ext>   the file as downloaded
    <name>.json             a sidecar: URL, title, uploader, duration, license where known
Names come from titles, reduced to a safe character set, so no title can write outside the
directory. A bad URL fails alone: the others still complete.

Every download has a size and a length limit (`max_mb`, `max_minutes`), enforced while it arrives:
the size at each block (and at once where the server states it), the length from the extractor's
metadata before the download, from the file's header once its first bytes are in, and from the
whole file before it is decoded. With `allow_address` every connection yt-dlp makes, redirects and
links included, goes through `s4music.addresses.AddressProxy`, which refuses the addresses it
rejects (the studio's filter: `public_address`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from s4music.addresses import AddressProxy, allowed_host
from s4music.audio import declared_seconds, load_audio, write_audio
from s4music.data.options import FetchOptions
from s4music.errors import S4MusicError, first_line
from s4music.files import atomic_path, write_json
from s4music.system import js_runtimes

log = logging.getLogger(__name__)
YOUTUBE_HOSTS = ("youtube.com", "youtu.be", "youtube-nocookie.com", "music.youtube.com")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
MB = 1024 * 1024  # as Gradio counts its upload limit, which the studio gives fetches too
PROBE_BYTES = 64 * 1024  # a download's header is read once this much has arrived
REFUSED = "refused: only public internet addresses can be fetched here"


class FetchError(S4MusicError):
    pass


@dataclass
class Fetched:
    url: str
    audio: Path
    original: Path
    sidecar: Path
    seconds: float


@dataclass
class FetchReport:
    fetched: list[Fetched] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (url, reason)


def safe_name(title: str, fallback: str = "audio") -> str:
    """A file name from a title: ASCII letters, digits, '-', '_' and '.', no leading dot, <= 100 chars."""
    text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    text = re.sub(r"_+", "_", text)[:100].rstrip("._-")
    return text or fallback


def _unique(directory: Path, name: str) -> str:
    candidate, n = name, 1
    while (directory / f"{candidate}.wav").exists() or (directory / f"{candidate}.json").exists():
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def check_url(url: str, allow_address: Callable[[str, int], bool] | None = None) -> None:
    """Reject what is not an http(s) URL, and with `allow_address` a host any of whose addresses it
    rejects, before any request (the proxy checks every connection after that)."""
    parsed = urlparse(url)
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        port = None
    if parsed.scheme not in ("http", "https") or not parsed.hostname or port is None:
        raise FetchError(f"{url}: not a valid http(s) URL")
    host = parsed.hostname.lower()
    if allow_address is not None and allowed_host(host, port, allow_address) is False:
        raise FetchError(f"{url}: {REFUSED}")
    if any(host == h or host.endswith("." + h) for h in YOUTUBE_HOSTS) and not js_runtimes():
        raise FetchError(
            f"{url}: YouTube downloads need a JavaScript runtime for yt-dlp and none usable was found; "
            "install deno (https://deno.com, 2.3+) or node 22+, then check with `s4music doctor`"
        )


def _reason(error: Exception) -> str:
    text = ANSI.sub("", str(error)).strip()
    text = re.sub(r"^ERROR:\s*", "", text)
    text = re.sub(r"^\[[\w:]+\]\s*[\w-]*:\s*", "", text)  # "[generic] id: ..."
    text = first_line(text, type(error).__name__)
    text = re.sub(r"\s*\(caused by .*\)$", "", text)
    text = re.sub(r"HTTPS?Connection\(host=.*?\): Failed to establish a new connection: (\[Errno \d+\] )?", "", text)
    if text.startswith("Unsupported URL"):
        text = "unsupported site, or a page with no audio"
    return text


class _Logger:
    """yt-dlp's messages go to our log (debug), never to the terminal directly."""

    def debug(self, msg):
        log.debug(ANSI.sub("", msg))

    info = debug

    def warning(self, msg):
        log.debug("yt-dlp warning: %s", ANSI.sub("", msg))

    def error(self, msg):
        log.debug("yt-dlp error: %s", ANSI.sub("", msg))


class _Limits:
    """A download's size and length against the options' limits, checked as it arrives: a yt-dlp
    progress hook (size; length from the header) and match filter (length from the metadata).
    Raising FetchError from either stops yt-dlp at once."""

    def __init__(self, url: str, options: FetchOptions):
        self.url = url
        self.max_bytes = options.max_mb * MB if options.max_mb else None
        self.max_minutes = options.max_minutes or None
        self.probed: set[str] = set()

    def too_long(self, seconds: float | None) -> None:
        if self.max_minutes and seconds and seconds > self.max_minutes * 60:
            length = f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"
            raise FetchError(f"{self.url}: {length} long, more than the {self.max_minutes:g} min limit")

    def hook(self, d: dict) -> None:
        if d.get("status") != "downloading":
            return
        done, total = d.get("downloaded_bytes") or 0, d.get("total_bytes")
        if self.max_bytes and total and total > self.max_bytes:
            raise FetchError(f"{self.url}: {total / MB:.0f} MB, more than the {self.max_bytes / MB:g} MB limit")
        if self.max_bytes and done > self.max_bytes:
            raise FetchError(f"{self.url}: more than the {self.max_bytes / MB:g} MB limit (stopped there)")
        part = d.get("tmpfilename")
        if self.max_minutes and part and part not in self.probed and (done >= PROBE_BYTES or done == total):
            self.probed.add(part)  # the header is in: it says how long the whole is
            self.too_long(declared_seconds(part))

    def match_filter(self, info: dict, *, incomplete: bool = False) -> None:
        self.too_long(info.get("duration"))
        size = info.get("filesize") or info.get("filesize_approx")
        if self.max_bytes and size and size > self.max_bytes:
            raise FetchError(f"{self.url}: {size / MB:.0f} MB, more than the {self.max_bytes / MB:g} MB limit")
        return None


def ydl_params(workdir: Path, options: FetchOptions, hooks: list | None = None) -> dict:
    """yt-dlp's options as the toolkit sets them: quiet, into `workdir`, and every usable JavaScript
    runtime by its full path (Deno from the `deno` package first), so YouTube works without a PATH."""
    params = {
        "format": "bestaudio/best",
        "outtmpl": {"default": str(workdir / "%(autonumber)s.%(ext)s")},
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "logger": _Logger(),
        "progress_hooks": hooks or [],
        "socket_timeout": options.timeout,
        "retries": 2,
        "noplaylist": False,
        "ignoreerrors": False,
        "js_runtimes": {name: {"path": path} for name, path in js_runtimes().items()} or {"deno": {}},
    }
    if options.playlist_items:
        params["playlist_items"] = options.playlist_items
    return params


def _download(url: str, workdir: Path, options: FetchOptions, on_progress, proxy: AddressProxy | None) -> list[dict]:
    import yt_dlp

    limits = _Limits(url, options)

    def hook(d):
        limits.hook(d)
        if on_progress and d.get("status") in ("downloading", "finished"):
            on_progress(url, d.get("downloaded_bytes") or 0, d.get("total_bytes") or d.get("total_bytes_estimate"))

    params = ydl_params(workdir, options, [hook])
    params["match_filter"] = limits.match_filter
    if proxy is not None:
        params["proxy"] = proxy.url
    with yt_dlp.YoutubeDL(params) as ydl:
        info = ydl.extract_info(url, download=True)
    entries = [e for e in (info.get("entries") or [info]) if e]
    return [e for e in entries if e.get("requested_downloads")]


def fetch(urls: list[str], out_dir: str | Path, options: FetchOptions | None = None,
          on_progress: Callable[[str, int, int | None], None] | None = None,
          on_result: Callable[[str, Fetched | None, str | None], None] | None = None) -> FetchReport:
    """Download and convert each URL. Failures are collected in the report, not raised."""
    options = options or FetchOptions()
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"{out_dir}: cannot write here ({e.strerror or e})") from None
    report = FetchReport()
    for url in urls:
        try:
            items = _fetch_one(url, out_dir, options, on_progress)
            report.fetched.extend(items)
            for item in items:
                if on_result:
                    on_result(url, item, None)
        except S4MusicError as e:
            report.failed.append((url, str(e)))
            if on_result:
                on_result(url, None, str(e))
    if created and not report.fetched:
        shutil.rmtree(out_dir, ignore_errors=True)  # nothing came of it: leave nothing
    return report


def _fetch_one(url: str, out_dir: Path, options: FetchOptions, on_progress) -> list[Fetched]:
    import yt_dlp

    check_url(url, options.allow_address)
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(AddressProxy(options.allow_address, options.timeout)) \
            if options.allow_address is not None else None
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=".fetch-", dir=out_dir))
        try:
            entries = _download(url, Path(tmp), options, on_progress, proxy)
        except yt_dlp.utils.YoutubeDLError as e:
            if proxy is not None and proxy.refused:  # the same words whichever hop, address or port it was
                raise FetchError(f"{url}: {REFUSED}") from None
            raise FetchError(f"{url}: {_reason(e)}") from None
        if not entries:
            raise FetchError(f"{url}: no audio found on the page")
        return _convert(url, entries, out_dir, options)


def _convert(url: str, entries: list[dict], out_dir: Path, options: FetchOptions) -> list[Fetched]:
    """Each downloaded item decoded (once its whole length is checked) and written."""
    limits = _Limits(url, options)
    results, written = [], []  # what this URL wrote so far: removed if a later item fails
    try:
        for entry in entries:
            downloaded = Path(entry["requested_downloads"][0]["filepath"])
            declared = declared_seconds(downloaded)
            limits.too_long(declared)
            try:
                audio = load_audio(downloaded, options.sample_rate, options.start, options.end)
            except S4MusicError as e:
                raise FetchError(f"{url}: downloaded, but {str(e).replace(str(downloaded) + ': ', '')}") from None
            if declared is None:  # a container that does not say: the decoded length is the check
                limits.too_long(audio.seconds)
            try:
                results.append(_write_item(url, entry, downloaded, audio, out_dir, options, written))
            except OSError as e:
                raise FetchError(f"{url}: cannot write into {out_dir} ({e.strerror or e})") from None
    except FetchError:
        for path in written:
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (out_dir / "original").rmdir()  # only if that left it empty
        raise
    return results


def _write_item(url: str, entry: dict, downloaded: Path, audio, out_dir: Path, options: FetchOptions,
                written: list[Path]) -> Fetched:
    """The original, the converted WAV and the sidecar of one item; each path goes into `written`."""
    name = _unique(out_dir, safe_name(entry.get("title") or entry.get("id") or "audio"))
    original = out_dir / "original" / f"{name}{downloaded.suffix.lower()}"
    with atomic_path(original) as dest:
        shutil.copyfile(downloaded, dest)
    written.append(original)
    wav = write_audio(out_dir / f"{name}.wav", audio.samples, audio.sample_rate)
    written.append(wav)
    sidecar = out_dir / f"{name}.json"
    write_json(sidecar, {
        "url": url,
        "webpage_url": entry.get("webpage_url") or url,
        "title": entry.get("title"),
        "uploader": entry.get("uploader"),
        "duration": entry.get("duration") or round(audio.seconds, 3),
        "license": entry.get("license"),
        "extractor": entry.get("extractor_key"),
        "original": str(original.relative_to(out_dir)),
        "audio": wav.name,
        "sample_rate": audio.sample_rate,
        "source_sample_rate": audio.source_rate,
        "source_channels": audio.source_channels,
        "trim": {"start": options.start, "end": options.end},
    })
    written.append(sidecar)
    return Fetched(url, wav, original, sidecar, audio.seconds)
