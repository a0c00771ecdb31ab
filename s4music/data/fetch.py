"""`s4music fetch`: download the audio of web pages with yt-dlp, and convert it.

For each URL (a playlist yields several items) this writes, into the output directory:
    <name>.wav              the toolkit's format: mono at the chosen rate (16 kHz by default)
    original/<name>.<ext>   the file as downloaded
    <name>.json             a sidecar: URL, title, uploader, duration, license where known
Names come from titles, reduced to a safe character set, so no title can write outside the
directory. A bad URL fails alone: the others still complete.
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

from s4music.audio import load_audio, write_audio
from s4music.data.options import FetchOptions
from s4music.errors import S4MusicError, first_line
from s4music.files import atomic_path, write_json
from s4music.system import js_runtimes

log = logging.getLogger(__name__)
YOUTUBE_HOSTS = ("youtube.com", "youtu.be", "youtube-nocookie.com", "music.youtube.com")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


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


def check_url(url: str) -> None:
    """Reject what is not an http(s) URL before any network access."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise FetchError(f"{url}: not a valid http(s) URL")
    host = (parsed.hostname or "").lower()
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


def _download(url: str, workdir: Path, options: FetchOptions, on_progress) -> list[dict]:
    import yt_dlp

    def hook(d):
        if on_progress and d.get("status") in ("downloading", "finished"):
            on_progress(url, d.get("downloaded_bytes") or 0, d.get("total_bytes") or d.get("total_bytes_estimate"))

    with yt_dlp.YoutubeDL(ydl_params(workdir, options, [hook])) as ydl:
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

    check_url(url)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=out_dir) as tmp:
        try:
            entries = _download(url, Path(tmp), options, on_progress)
        except yt_dlp.utils.YoutubeDLError as e:
            raise FetchError(f"{url}: {_reason(e)}") from None
        if not entries:
            raise FetchError(f"{url}: no audio found on the page")
        results, written = [], []  # what this URL wrote so far: removed if a later item fails
        try:
            for entry in entries:
                downloaded = Path(entry["requested_downloads"][0]["filepath"])
                try:
                    audio = load_audio(downloaded, options.sample_rate, options.start, options.end)
                except S4MusicError as e:
                    raise FetchError(f"{url}: downloaded, but {str(e).replace(str(downloaded) + ': ', '')}") from None
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
