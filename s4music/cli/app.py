"""The `s4music` command line. Each subcommand parses options and calls one library function.

Defaults come from the library's option dataclasses, so they are written once. Exit codes:
0 done; 1 an error (one line naming the file or URL and the reason); 2 a prompt judged far from
what the model knows (`check`, and `continue --strict`); 130 interrupted.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

# Options only: every command imports what does the work when it runs, so --help, `models` and a
# mistyped option answer at once, without torch (tests/test_cli.py checks which modules load).
from s4music.data.options import FetchOptions, PrepareOptions, RenderOptions
from s4music.data.progress import time_left
from s4music.errors import S4MusicError
from s4music.eval_options import EvalOptions
from s4music.generate.options import (GenerateOptions, GenerationError, Output, PromptSelection, Sampling,
                                      StepOptions, new_seed)
from s4music.jam_options import JamOptions
from s4music.model.registry import DEFAULT_NAME
from s4music.train_config import SCRATCH_LR, WEIGHTS_LR, WEIGHTS_WARMUP, TrainConfig

FAR = "2 prompt judged far from the model's music"


def exit_codes(*own: str) -> str:
    """A help text's list of exit codes: 0, then a command's own, then 130."""
    return "Exit codes: " + ", ".join(("0 done", *own, "130 interrupted")) + "."


EXIT_CODES = exit_codes("1 error", f"{FAR} (check, continue --strict)")
FEW_SOURCES = 10  # eval's interval over fewer files than this is said to be too few to trust


class PlainFlags:
    """Help that leaves the type column empty beside a flag or a counter (-v, -vv): typer 0.29
    writes `<bool>` or `<int>` there, as if it took a value; and names an argument in capitals
    (PROMPT), as the help's own text does."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if param.metavar is not None:
                continue
            if getattr(param, "is_flag", False) or getattr(param, "count", False):
                param.metavar = ""
                param.show_default = param.show_default and not param.count
            elif param.param_type_name == "argument":
                param.metavar = param.name.upper()
        return params


class Command(PlainFlags, typer.core.TyperCommand):
    pass


class Group(PlainFlags, typer.core.TyperGroup):
    pass


app = typer.Typer(
    cls=Group,
    add_completion=False,
    no_args_is_help=True,
    help="Continue music with SaShiMi, a multi-scale S4 state-space model over raw 16 kHz audio.\n\n" + EXIT_CODES,
)
console = Console(stderr=True)


class Quiet(Exception):
    """End the command at once with this exit code and nothing more said."""

    def __init__(self, code: int = 0):
        self.code = code


def fail(message: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def command(fn=None, *, name: str | None = None, inference: bool = False, exits: tuple[str, ...] = ("1 error",)):
    """Register a subcommand whose toolkit errors become one line and an exit code (1, or the
    error's own `exit_code`); `exits` are its codes between 0 and 130, for its help. An inference
    command (long forward passes, no training) keeps freed memory for reuse: see keep_freed_memory."""

    def register(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if inference:
                from s4music.system import keep_freed_memory

                keep_freed_memory()
            try:
                return fn(*args, **kwargs)
            except S4MusicError as e:
                fail(str(e), getattr(e, "exit_code", 1))

        return app.command(name, cls=Command, epilog=exit_codes(*exits))(wrapper)

    return register(fn) if fn is not None else register


class ConsoleHandler(logging.Handler):
    """Log records as lines of their own on the console (above a progress bar), which the terminal
    wraps, not rich at 80 columns, which also broke a log file's lines; a warning or worse is
    labelled, as the command's own errors are."""

    def emit(self, record: logging.LogRecord) -> None:
        label = "" if record.levelno < logging.WARNING else f"[yellow]{record.levelname.lower()}:[/] "
        try:
            console.print(label + escape(self.format(record)), highlight=False, soft_wrap=True)
        except Exception:  # logging's contract: a record that cannot be said is reported, never raised
            self.handleError(record)


@app.callback()
def main_options(verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                             help="-v: the toolkit's debug messages; -vv: other libraries' as well.")):
    logging.basicConfig(format="%(message)s", handlers=[ConsoleHandler()])
    # Other libraries (matplotlib, filelock, httpx, gradio, torch) say only warnings unless -vv: their
    # info and debug lines (a font cache, a lock polled every 50 ms, each HTTP request) bury ours.
    logging.getLogger().setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    logging.getLogger("s4music").setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose < 2:
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # the Hub client's retries; it sets its own level
        # torch's note on a foreign .pt's pickle protocol says nothing the user can act on
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
    if not sys.stderr.isatty():  # a log file or a pipe gets our lines, not the Hub client's progress bars
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class LoggedProgress(Progress):
    """A rich progress bar; where stderr is not a terminal (a log file, a batch job's output), which
    rich leaves blank, a line every `every` seconds instead, from the first `every` seconds on."""

    every = 30.0

    def __init__(self, *columns, **kwargs):
        kwargs.setdefault("speed_estimate_period", 120.0)  # rich's 30 s would leave no speed between lines
        super().__init__(*columns, **kwargs)
        self.disable = self.disable or not self.console.is_terminal  # else rich's undrawn display ends in a blank line
        self._said: dict = {}  # task -> when its last line was printed (or it was added)

    def add_task(self, *args, **kwargs):
        task_id = super().add_task(*args, **kwargs)
        self._said[task_id] = time.monotonic()
        return task_id

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        if self.console.is_terminal or time.monotonic() - self._said[task_id] < self.every:
            return
        self._said[task_id] = time.monotonic()
        task = self._tasks[task_id]
        done = f"{task.completed:,.0f}" + (f"/{task.total:,.0f} ({task.percentage:.0f}%)" if task.total else "")
        remaining = task.time_remaining if task.fields.get("eta") is None else task.fields["eta"]
        left = f", {time_left(remaining)} left" if remaining is not None else ""
        info = f", {task.fields['info']}" if task.fields.get("info") else ""
        self.console.print(f"{task.description}: {done}{left}{info}", highlight=False, soft_wrap=True)


class TimeLeftColumn(TimeRemainingColumn):
    """The time left: the task field "eta" (seconds) where the work knows it better than the rate so
    far does (a run fitted into minutes), else rich's estimate."""

    def render(self, task) -> Text:
        if task.fields.get("eta") is None:
            return super().render(task)
        return Text(time_left(task.fields["eta"]), style="progress.remaining")


def progress_bar(info: bool = False) -> Progress:
    """A rich progress bar with ETA, on stderr (in a log file, a line every 30 s); `info` adds a
    column fed by the task field "info"."""
    extra = (TextColumn("{task.fields[info]}"),) if info else ()
    return LoggedProgress(
        TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), *extra, TimeLeftColumn(),
        console=console, transient=True,
    )


