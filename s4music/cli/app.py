"""The `s4music` command line. Each subcommand parses options and calls one library function."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path


import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from s4music.errors import S4MusicError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Continue music with SaShiMi, a multi-scale S4 state-space model over raw 16 kHz audio.",
)
console = Console(stderr=True)


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def command(fn=None, *, name: str | None = None):
    """Register a subcommand whose toolkit errors become one line and exit code 1."""

    def register(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except S4MusicError as e:
                fail(str(e))

        return app.command(name)(wrapper)

    return register(fn) if fn is not None else register


@app.callback()
def main_options(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging.")):
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
    )


@command
def doctor():
    """Report torch and CUDA, the active S4 kernel path, and the external tools the toolkit uses."""
    from s4music.doctor import run_checks

    table = Table(title="s4music doctor", show_header=True)
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    checks = run_checks()
    for c in checks:
        status = "[green]ok[/]" if c.ok else ("[red]missing[/]" if c.required else "[yellow]absent[/]")
        table.add_row(c.name, status, c.detail)
    Console().print(table)
    if not all(c.ok for c in checks if c.required):
        raise typer.Exit(1)


@command
def convert(
    checkpoint: Path = typer.Argument(..., help="Official SaShiMi checkpoint (.pt), V3 or V4 layout."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (model.safetensors + config.json)."),
    bf16: bool = typer.Option(False, help="Store weights in bfloat16 (half the size)."),
):
    """Convert a SaShiMi checkpoint released with the paper into an s4music checkpoint."""
    import torch

    from s4music.model.checkpoint import convert_official

    path = convert_official(checkpoint, out, dtype=torch.bfloat16 if bf16 else None)
    console.print(f"wrote {path}")


def progress_bar() -> Progress:
    """A rich progress bar with ETA, on stderr."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    )


def report_failures(failures: list[tuple[str, str]], done: int, what: str, any_failure_fails: bool) -> None:
    """A batch's summary: failures one per line. Exit 1 if any failed (`any_failure_fails`) or none succeeded."""
    for _, reason in failures:
        console.print(f"[red]failed:[/] {reason}", highlight=False, soft_wrap=True)
    console.print(f"{done} {what}, {len(failures)} failed")
    if failures and (any_failure_fails or not done):
        raise typer.Exit(1)


@command
def fetch(
    urls: list[str] = typer.Argument(..., help="Web pages or media URLs (YouTube needs a JS runtime; see doctor)."),
    out: Path = typer.Option(Path("fetched"), "--out", "-o", help="Output directory."),
    start: float = typer.Option(None, help="Keep audio from this second on (applied after download)."),
    end: float = typer.Option(None, help="Keep audio up to this second."),
    playlist_items: str = typer.Option(None, help="Playlist items to fetch, e.g. '1-3,7'."),
    sample_rate: int = typer.Option(16000, help="Sample rate of the converted audio."),
):
    """Download the audio of web pages (yt-dlp), keep the original, and convert it to mono WAV."""
    from s4music.data.fetch import FetchOptions
    from s4music.data.fetch import fetch as fetch_urls

    options = FetchOptions(sample_rate=sample_rate, start=start, end=end, playlist_items=playlist_items)
    with progress_bar() as bar:
        tasks: dict[str, int] = {}

        def on_progress(url: str, done: int, total: int | None) -> None:
            if url not in tasks:
                tasks[url] = bar.add_task(url[-50:], total=total)
            bar.update(tasks[url], completed=done, total=total)

        def on_result(url: str, item, error: str | None) -> None:
            if item is not None:
                bar.console.print(f"[green]ok[/] {item.audio} ({item.seconds:.1f} s)", highlight=False)

        report = fetch_urls(urls, out, options, on_progress=on_progress, on_result=on_result)
    report_failures(report.failed, len(report.fetched), "fetched", any_failure_fails=True)


