"""The `s4music` command line. Each subcommand parses options and calls one library function."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Annotated

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


def command(fn=None, *, name: str | None = None, inference: bool = False):
    """Register a subcommand whose toolkit errors become one line and exit code 1. An inference
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


def progress_bar(info: bool = False) -> Progress:
    """A rich progress bar with ETA, on stderr; `info` adds a column fed by the task field "info"."""
    extra = (TextColumn("{task.fields[info]}"),) if info else ()
    return Progress(
        TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), *extra, TimeRemainingColumn(),
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
    from s4music.data.midi import RenderOptions, render_midi

    options = RenderOptions(instruments=instrument or None, drums=drums, soundfont=soundfont,
                            sample_rate=sample_rate, max_seconds=max_seconds, workers=workers)
    with progress_bar() as bar:
        task = bar.add_task("rendering", total=None)
        report = render_midi(sources, out, options,
                             on_file=lambda src, status, done, total: bar.update(task, completed=done, total=total))
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
    splits: Path = typer.Option(None, help='JSON split file {"train": [...], "val": [...], "test": [...]} of file '
                                           "names relative to the source directory; listed files keep that split."),
):
    """Build or extend a training dataset: decode, mono, resample, quantize, window, split by source."""
    from s4music.data.prepare import PrepareOptions, read_pinned_splits
    from s4music.data.prepare import prepare as prepare_dataset

    options = PrepareOptions(seconds=seconds, sample_rate=sample_rate, quantization=quantization,
                             val_fraction=val, test_fraction=test, seed=seed, tags=tag or [],
                             pinned=read_pinned_splits(splits) if splits else {})
    with progress_bar() as bar:
        task = bar.add_task("preparing", total=None)
        report = prepare_dataset(sources, out, options,
                                 on_file=lambda path, status, done, total: bar.update(task, completed=done, total=total))
    table = Table(title=f"{out}: hours of audio")
    for column in ("split", "stratum", "hours"):
        table.add_column(column)
    for (split, stratum), hours in report.summary.items():
        table.add_row(split, stratum, f"{hours:.3f}")
    Console().print(table)
    console.print(f"{len(report.added)} files added, {report.unchanged} already in the dataset")
    if report.unmatched_pins:
        missed = report.unmatched_pins
        console.print(f"[yellow]warning:[/] {splits}: {len(missed)} listed file(s) not found under the sources "
                      f"({', '.join(missed[:3])}{', ...' if len(missed) > 3 else ''}); are the sources the "
                      "directory the split file names files in?", highlight=False, soft_wrap=True)
    report_failures([(str(p), r) for p, r in report.failed], len(report.added) + report.unchanged,
                    "files in the dataset", any_failure_fails=False)