def print_hours(dataset: Path, summary: dict[tuple[str, str], float]) -> None:
    """A dataset's hours of audio per split and stratum, as a table."""
    table = Table(title=escape(f"{dataset}: hours of audio"))
    for column in ("split", "stratum", "hours"):
        table.add_column(column)
    for (split, stratum), hours in summary.items():
        table.add_row(split, escape(stratum), f"{hours:.3f}")
    Console().print(table)


def report_failures(failures: list[tuple[str, str]], done: int, what: str, any_failure_fails: bool) -> None:
    """A batch's summary: failures one per line. Exit 1 if any failed (`any_failure_fails`) or none succeeded."""
    for _, reason in failures:
        console.print(f"[red]failed:[/] {escape(reason)}", highlight=False, soft_wrap=True)
    console.print(f"{done} {what}, {len(failures)} failed")
    if failures and (any_failure_fails or not done):
        raise typer.Exit(1)


def default(text: str, value) -> str:
    """Help text that states the library's default."""
    return f"{text} \\[default: {value}]"  # escaped: typer reads help as rich markup, where [...] is a style


SHARD_HELP = ("Only shard i of n, 1-based (1/n to n/n): the files at sorted positions i-1, i-1+n, ... "
              "In a Slurm array (--array=1-N): $SLURM_ARRAY_TASK_ID/N; in a Kubernetes indexed Job, whose "
              "JOB_COMPLETION_INDEX counts from 0: JOB_COMPLETION_INDEX+1 of N.")


ModelSpec = Annotated[str, typer.Option("--model", "-m", help=f"Model: a name ({DEFAULT_NAME}: the bundled model) "
                                                               "or an s4music checkpoint directory or official .pt.")]


# ------------------------------------------------------------------------------------------- machine


@command(exits=("1 a required check failed",))
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
        table.add_row(c.name, status, escape(c.detail))
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
    console.print(f"wrote {escape(str(path))}", highlight=False)


# ------------------------------------------------------------------------------------------- data


@command(exits=("1 error, or any URL failed",))
def fetch(
    urls: list[str] = typer.Argument(..., help="Web pages or media URLs (YouTube needs a JS runtime; see doctor)."),
    out: Path = typer.Option(Path("fetched"), "--out", "-o", help="Output directory."),
    start: float = typer.Option(None, help="Keep audio from this second on (applied after download)."),
    end: float = typer.Option(None, help="Keep audio up to this second."),
    playlist_items: str = typer.Option(None, help="Playlist items to fetch, e.g. '1-3,7'."),
    sample_rate: int = typer.Option(FetchOptions.sample_rate, help="Sample rate of the converted audio."),
    max_mb: float = typer.Option(FetchOptions.max_mb, help="Stop a download once it is larger than this many MB "
                                                           "(each item of a playlist); 0: no limit."),
    max_minutes: float = typer.Option(FetchOptions.max_minutes, help="Refuse audio longer than this, judged from "
                                                                     "the site's metadata or the file's header "
                                                                     "while it downloads; 0: no limit."),
):
    """Download the audio of web pages (yt-dlp), keep the original, and convert it to mono WAV.

    Any address is fetched, as curl would; sizes and lengths are limited (--max-mb, --max-minutes)."""
    from s4music.data.fetch import fetch as fetch_urls

    if max_mb < 0 or max_minutes < 0:
        fail("--max-mb and --max-minutes are 0 (no limit) or more")
    options = FetchOptions(sample_rate=sample_rate, start=start, end=end, playlist_items=playlist_items,
                           max_mb=max_mb, max_minutes=max_minutes)
    with progress_bar() as bar:
        tasks: dict[str, int] = {}

        def on_progress(url: str, done: int, total: int | None) -> None:
            if url not in tasks:
                tasks[url] = bar.add_task(url[-50:], total=total)
            bar.update(tasks[url], completed=done, total=total)

        def on_result(url: str, item, error: str | None) -> None:
            if item is not None:
                bar.console.print(f"[green]ok[/] {escape(str(item.audio))} ({item.seconds:.1f} s)", highlight=False)

        report = fetch_urls(urls, out, options, on_progress=on_progress, on_result=on_result)
    report_failures(report.failed, len(report.fetched), "fetched", any_failure_fails=True)


@command(name="render-midi", exits=("1 error, or every file failed",))
def render_midi_command(
    sources: list[Path] = typer.Argument(..., help="MIDI files or directories (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory; mirrors the source layout."),
    instrument: list[str] = typer.Option(None, "--instrument", "-i",
                                         help="Keep only this GM family (piano, strings, ...), program 0-127, "
                                              "or 'drums'. Repeatable. Default: everything."),
    drums: bool = typer.Option(RenderOptions.drums, "--drums/--no-drums", help="Keep channel 10 (drums)."),
    soundfont: str = typer.Option(None, help="A .sf2/.sf3 file, or an installed soundfont by name: musescore, "
                                             "fluidr3, timgm6mb (`s4music doctor` lists them); several, comma-separated, "
                                             "for --vary to draw one per file. Default: the best installed."),
    program: str = typer.Option(None, help="Play every melodic part on this GM program 0-127, or 'piano' "
                                           "(one of several piano programs, drawn per file with --vary)."),
    vary: bool = typer.Option(RenderOptions.vary, "--vary/--no-vary",
                              help="Play each file as a player might, drawn from --seed and its path: tempo +-8%, "
                                   "velocity curve, humanized onsets, transposition, reverb, chorus (in NAME.json)."),
    seed: int = typer.Option(RenderOptions.seed, help="Seed of the variations."),
    max_seconds: float = typer.Option(RenderOptions.max_seconds, help="Render at most this many seconds of each file."),
    timeout: float = typer.Option(RenderOptions.timeout, help="Seconds FluidSynth may take for one file."),
    sample_rate: int = typer.Option(RenderOptions.sample_rate, help="Output sample rate."),
    workers: int = typer.Option(RenderOptions.workers, help="Files rendered in parallel."),
    shard: str = typer.Option(None, help=SHARD_HELP + " Shards share --out and need no merge; "
                                         "failures.shard-i-of-n.jsonl lists each one's failures."),
):
    """Render MIDI collections (e.g. the Lakh MIDI layout) to mono WAV with FluidSynth; resumable."""
    from s4music.data.midi import render_midi

    options = RenderOptions(instruments=instrument or None, drums=drums, soundfont=soundfont,
                            sample_rate=sample_rate, max_seconds=max_seconds, workers=workers, program=program,
                            vary=vary, seed=seed, timeout=timeout, shard=shard)
    with progress_bar() as bar:
        task = bar.add_task("rendering", total=None)
        report = render_midi(sources, out, options,
                             on_file=lambda src, status, done, total: bar.update(task, completed=done, total=total))
    for _, reason in report.skipped:
        console.print(f"[yellow]skipped:[/] {escape(reason)}", highlight=False, soft_wrap=True)
    minutes = sum(s for _, _, s in report.rendered) / 60
    console.print(f"{len(report.already)} already rendered; {minutes:.1f} min of new audio")
    report_failures([(str(s), r) for s, r in report.failed], len(report.rendered) + len(report.already),
                    f"rendered ({len(report.rendered)} this run)", any_failure_fails=False)