@command(name="render-midi")
def render_midi_command(
    sources: list[Path] = typer.Argument(..., help="MIDI files or directories (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory; mirrors the source layout."),
    instrument: list[str] = typer.Option(None, "--instrument", "-i",
                                         help="Keep only this GM family (piano, strings, ...), program 0-127, "
                                              "or 'drums'. Repeatable. Default: everything."),
    drums: bool = typer.Option(True, "--drums/--no-drums", help="Keep channel 10 (drums)."),
    soundfont: Path = typer.Option(None, help="General MIDI .sf2 (default: found in Debian's paths)."),
    max_seconds: float = typer.Option(600.0, help="Render at most this many seconds of each file."),
    sample_rate: int = typer.Option(16000, help="Output sample rate."),
    workers: int = typer.Option(2, help="Files rendered in parallel."),
):
    """Render MIDI collections (e.g. the Lakh MIDI layout) to mono WAV with FluidSynth; resumable."""
    from s4music.data.midi import RenderOptions, find_midi, render_midi

    options = RenderOptions(instruments=instrument or None, drums=drums, soundfont=soundfont,
                            sample_rate=sample_rate, max_seconds=max_seconds, workers=workers)
    with progress_bar() as bar:
        task = bar.add_task("rendering", total=len(find_midi(sources)))
        report = render_midi(sources, out, options, on_file=lambda src, status: bar.advance(task))
    for _, reason in report.skipped:
        console.print(f"[yellow]skipped:[/] {reason}", highlight=False, soft_wrap=True)
    minutes = sum(s for _, _, s in report.rendered) / 60
    console.print(f"{len(report.already)} already rendered; {minutes:.1f} min of new audio")
    report_failures([(str(s), r) for s, r in report.failed], len(report.rendered) + len(report.already),
                    "rendered", any_failure_fails=False)


@command
def prepare(
    sources: list[Path] = typer.Argument(..., help="Audio files or directories (wav, flac, mp3, ogg, opus, m4a, ...)."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset directory (created, or extended if it exists)."),
    seconds: float = typer.Option(8.192, help="Window length in seconds (the paper's 131,072 samples)."),
    quantization: str = typer.Option("mulaw-official", help="mulaw-official, mulaw or linear."),
    sample_rate: int = typer.Option(16000, help="Sample rate of the codes."),
    val: float = typer.Option(0.06, help="Share of each stratum's files for validation."),
    test: float = typer.Option(0.06, help="Share of each stratum's files for test."),
    seed: int = typer.Option(0, help="Seed of the split assignment."),
    tag: list[str] = typer.Option(None, help="A stratum tag for these sources, key=value (repeatable)."),
):
    """Build or extend a training dataset: decode, mono, resample, quantize, window, split by source."""
    from s4music.data.prepare import PrepareOptions, find_audio
    from s4music.data.prepare import prepare as prepare_dataset

    tags = {}
    for t in tag or []:
        key, sep, value = t.partition("=")
        if not sep or not key:
            fail(f"--tag {t!r}: expected key=value")
        tags[key] = value
    options = PrepareOptions(seconds=seconds, sample_rate=sample_rate, quantization=quantization,
                             val_fraction=val, test_fraction=test, seed=seed, tags=tags)
    with progress_bar() as bar:
        task = bar.add_task("preparing", total=len(find_audio(sources)))
        report = prepare_dataset(sources, out, options, on_file=lambda path, status: bar.advance(task))
    table = Table(title=f"{out}: hours of audio")
    for column in ("split", "stratum", "hours"):
        table.add_column(column)
    for (split, stratum), hours in report.summary.items():
        table.add_row(split, stratum, f"{hours:.3f}")
    Console().print(table)
    console.print(f"{len(report.added)} files added, {report.unchanged} already in the dataset")
    report_failures([(str(p), r) for p, r in report.failed], len(report.added) + report.unchanged,
                    "files in the dataset", any_failure_fails=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