@command
def train(
    data: list[str] = typer.Option(None, "--data", "-d",
                                   help="Prepared dataset, optionally with a mixture weight: path[:weight]. Repeatable."),
    out: Path = typer.Option(None, "--out", "-o", help="Run directory (default runs/s4music)."),
    mode: str = typer.Option(None, help="scratch, finetune or reparam (default scratch)."),
    init: str = typer.Option(None, "--from", help="Checkpoint to start from: s4music directory or official .pt."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML training config; options given here override it."),
    overrides: list[str] = typer.Option(None, "--set", help="Override a config key: key=value, e.g. model.d_model=32."),
    steps: int = typer.Option(None, help="Optimizer steps (default 1000)."),
    seq_len: int = typer.Option(None, help="Samples per training window (default 16000)."),
    batch_size: int = typer.Option(None, help="Windows per micro-batch over all processes (default 4)."),
    grad_accum: int = typer.Option(None, help="Micro-batches per optimizer step (default 1)."),
    lr: float = typer.Option(None, help="Learning rate (default 4e-3; SSM parameters use ssm_lr, 1e-3)."),
    precision: str = typer.Option(None, help="no, bf16, or fp16 (GPU only) autocast (default no)."),
    seed: int = typer.Option(None, help="Seed of initialization and data order (default 0)."),
    groups: int = typer.Option(None, help="reparam: copies of Lambda per layer (default: one per channel)."),
    untie_pb: bool = typer.Option(None, "--untie-pb", help="reparam: untie P and B as well."),
    dt_per_state: bool = typer.Option(None, "--dt-per-state", help="reparam: a step size per channel and state."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
):
    """Train SaShiMi on prepared datasets: from scratch, fine-tuned, or reparameterized (untied S4).

    Multi-process: `ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 -m s4music.cli train ...`
    on CPUs, or `accelerate launch --multi_gpu --num_processes N -m s4music.cli train ...` on GPUs.
    """
    from s4music.train import TrainConfig
    from s4music.train import train as run_training

    cfg = TrainConfig.load(
        config, overrides, resume=resume, data=data or None, out=str(out) if out else None, mode=mode, init=init, steps=steps,
        seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, lr=lr, precision=precision, seed=seed,
        groups=groups, untie_pb=untie_pb, dt_per_state=dt_per_state)
    console.print(f"run {cfg.out}: {cfg.mode}, seed {cfg.seed}", highlight=False)
    with progress_bar(info=True) as bar:
        task = bar.add_task("training", total=cfg.steps, info="")

        def on_step(s) -> None:
            val = f" val {s.val_bits:.3f}" if s.val_bits is not None else ""
            bar.update(task, completed=s.step,
                       info=f"{s.bits:.3f} bits{val}  lr {s.lr:.2e}  {s.audio_seconds_per_second:.1f} audio s/s")
            if s.val_bits is not None:
                bar.console.print(f"step {s.step}: train {s.bits:.4f}, val {s.val_bits:.4f} bits/sample", highlight=False)

        result = run_training(cfg, resume=resume, on_step=on_step)
    if result.added_parameters:
        console.print(f"reparam added {result.added_parameters:,} parameters ({result.parameters:,} in all)")
    console.print(f"done: step {result.step}, {result.world_size} process(es); model in {result.model}",
                  highlight=False)


@command(name="eval", inference=True)
def eval_command(
    checkpoint: Path = typer.Argument(..., help="s4music checkpoint directory, or an official .pt."),
    data: Path = typer.Option(..., "--data", "-d", help="Prepared dataset to score."),
    split: str = typer.Option("test", help="train, val or test."),
    context: int = typer.Option(None, help="Samples scored from rest at a time (default: the whole window, "
                                           "8.192 s for datasets built with the defaults)."),
    batch_size: int = typer.Option(4, help="Windows scored together."),
    max_windows: int = typer.Option(None, help="Score only the first N windows (quick checks)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    record: bool = typer.Option(False, help="Store the result in the checkpoint's summary (prompt guidance uses it)."),
):
    """Test NLL in bits per sample, per stratum, with unigram and bigram baselines and a 95% interval."""
    import json

    from s4music.evaluate import evaluate, record_result

    with progress_bar() as bar:
        task = bar.add_task("scoring", total=None)
        report = evaluate(checkpoint, data, split=split, context=context, batch_size=batch_size, device=device,
                          max_windows=max_windows, on_progress=lambda done, total: bar.update(task, completed=done,
                                                                                              total=total))
    if record:
        record_result(checkpoint, report)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    table = Table(title=f"{split} NLL, bits per sample (context {report.context})")
    for column in ("stratum", "windows", "model", "unigram", "bigram"):
        table.add_column(column)
    for r in [*report.strata, report.overall]:
        table.add_row(r.stratum, str(r.windows), f"{r.model_bits:.4f}", f"{r.unigram_bits:.4f}", f"{r.bigram_bits:.4f}")
    Console().print(table)
    lo, hi = report.interval
    Console().print(f"model: {report.overall.model_bits:.4f} bits/sample, 95% interval [{lo:.4f}, {hi:.4f}] "
                    f"(bootstrap over {len(report.per_source)} source files)")


def _generate_options(**values):
    from s4music.generate import GenerateOptions

    return GenerateOptions(**{k: v for k, v in values.items() if v is not None})


def _print_guidance(report) -> None:
    colour = {"typical": "green", "unusual": "yellow"}.get(report.verdict, "red")
    console.print(f"prompt: {report.seconds:.2f} s; " + ("; ".join(report.conversions) or "no conversion needed"),
                  highlight=False)
    console.print(f"verdict: [{colour}]{report.verdict}[/]", highlight=False)
    for reason in report.reasons:
        console.print(f"  - {reason}", highlight=False)
    for advice in report.advice:
        console.print(f"  advice: {advice}", highlight=False)


def _generation_run(run, what: str):
    """Run a generation with a progress bar (ETA and live RTF), then list the outputs."""
    from s4music.guidance import DEGENERACIES

    with progress_bar(info=True) as bar:
        task = bar.add_task(what, total=None, info="")
        result = run(lambda done, total, rtf: bar.update(task, completed=done, total=total, info=f"RTF {rtf:.2f}"))
    console.print(f"seed {result.seed}; RTF {result.rtf:.2f} ({result.timings['generate_s']:.1f} s generating)",
                  highlight=False)
    for take in result.takes:
        flag = f" [red]degenerate: {DEGENERACIES[take.degenerate]}[/]" if take.degenerate else ""
        console.print(f"wrote {take.path} (seed {take.seed}, {take.bits:.2f} bits/sample){flag}", highlight=False)
    console.print(f"settings and timings: {result.sidecar}", highlight=False)


# Options that continue and generate share.
Seconds = Annotated[float, typer.Option(help="Seconds to generate.")]
Variations = Annotated[int, typer.Option("-n", "--variations", help="Variations, each with its own seed (seed, seed+1, ...).")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature (0: greedy). Default: the model's "
                                                 "recommendation, else 1.")]
TopK = Annotated[int, typer.Option(help="Keep the k likeliest codes (0: off). Default: the model's recommendation, "
                                        "else off.")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling: keep the likeliest codes up to this probability "
                                          "(1: off). Default: as top-k.")]
Seed = Annotated[int, typer.Option(help="Seed (default: random; always printed and saved).")]
Rank = Annotated[bool, typer.Option("--rank", help="Order variations by the model's own likelihood, best first.")]
Normalize = Annotated[str, typer.Option(help="Output level: loudness (-16 LUFS), peak (-1 dBFS) or none.")]
Format = Annotated[str, typer.Option(help="wav or flac (when OUT has no such suffix).")]
ModelPath = Annotated[Path, typer.Option(help="s4music checkpoint (default: the bundled model).")]
Device = Annotated[str, typer.Option(help="cpu, cuda, or auto: read the prompt on a GPU when there is one and "
                                           "generate on the fused CPU step, which outruns a GPU's step up to "
                                           "dozens of variations (cuda: generate on the GPU too).")]
Retry = Annotated[int, typer.Option(help="Resample a variation that collapses to silence, turns to noise or "
                                              "drifts to a DC offset, up to N times.")]
Plot = Annotated[bool, typer.Option("--plot", help="Also write OUT.png: waveform and spectrogram.")]
Fused = Annotated[bool, typer.Option("--fused/--no-fused", help="Use the fused C++ CPU step when available "
                                                                "(--no-fused: the plain PyTorch step).")]
HalfWeights = Annotated[bool, typer.Option("--half-weights/--full-weights", help="Fused step: hold the linear "
                                           "weights in half precision, which reads half the memory per sample "
                                           "(faster for large models; --full-weights gives the plain step's codes).")]


@command(name="continue", inference=True)
def continue_command(
    prompt: str = typer.Argument(..., help="Audio file (wav, flac, mp3, ogg, ...) or a URL (fetched with yt-dlp)."),
    out: Path = typer.Option(Path("continuation.wav"), "--out", "-o", help="Output file (.wav or .flac)."),
    seconds: Seconds = 5.0,
    prompt_seconds: float = typer.Option(8.0, help="Use the last N seconds of the prompt (of the selection)."),
    prompt_start: float = typer.Option(None, help="Prompt selection start, seconds."),
    prompt_end: float = typer.Option(None, help="Prompt selection end, seconds."),
    variations: Variations = 1,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    seed: Seed = None,
    rank: Rank = False,
    include_prompt: bool = typer.Option(True, "--prompt/--no-prompt", help="Start the output with the prompt."),
    normalize: Normalize = "loudness",
    format: Format = "wav",
    model: ModelPath = None,
    device: Device = "auto",
    force: bool = typer.Option(False, "--force", help="Continue even a prompt judged far from the model's music."),
    retry_degenerate: Retry = 0,
    plot: Plot = False,
    fused: Fused = True,
    half_weights: HalfWeights = True,
):
    """Continue a piece of music: PROMPT is read, checked, and carried on for --seconds."""
    from s4music.generate import continue_prompt

    options = _generate_options(
        seconds=seconds, prompt_seconds=prompt_seconds, prompt_start=prompt_start, prompt_end=prompt_end,
        variations=variations, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, rank=rank,
        include_prompt=include_prompt, normalize=normalize, format=format, device=device, force=force,
        retry_degenerate=retry_degenerate, plot=plot, fused=fused, half_weights=half_weights)
    _generation_run(lambda progress: continue_prompt(prompt, out, model, options, on_progress=progress,
                                                     on_guidance=_print_guidance), "continuing")


@command(inference=True)
def generate(
    out: Path = typer.Option(Path("improvisation.wav"), "--out", "-o", help="Output file (.wav or .flac)."),
    seconds: Seconds = 5.0,
    variations: Variations = 1,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    seed: Seed = None,
    rank: Rank = False,
    normalize: Normalize = "loudness",
    format: Format = "wav",
    model: ModelPath = None,
    device: Device = "auto",
    retry_degenerate: Retry = 0,
    plot: Plot = False,
    fused: Fused = True,
    half_weights: HalfWeights = True,
):
    """Improvise from nothing: sample the model from silence."""
    from s4music.generate import improvise

    options = _generate_options(
        seconds=seconds, variations=variations, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        rank=rank, normalize=normalize, format=format, device=device, retry_degenerate=retry_degenerate, plot=plot,
        fused=fused, half_weights=half_weights)
    _generation_run(lambda progress: improvise(out, model, options, on_progress=progress), "generating")


@command(inference=True)
def check(
    prompt: str = typer.Argument(..., help="Audio file or URL."),
    model: ModelPath = None,
    prompt_seconds: float = typer.Option(8.0, help="Judge the last N seconds (as continue would use them)."),
    prompt_start: float = typer.Option(None, help="Selection start, seconds."),
    prompt_end: float = typer.Option(None, help="Selection end, seconds."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
):
    """Tell whether a prompt suits the model before spending minutes on it. Exit 2 if it is far off."""
    import json

    from s4music.generate import check_prompt

    report = check_prompt(prompt, model, _generate_options(prompt_seconds=prompt_seconds, prompt_start=prompt_start,
                                                           prompt_end=prompt_end))
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_guidance(report)
    if report.far:
        raise typer.Exit(2)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