@command(exits=("1 error, every file failed, or --verify found damage",))
def prepare(
    sources: list[Path] = typer.Argument(None, help="Audio files or directories (wav, flac, mp3, ogg, opus, m4a, ...)."),
    out: Path = typer.Option(None, "--out", "-o", help="Dataset directory (created, or extended if it exists)."),
    seconds: float = typer.Option(PrepareOptions.seconds, help="Window length in seconds (the paper's 131,072 samples)."),
    quantization: str = typer.Option(PrepareOptions.quantization, help="mulaw-official, mulaw or linear."),
    sample_rate: int = typer.Option(PrepareOptions.sample_rate, help="Sample rate of the codes."),
    val: float = typer.Option(PrepareOptions.val_fraction, help="Share of each stratum's files for validation."),
    test: float = typer.Option(PrepareOptions.test_fraction, help="Share of each stratum's files for test."),
    seed: int = typer.Option(PrepareOptions.seed, help="Seed of the split assignment."),
    tag: list[str] = typer.Option(None, help="A stratum tag for these sources, key=value (repeatable)."),
    splits: Path = typer.Option(None, help='JSON split file {"train": [...], "val": [...], "test": [...]} of file '
                                           "names relative to the source directory; listed files keep that split."),
    verify: Path = typer.Option(None, "--verify", help="Only check the dataset at this directory: do dataset.json, "
                                                       "the manifest and the split files agree? Exit 1 if not."),
    shard: str = typer.Option(None, help=SHARD_HELP + " --out is then this shard's own directory; splits are "
                                         "those of the whole collection. Join the shards with --merge."),
    merge: bool = typer.Option(False, "--merge", help="SOURCES are the n shard directories of one --shard run: "
                                                      "join them into --out (new), the dataset one run would have "
                                                      "built, byte for byte. The shards fix every other setting."),
):
    """Build or extend a training dataset: decode, mono, resample, quantize, window, split by source.

    `s4music prepare --verify DIR` checks a dataset instead.

    `--shard i/n` builds one shard of it; `s4music prepare --merge SHARDS... -o DIR` joins them."""
    from s4music.data.dataset import PreparedDataset
    from s4music.data.format import verify_dataset
    from s4music.data.prepare import merge_shards, read_pinned_splits, summarize
    from s4music.data.prepare import prepare as prepare_dataset

    if verify is not None:
        problems = verify_dataset(verify)
        for problem in problems:
            console.print(f"[red]damaged:[/] {escape(str(problem))}", highlight=False, soft_wrap=True)
        if not problems:  # what it holds, as after a build
            meta = PreparedDataset(verify).meta
            print_hours(verify, summarize(meta))
            windows = ", ".join(f"{n} {split}" for split, n in meta["splits"].items())
            console.print(f"{len(meta['sources'])} files; windows: {windows}", highlight=False)
        console.print(f"{verify}: {'whole' if not problems else f'{len(problems)} problem(s)'}", highlight=False)
        raise typer.Exit(1 if problems else 0)
    pinned = read_pinned_splits(splits) if splits and not merge else {}
    if merge:
        if not sources or out is None or shard is not None:
            fail("--merge takes the shard directories as SOURCES and a new --out DIR (and no --shard)")
        report = merge_shards(sources, out)
    else:
        if not sources or out is None:
            fail("give the audio SOURCES and --out DIR (or --verify DIR to check a dataset)")
        options = PrepareOptions(seconds=seconds, sample_rate=sample_rate, quantization=quantization,
                                 val_fraction=val, test_fraction=test, seed=seed, tags=tag or [],
                                 pinned=pinned, shard=shard)
        with progress_bar() as bar:
            task = bar.add_task("preparing", total=None)
            report = prepare_dataset(sources, out, options, on_file=lambda path, status, done, total: bar.update(
                task, completed=done, total=total))
    print_hours(out, report.summary)
    if merge:
        console.print(f"{len(report.added)} files merged from {len(sources)} shards into {escape(str(out))}", highlight=False)
    else:
        copies = f" ({report.copies} known by their bytes: copies, or moved)" if report.copies else ""
        console.print(f"{len(report.added)} files added, {report.unchanged} already in the dataset{copies}")
    if report.unmatched_pins:
        missed = report.unmatched_pins
        # none found: the sources are likely not the folder the names are relative to, and every file
        # would be split on its own, renderings of one work apart
        why = ("are the sources the directory the split file names files in?" if len(missed) == len(pinned)
               else "expected in a build of part of what it lists")
        console.print(f"[yellow]warning:[/] {splits}: {len(missed)} listed file(s) not found under the sources "
                      f"({', '.join(missed[:3])}{', ...' if len(missed) > 3 else ''}); {why}",
                      highlight=False, soft_wrap=True)
    report_failures([(str(p), r) for p, r in report.failed], len(report.added) + report.unchanged,
                    "files in the dataset", any_failure_fails=False)


@command(name="pack")
def pack_command(
    dataset: Path = typer.Argument(..., help="A prepared dataset (built by `s4music prepare`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the parts and their index, pack.json."),
    part_mb: float = typer.Option(27.0, help="Largest part, in MiB (27: one fits a GPU lease's 64 MiB call beside "
                                             "this repository's tree)."),
    seed: int = typer.Option(0, help="Seed of the order sources are dealt to parts in."),
    max_parts: int = typer.Option(None, help="Write only the first N parts (each a random sample of the dataset)."),
    workers: int = typer.Option(None, help="Parts compressed at once (default: one per core; each holds a part "
                                           "and under 100 MB more)."),
):
    """Pack a dataset as parts that travel: each a random sample of it, compressed losslessly."""
    from s4music.data.format import read_meta
    from s4music.data.pack import pack
    from s4music.data.prepare import summarize

    clock = {"since": 0.0, "windows": 0}  # the rate of parts compressed after the first (which runs alone)

    def report(p) -> None:
        said = f"{p.path}: {p.bytes / 2**20:.1f} MiB, {p.hours:.2f} h"
        if p.kept or not clock["since"]:
            clock["since"] = time.monotonic()
            console.print(said + (" (kept from an earlier run)" if p.kept else ""), highlight=False)
            return
        clock["windows"] += p.windows
        left = (time.monotonic() - clock["since"]) / clock["windows"] * p.windows_left
        eta = "" if max_parts else f"; {time_left(left)} left"  # a line a part: logs read it too
        console.print(said + eta, highlight=False)

    parts = pack(dataset, out, part_mb=part_mb, seed=seed, max_parts=max_parts, workers=workers, on_part=report)
    print_hours(dataset, summarize(read_meta(dataset)))
    total = sum(p.bytes for p in parts) / 2**20
    console.print(f"{len(parts)} parts, {total:.1f} MiB, {sum(p.hours for p in parts):.2f} h; "
                  f"index {escape(str(out / 'pack.json'))}")


@command(name="unpack")
def unpack_command(
    index: Path = typer.Argument(..., help="A pack.json, or the folder holding it and its parts."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the datasets, one per part."),
    workers: int = typer.Option(None, help="Parts decompressed at once (default: every core)."),
    part: list[str] = typer.Option(None, "--part", help="Only this part (part-003, say); repeatable."),
):
    """Rebuild the datasets of a pack, checksums first; train on them with --data OUT/part-000 --data OUT/part-001 ..."""
    from s4music.data.pack import unpack

    done = unpack(index, out, workers=workers, only=part or None,
                  on_part=lambda p: console.print(f"unpacked {escape(str(p))}", highlight=False))
    console.print(f"{len(done)} dataset{'' if len(done) == 1 else 's'} under {escape(str(out))}", highlight=False)


@command(name="fetch-dataset", exits=("1 error, or every file failed",))
def fetch_dataset_command(
    name: str = typer.Argument(..., help="youtubemix, beethoven or sc09 (the paper's datasets, on the Hugging Face Hub)."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset directory to prepare."),
):
    """Download one of the paper's datasets, unpack it, and prepare it with the official split."""
    from s4music.data.named import fetch_dataset

    with progress_bar() as bar:
        task = bar.add_task("preparing", total=None)
        result = fetch_dataset(name, out, on_file=lambda path, status, done, total: bar.update(task, completed=done,
                                                                                               total=total))
    splits = ", ".join(f"{n} {s}" for s, n in result.splits.items())
    console.print(f"{escape(str(out))}: {result.files} files ({splits}), official split; "
                  f"{len(result.report.failed)} failed", highlight=False)
    report_failures([(str(p), r) for p, r in result.report.failed], len(result.report.added) + result.report.unchanged,
                    "files in the dataset", any_failure_fails=False)


@command
def models(
    folders: list[Path] = typer.Argument(None, help="Folders whose checkpoint directories to list as well, up to "
                                                    r"three levels down. \[default: ./models and ./runs, where "
                                                    "they exist]"),
):
    """The models you can name wherever a model is taken, which are here already, and the checkpoints
    in your folders (named by their path)."""
    from s4music.model.registry import list_models

    if not folders:
        folders = [p for p in [Path("models"), Path("runs")] if p.is_dir()]  # runs/: where `train` writes
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise S4MusicError(f"{', '.join(missing)}: not a folder")
    table = Table(title="s4music models")
    for column in ("name", "cached", "size MB", "source", "what it is"):
        table.add_column(column, overflow="fold")
    for m in list_models(folders):
        table.add_row(escape(m["name"]), m["cached"], f"{m['size_mb']:.0f}" if m["size_mb"] else "?", escape(m["source"]),
                      escape(m["about"]))
    Console().print(table)


# ------------------------------------------------------------------------------------------- training


@command
def train(
    data: list[str] = typer.Option(None, "--data", "-d",
                                   help="Prepared dataset, optionally with a mixture weight: path[:weight]. Repeatable."),
    out: Path = typer.Option(None, "--out", "-o", help=default("Run directory.", TrainConfig.out)),
    mode: str = typer.Option(None, help=r"scratch, finetune or reparam. \[default: finetune with --from, else scratch]"),
    init: str = typer.Option(None, "--from", help="Checkpoint to start from: a model name, an s4music directory "
                                                  "or an official .pt."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML training config; options given here override it."),
    overrides: list[str] = typer.Option(None, "--set", help="Override a config key: key=value, e.g. model.d_model=32."),
    steps: int = typer.Option(None, help=default("Optimizer steps. With --resume and no --max-minutes: train on "
                                                 "to this step, leaving the run's minutes aside.", TrainConfig.steps)),
    seq_len: int = typer.Option(None, help=default("Samples per training window.", TrainConfig.seq_len)),
    batch_size: int = typer.Option(None, help=default("Windows per micro-batch over all processes.",
                                                      TrainConfig.batch_size)),
    grad_accum: int = typer.Option(None, help=default("Micro-batches per optimizer step.", TrainConfig.grad_accum)),
    lr: float = typer.Option(None, help="Learning rate; the S4 parameters take a quarter of it unless ssm_lr is set. "
                                        rf"\[default: {SCRATCH_LR:g} from scratch, {WEIGHTS_LR:g} from --from]"),
    warmup: int = typer.Option(None, help="Steps of linear learning-rate warm-up. "
                                          rf"\[default: 0 from scratch, {WEIGHTS_WARMUP} from --from]"),
    precision: str = typer.Option(None, help=default("no, bf16, or fp16 (GPU only) autocast.", TrainConfig.precision)),
    fast: bool = typer.Option(None, "--fast/--plain", help="The fast training step: element-wise chains fused by "
                                                            "torch.compile (the same function; compiles for up to a "
                                                            "minute first, cached after)."),
    conv_chunk: int = typer.Option(None, help="With --fast: S4D convolutions as matrix products over chunks of this "
                                              "many samples, in bf16 under bf16 autocast (0: by FFT; the same "
                                              "function, faster where matrix units are; try 256)."),
    max_minutes: float = typer.Option(None, help="Fit the run into this many minutes: time the first steps, plan "
                                                 "warm-up and cosine decay over the steps that fit, stop in time. "
                                                 "With --resume: the run's whole budget, so more minutes go on."),
    seed: int = typer.Option(None, help=default("Seed of initialization and data order.", TrainConfig.seed)),
    groups: int = typer.Option(None, help="reparam: copies of Lambda per layer (default: one per channel)."),
    untie_pb: bool = typer.Option(None, "--untie-pb", help="reparam: untie P and B as well."),
    dt_per_state: bool = typer.Option(None, "--dt-per-state", help="reparam: a step size per channel and state."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest checkpoint, "
                                                        "with the run's own config."),
):
    """Train SaShiMi on prepared datasets: from scratch, fine-tuned, or reparameterized (untied S4).

    Multi-process: `ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 -m s4music.cli train ...`
    on CPUs, or `accelerate launch --multi_gpu --num_processes N -m s4music.cli train ...` on GPUs.
    """
    from s4music.train import train as run_training

    if resume and steps is not None and max_minutes is None:  # train to that step, not for the run's minutes
        overrides = [*(overrides or []), "max_minutes=null"]
    cfg = TrainConfig.load(
        config, overrides, resume=resume, data=data or None, out=str(out) if out else None, mode=mode, init=init,
        steps=steps, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=warmup,
        precision=precision, fast=fast, conv_chunk=conv_chunk, max_minutes=max_minutes, seed=seed, groups=groups,
        untie_pb=untie_pb, dt_per_state=dt_per_state)
    with progress_bar(info=True) as bar:
        task = bar.add_task("training", total=None if cfg.max_minutes else cfg.steps, info="")  # planned later

        def on_step(s) -> None:
            val = f" val {s.val_bits:.3f}" if s.val_bits is not None else ""
            # a budgeted run's own ETA; otherwise rich's, which averages the steps over two minutes
            bar.update(task, completed=s.step, total=s.steps, eta=s.eta_seconds if cfg.max_minutes else None,
                       info=f"{s.bits:.3f} bits{val}  lr {s.lr:.2e}  {s.audio_seconds_per_second:.3g} audio s/s")
            if s.val_bits is not None:
                bar.console.print(f"step {s.step}: train {s.bits:.4f}, val {s.val_bits:.4f} bits/sample", highlight=False)

        result = run_training(cfg, resume=resume, on_step=on_step)
    if result.added_parameters:
        console.print(f"reparam added {result.added_parameters:,} parameters ({result.parameters:,} in all)")
    console.print(f"done: step {result.step}, {result.world_size} process(es); model in {escape(str(result.model))}",
                  highlight=False)


@command(name="eval", inference=True)
def eval_command(
    model: str = typer.Argument(DEFAULT_NAME, help="Model: a name or an s4music checkpoint directory or official .pt."),
    data: Path = typer.Option(..., "--data", "-d", help="Prepared dataset to score."),
    split: str = typer.Option(EvalOptions.split, help="train, val or test."),
    context: int = typer.Option(None, help="Samples scored from rest at a time (default: the whole window, "
                                           "8.192 s for datasets built with the defaults)."),
    batch_size: int = typer.Option(EvalOptions.batch_size, help="Windows scored together."),
    max_windows: int = typer.Option(None, help="Score only the first N windows (quick checks)."),
    device: str = typer.Option(EvalOptions.device, help="cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    record: bool = typer.Option(False, help="Store the result in the checkpoint's summary (prompt guidance uses it)."),
):
    """Test NLL in bits per sample, per stratum, with unigram and bigram baselines and a 95% interval."""
    from s4music.evaluate import evaluate, record_result

    options = EvalOptions(split=split, context=context, batch_size=batch_size, device=device, max_windows=max_windows)
    with progress_bar() as bar:
        task = bar.add_task("scoring", total=None)
        report = evaluate(model, data, options, on_progress=lambda done, total: bar.update(task, completed=done,
                                                                                           total=total))
    if record:
        record_result(model, report)
        console.print(f"recorded in {escape(str(model))}: {report.split} {report.overall.model_bits:.4f} bits/sample, "
                      "with the audio's level and flatness (check, continue and generate read them)", highlight=False)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    table = Table(title=f"{split} NLL, bits per sample (context {report.context})")
    for column in ("stratum", "windows", "model", "unigram", "bigram"):
        table.add_column(column)
    for r in [*report.strata, report.overall]:
        table.add_row(escape(r.stratum), str(r.windows), f"{r.model_bits:.4f}", f"{r.unigram_bits:.4f}", f"{r.bigram_bits:.4f}")
    Console().print(table)
    lo, hi = report.interval
    sources = len(report.per_source)
    few = "; too few to trust" if sources < FEW_SOURCES else ""  # a percentile bootstrap needs more units
    spread = (f"95% interval [{lo:.4f}, {hi:.4f}] (bootstrap over {sources} source files{few})" if sources > 1 else
              "no interval: the split holds one source file")
    Console().print(f"model: {report.overall.model_bits:.4f} bits/sample, {spread}", highlight=False)


# ------------------------------------------------------------------------------------------- generation


def print_guidance(report, continuing: bool = True, to: Console = console) -> None:
    """The verdict, its reasons and advice, on `to` (stderr; `check`, whose report it is, gives
    stdout); a far verdict as a warning when `continuing`. Each a line of its own, which the
    terminal wraps (rich would break it mid-phrase at 80 columns)."""
    colour = "red" if report.far else "green" if report.verdict == "typical" else "yellow"
    to.print(f"prompt: {report.seconds:.2f} s; " + ("; ".join(report.conversions) or "no conversion needed"),
             highlight=False, soft_wrap=True)
    label = "[bold yellow]warning:[/] " if report.far and continuing else ""
    to.print(f"{label}verdict: [{colour}]{report.verdict}[/]", highlight=False, soft_wrap=True)
    for reason in report.reasons:
        to.print(f"  - {escape(reason)}", highlight=False, soft_wrap=True)
    for advice in report.advice:
        to.print(f"  advice: {escape(advice)}", highlight=False, soft_wrap=True)
    if report.far and continuing:
        to.print("  continuing anyway (--strict refuses such a prompt)", highlight=False, soft_wrap=True)


def generation_run(run, what: str, options: GenerateOptions) -> None:
    """Run a generation with a progress bar (ETA and live speed, × real time), then list the outputs.
    `run(progress, guidance)` takes the callbacks. The seed (drawn here where none is given) is said
    after the prompt's check, or else with the first sample, so that even a run cut short can be
    made again. A reader of standard output that goes away ends the run quietly."""
    from s4music.generate import DEGENERACIES, OutputClosed

    if options.seed is None:
        options.seed = new_seed()
    bar = progress_bar(info=True)
    # loading and reading take seconds with nothing to show: a spinner (on a terminal; it writes no line)
    waiting = console.status("loading the model" + (" and reading the prompt" if what == "continuing" else ""))
    if console.is_terminal:
        waiting.start()
    task, seed_said = None, False

    def say_seed() -> None:
        nonlocal seed_said
        waiting.stop()
        if not seed_said:
            seed_said = True
            console.print(f"seed {options.seed}", highlight=False)

    def guidance(report) -> None:
        waiting.stop()
        print_guidance(report)
        say_seed()

    def progress(done: int, total: int, speed: float) -> None:
        nonlocal task
        if task is None:  # shown from the first sample on, so an early error is one line alone
            say_seed()
            bar.start()
            task = bar.add_task(what, total=total, info="")
        bar.update(task, completed=done, total=total, info=f"{speed:.2f}× real time")

    try:
        result = run(progress, guidance)
    except OutputClosed:
        raise Quiet(0) from None
    finally:
        waiting.stop()
        bar.stop()
    together = f" for the {len(result.takes)} takes together" if len(result.takes) > 1 else ""
    console.print(f"done: {result.speed_x_realtime:.2f}× real time{together} "
                  f"({result.timings['generate_s']:.1f} s generating)", highlight=False)
    for take in result.takes:
        retry = "" if options.retry_degenerate or take.path is None else " (--retry-degenerate N resamples such a take)"
        flag = f" [red]degenerate: {DEGENERACIES[take.degenerate]}[/]{retry}" if take.degenerate else ""
        where = take.path if take.path is not None else "standard output"
        console.print(f"wrote {escape(str(where))} (seed {take.seed}, {take.bits:.2f} bits/sample){flag}", highlight=False)
    if result.underruns:
        console.print(f"[yellow]the sound device ran dry {result.underruns} time(s)[/]", highlight=False)
    if result.sidecar is not None:
        console.print(f"settings and timings: {escape(str(result.sidecar))}", highlight=False, soft_wrap=True)


# Options that continue and generate share; defaults are the library's.
Out = Annotated[str, typer.Option("--out", "-o", help="Output file: .wav, .flac, .ogg or .mp3 (by its suffix), "
                                                      "or - for a WAV stream on standard output.")]
Seconds = Annotated[float, typer.Option(help="Seconds to generate (at most an hour).")]
Variations = Annotated[int, typer.Option("-n", "--variations", help="Variations, each with its own seed "
                                                                    "(seed, seed+1, ...).")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature (0: greedy). Default: the model's "
                                                 "recommendation, else 1.")]
TemperatureEnd = Annotated[float, typer.Option(help="A temperature schedule: from --temperature at the seam to "
                                                    "this at the end. Default: the model's recommendation, else none.")]
ContextSeconds = Annotated[float, typer.Option(help="Re-anchoring: every N/2 seconds, read the state afresh from "
                                                   "the last N seconds alone (0: off; each read costs what an "
                                                   "N-second prompt does). Default: the model's recommendation, "
                                                   "else off.")]
TopK = Annotated[int, typer.Option(help="Keep the k likeliest codes (0: off). Default: the model's recommendation, "
                                        "else off.")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling: keep the likeliest codes up to this probability "
                                          "(1: off). Default: as top-k.")]
Typical = Annotated[float, typer.Option(help="Locally typical sampling: keep the codes whose surprise is nearest "
                                              "the distribution's entropy, up to this probability (1: off). Default: the "
                                              "model's recommendation, which may differ for a prompt it finds "
                                              "surprising (see check), else off.")]
Guidance = Annotated[float, typer.Option(help="Guidance by the prompt: draw from free + G (prompt - free), the "
                                               "logits of the model that heard the prompt pushed away from one "
                                               "that heard only its last --guidance-seconds (1: off; costs a "
                                               "batch of 2 per variation). Default: the model's recommendation.")]
GuidanceSeconds = Annotated[float, typer.Option(help="With --guidance: how much of the prompt's end the free row "
                                                      "hears (0: from rest at the seam). Default: the model's "
                                                      "recommendation, else 0.25.")]
Surprise = Annotated[str, typer.Option(help="Mirostat: hold the running surprise of the drawn codes near this many "
                                            "bits/sample, or auto (the prompt's own; from nothing, the model's test "
                                            "figure). 0: off.")]
Seed = Annotated[int, typer.Option(help="Seed (default: random; always printed and saved).")]
Rank = Annotated[bool, typer.Option("--rank", help="Order variations by the model's own likelihood, best first.")]
Normalize = Annotated[str, typer.Option(help="Output level, one gain fixed before the first sample, then a "
                                             "true-peak limiter at -1 dBTP: loudness (-16 LUFS), peak (-1 dBFS) or "
                                             "none (the model's level).")]
Format = Annotated[str, typer.Option(help="wav, flac, ogg or mp3 for -o - (files take it from their suffix).")]
Sidecar = Annotated[str, typer.Option(help="Write the settings and timings (JSON) here. Default: OUT.json beside "
                                           "a file; with -o -, none unless given.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, or auto: read the prompt on a GPU when there is one and "
                                          "generate on the fused CPU step (cuda: generate on the GPU too).")]
Retry = Annotated[int, typer.Option(help="Resample a variation that collapses to silence, turns to noise or "
                                         "sticks at a DC offset, up to N times (files only).")]
Plot = Annotated[bool, typer.Option("--plot", help="Also draw each take's waveform and spectrogram, the seam "
                                                   "marked, beside it: OUT.png (with -n, one per take).")]
Fused = Annotated[bool, typer.Option("--fused/--no-fused", help="Use the fused C++ CPU step when available "
                                                                "(--no-fused: the plain PyTorch step).")]
HalfWeights = Annotated[bool, typer.Option("--half-weights/--full-weights", help="Fused step: hold the linear "
                                           "weights in half precision, which reads half the memory per sample, and "
                                           "read the prompt in bf16 where the CPU has it (faster; --full-weights "
                                           "gives the plain step's codes).")]
Play = Annotated[bool, typer.Option("--play", help="Play on the default sound device as it is made, from the last "
                                                   "second of the prompt.")]


def surprise_value(text: str | None) -> float | str | None:
    """--surprise as Sampling takes it: "auto", a number, or None (unset)."""
    if text is None or text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise GenerationError(f"--surprise {text}: use auto, or bits/sample from 0 (off) to 8") from None


@command(name="continue", inference=True, exits=("1 error", f"{FAR} (--strict)"))
def continue_command(
    prompt: str = typer.Argument(..., help="Audio file (wav, flac, mp3, ogg, ...) or a URL (fetched with yt-dlp)."),
    out: Out = "continuation.wav",
    seconds: Seconds = GenerateOptions.seconds,
    prompt_seconds: float = typer.Option(PromptSelection.seconds,
                                         help="Use the last N seconds of the prompt (of the selection)."),
    prompt_start: float = typer.Option(None, help="Prompt selection start, seconds."),
    prompt_end: float = typer.Option(None, help="Prompt selection end, seconds."),
    variations: Variations = GenerateOptions.variations,
    temperature: Temperature = None,
    temperature_end: TemperatureEnd = None,
    top_k: TopK = None,
    top_p: TopP = None,
    context_seconds: ContextSeconds = None,
    typical: Typical = None,
    guidance: Guidance = None,
    guidance_seconds: GuidanceSeconds = None,
    surprise: Surprise = None,
    seed: Seed = None,
    rank: Rank = GenerateOptions.rank,
    include_prompt: bool = typer.Option(Output.include_prompt, "--prompt/--no-prompt", help="Start the output with the prompt."),
    normalize: Normalize = Output.normalize,
    format: Format = None,
    sidecar: Sidecar = Output.sidecar,
    model: ModelSpec = DEFAULT_NAME,
    device: Device = StepOptions.device,
    strict: bool = typer.Option(GenerateOptions.strict, "--strict", help="Refuse (exit 2) a prompt judged far from the model's "
                                                           "music; by default a warning is printed and it continues."),
    retry_degenerate: Retry = GenerateOptions.retry_degenerate,
    plot: Plot = Output.plot,
    fused: Fused = StepOptions.fused,
    half_weights: HalfWeights = StepOptions.half_weights,
    play: Play = False,
):
    """Continue a piece of music: PROMPT is read, checked, and carried on for --seconds.

    Stream it as it is made: `s4music continue song.mp3 -o - | ffplay -`, or `--play`."""
    from s4music.generate import continue_prompt

    options = GenerateOptions(
        seconds=seconds, variations=variations, seed=seed, rank=rank, retry_degenerate=retry_degenerate, strict=strict,
        sampling=Sampling(temperature=temperature, top_k=top_k, top_p=top_p, temperature_end=temperature_end,
                          context_seconds=context_seconds, typical=typical, guidance=guidance,
                          guidance_seconds=guidance_seconds, surprise=surprise_value(surprise)),
        prompt=PromptSelection(seconds=prompt_seconds, start=prompt_start, end=prompt_end),
        output=Output(include_prompt=include_prompt, normalize=normalize, format=format, plot=plot, sidecar=sidecar),
        step=StepOptions(device=device, fused=fused, half_weights=half_weights))
    generation_run(lambda progress, guidance: continue_prompt(prompt, out, model, options, on_progress=progress,
                                                              on_guidance=guidance, play=play), "continuing", options)


@command(inference=True)
def generate(
    out: Out = "improvisation.wav",
    seconds: Seconds = GenerateOptions.seconds,
    variations: Variations = GenerateOptions.variations,
    temperature: Temperature = None,
    temperature_end: TemperatureEnd = None,
    top_k: TopK = None,
    top_p: TopP = None,
    context_seconds: ContextSeconds = None,
    typical: Typical = None,
    surprise: Surprise = None,
    seed: Seed = None,
    rank: Rank = GenerateOptions.rank,
    normalize: Normalize = Output.normalize,
    format: Format = None,
    sidecar: Sidecar = Output.sidecar,
    model: ModelSpec = DEFAULT_NAME,
    device: Device = StepOptions.device,
    retry_degenerate: Retry = GenerateOptions.retry_degenerate,
    plot: Plot = Output.plot,
    fused: Fused = StepOptions.fused,
    half_weights: HalfWeights = StepOptions.half_weights,
    play: Play = False,
):
    """Improvise from nothing: sample the model from silence."""
    from s4music.generate import improvise

    options = GenerateOptions(
        seconds=seconds, variations=variations, seed=seed, rank=rank, retry_degenerate=retry_degenerate,
        sampling=Sampling(temperature=temperature, top_k=top_k, top_p=top_p, temperature_end=temperature_end,
                          context_seconds=context_seconds, typical=typical, surprise=surprise_value(surprise)),
        output=Output(normalize=normalize, format=format, plot=plot, sidecar=sidecar),
        step=StepOptions(device=device, fused=fused, half_weights=half_weights))
    generation_run(lambda progress, _: improvise(out, model, options, on_progress=progress, play=play), "generating",
                   options)


@command(inference=True, exits=("1 error", FAR))
def check(
    prompt: str = typer.Argument(..., help="Audio file or URL."),
    model: ModelSpec = DEFAULT_NAME,
    prompt_seconds: float = typer.Option(PromptSelection.seconds, help="Judge the last N seconds (as continue would use them)."),
    prompt_start: float = typer.Option(None, help="Selection start, seconds."),
    prompt_end: float = typer.Option(None, help="Selection end, seconds."),
    device: str = typer.Option(StepOptions.device, help="cpu, cuda, or auto: read the prompt on a GPU when there "
                                                        "is one."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
):
    """Tell whether a prompt suits the model before spending minutes on it. Exit 2 if it is far off."""
    from s4music.generate import check_prompt

    selection = PromptSelection(seconds=prompt_seconds, start=prompt_start, end=prompt_end)
    if problems := selection.problems():
        raise GenerationError("; ".join(problems))
    report = check_prompt(prompt, model, selection, device)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        print_guidance(report, continuing=False, to=Console())
    if report.far:
        raise typer.Exit(2)


@command(inference=True)
def jam(
    input: str = typer.Option(None, "--input", "-i", help="What to listen to: - for a WAV stream on standard input "
                                                          "(any rate and channels), or an audio file; default: the "
                                                          "default sound input."),
    realtime: bool = typer.Option(False, "--realtime", help="With --input FILE: play the file at its own pace "
                                                            "(else as fast as the model goes)."),
    record: Path = typer.Option(None, "--record", help="Write the jam as two channels (the input as heard, the "
                                                       "model's answers), .wav or .flac."),
    log: Path = typer.Option(None, "--log", help="Write one JSON line per answer: start, end, why it ended, seed, "
                                                 "bits per sample."),
    wait: float = typer.Option(JamOptions.wait, help="Seconds of quiet before the model answers."),
    max_answer: float = typer.Option(JamOptions.max_answer, help="The longest answer, seconds."),
    quiet_db: float = typer.Option(JamOptions.quiet_db, help="Quiet: this many dB below the recent playing level."),
    match_level: bool = typer.Option(JamOptions.match_level, "--match-level/--model-level",
                                     help="Answer at the loudness of your last 2 s, or at the model's own level."),
    play: bool = typer.Option(True, "--play/--no-play", help="Play the answers on the default sound output."),
    model: ModelSpec = DEFAULT_NAME,
    seed: Seed = None,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    typical: Typical = None,
    guidance: Guidance = None,
    guidance_seconds: GuidanceSeconds = None,
    surprise: Surprise = None,
    fused: Fused = StepOptions.fused,
    half_weights: HalfWeights = StepOptions.half_weights,
):
    """Jam: the model listens live and answers when you pause, until the input ends (or Ctrl-C).

    `ffmpeg -re -i song.ogg -f wav - | s4music jam --input - --record jam.wav --log turns.jsonl`"""
    import sys

    from s4music.jam import run_jam
    from s4music.model.registry import load_model
    from s4music.sources import device_input, file_at_pace, wav_stream

    options = JamOptions(wait=wait, max_answer=max_answer, quiet_db=quiet_db, match_level=match_level, seed=seed,
                         sampling=Sampling(temperature=temperature, top_k=top_k, top_p=top_p, typical=typical,
                                           guidance=guidance, guidance_seconds=guidance_seconds,
                                           surprise=surprise_value(surprise)),
                         step=StepOptions(device="cpu", fused=fused, half_weights=half_weights))
    options.check()
    net = load_model(model, device="cpu")
    sr = net.audio.sample_rate
    if input is None:
        source = device_input(sr)
    elif input == "-":
        source = wav_stream(sys.stdin.buffer, sr)
    else:
        source = file_at_pace(input, sr, realtime=realtime)
    colours = {"listening": "cyan", "verdict": "cyan", "answer": "green", "turn": "green"}
    kept = " and keeps " + " and ".join(str(p) for p in (record, log) if p) if record or log else ""

    def on_event(e) -> None:
        text = f"listening: Ctrl-C ends the jam{kept}" if e.kind == "listening" else e.text
        console.print(f"[{colours[e.kind]}]{e.time_s:7.2f} s[/] {text}", highlight=False, soft_wrap=True)

    with _one_interrupt():
        result = run_jam(source, net, options, record=record, log=log, play=play, on_event=on_event)
    console.print(f"{result.seconds:.1f} s of input, {len(result.turns)} answer(s), seed {result.seed}, "
                  f"{result.step}" + (f"; recording: {result.record}" if result.record else ""), highlight=False)


@command
def studio(
    port: int = typer.Option(7860, help="Port to serve on."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 lets anyone on the network use it."),
    model: ModelSpec = DEFAULT_NAME,
    share: bool = typer.Option(False, "--share", help="Also open a public Gradio tunnel (off unless asked)."),
    max_upload_mb: int = typer.Option(100, help="Largest upload, MB; fetches from the URL box too."),
    model_dir: list[Path] = typer.Option(None, "--model-dir", help="A folder whose checkpoint folders visitors may "
                                                                   "choose in the model box (repeatable); "
                                                                   "otherwise only model names and --model."),
    allow_local_urls: bool = typer.Option(False, "--allow-local-urls",
                                          help="Let the URL box fetch loopback, private and link-local addresses "
                                               "even where others can reach the page (--host other than loopback, "
                                               "or --share); by default it fetches only public addresses there."),
):
    """A local web page that guides you to a good continuation: prompt in, guidance, takes."""
    import shutil
    import tempfile

    from s4music.studio import is_loopback, serve

    for folder in model_dir or []:
        if not folder.is_dir():
            fail(f"--model-dir {folder}: no such folder")
    public = share or not is_loopback(host)
    if public:
        console.print(f"[bold yellow]warning:[/] serving on {host}{' and a public tunnel' if share else ''}: anyone "
                      "who can reach it can use the studio and the model; its URL box fetches "
                      + ("any address (--allow-local-urls)" if allow_local_urls else "public addresses only"),
                      highlight=False)
    console.print(f"s4music studio: http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port} (Ctrl-C stops it)",
                  highlight=False)
    # Takes, fetched prompts and Gradio's copies of files live in one folder, removed however the
    # server stops (Ctrl-C, or SIGTERM, which here interrupts as Ctrl-C does). Gradio reads
    # GRADIO_TEMP_DIR when it is imported, which serve() does.
    work = Path(tempfile.mkdtemp(prefix="s4music-studio-"))
    os.environ["GRADIO_TEMP_DIR"] = str(work / "gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve(host, port, model, share=share, max_upload_mb=max_upload_mb, model_dirs=model_dir or (),
              allow_local_urls=allow_local_urls, work_dir=work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _one_interrupt(grace: float = 5.0):
    """Ctrl-C stops the command once: a second Ctrl-C within `grace` seconds, while the first one
    unwinds, is ignored, so it cannot cut short the closing of the files being kept (a recording's
    header and rename) or the exit after it. One later than that interrupts again, for a close that
    hangs. After an interrupt the handler stays, for the process is on its way out."""
    first: list[float] = []

    def handler(signum, frame) -> None:
        if first and time.monotonic() - first[0] < grace:
            return
        first[:] = [time.monotonic()]
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        if not first:
            signal.signal(signal.SIGINT, previous)


def main() -> None:
    """The console script: exit codes as EXIT_CODES says; usage errors (a bad option) are errors (1)."""
    try:
        code = app(prog_name="s4music", standalone_mode=False)  # returns a typer.Exit's code instead of exiting
    except Quiet as q:
        _silence_stdout()
        sys.exit(q.code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        console.print("interrupted")
        sys.exit(130)
    except typer.TyperException as e:  # a usage error: a bad option or value
        e.show()
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except BrokenPipeError:
        _silence_stdout()
        sys.exit(0)
    if code == 130:  # typer returns Ctrl-C (KeyboardInterrupt) in a command as this code
        console.print("interrupted")
    sys.exit(code if isinstance(code, int) else 0)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so flushing it at exit cannot fail on a closed pipe."""
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
