"""The output stage of `continue` and `generate` (and the studio): a Generation's takes into their
sinks, retried, ranked, drawn, with a sidecar.

    check_outputs(out, options, play)              # every output problem, before any work
    result = write_generation(generation, out, model_id, source)

Files (one per variation, `take_paths`), standard output ("-": one take) or, beside either, the
sound device: each is a `sinks.Sink`, written chunk by chunk as the stream is made, closed when the
run is done or aborted when it stops. A degenerate take is sampled again into a fresh sink
(`--retry-degenerate`, files only); `--rank` names the takes best first. Every setting, the seeds,
the level, timings and the speed (× real time) go to a JSON sidecar.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from s4music.dsp import dbfs
from s4music.errors import S4MusicError
from s4music.files import AtomicFile, atomic_path, write_json
from s4music.generate.options import GenerateOptions, GenerationError
from s4music.generate.stream import Chunk, Generation, Take
from s4music.guidance import PromptReport
from s4music.sinks import STDOUT, DeviceSink, FileSink, Sink, open_sink, output_format

RETRY_SEED_STRIDE = 1_000_003  # retry r of variation i uses seed + i + r * stride


class OutputClosed(S4MusicError):
    """The reader of standard output went away (a player was closed): the run ends, cleanly."""


@dataclass
class GenerateResult:
    takes: list[Take]  # best first with rank; each with its .path
    sidecar: Path | None
    guidance: PromptReport | None
    seed: int
    speed_x_realtime: float  # generated audio seconds (all variations and retries) per wall-clock second
    timings: dict = field(default_factory=dict)
    level: dict = field(default_factory=dict)
    underruns: int = 0  # times the sound device ran dry (--play)


def check_outputs(out: str | Path, options: GenerateOptions, play: bool) -> None:
    """Every output problem before any work: the format, the directory, the sound device with
    `play`, and what a stream can carry."""
    options.check()
    output_format(out, options.output.format)
    if play:
        DeviceSink.check()
    if options.output.sidecar is not None:
        try:
            AtomicFile(options.output.sidecar).abort()
        except OSError as e:
            raise GenerationError(f"--sidecar {options.output.sidecar}: cannot write here ({e.strerror or e})") from None
    if str(out) == STDOUT:
        if options.variations > 1:
            raise GenerationError("-o -: standard output carries one take; use -n 1, or write files")
        if given := [name for name, on in (("--rank", options.rank), ("--retry-degenerate", options.retry_degenerate))
                     if on]:
            raise GenerationError(f"-o -: {' and '.join(given)} need{'s' if len(given) == 1 else ''} files (a stream "
                                  "cannot be taken back)")
        if options.output.plot:
            raise GenerationError("-o -: --plot needs a file to draw beside")
        return
    for path in take_paths(Path(out), options.variations):
        FileSink.check(path)


def sidecar_path(out: str | Path, options: GenerateOptions) -> Path | None:
    """Where the settings and timings go: where asked, else OUT.json beside a file; a stream has none."""
    if options.output.sidecar is not None:
        return Path(options.output.sidecar)
    return None if str(out) == STDOUT else Path(out).with_suffix(".json")


def take_paths(out: Path, variations: int) -> list[Path]:
    """out itself for one take; out-1, out-2, ... (best first with --rank) for several."""
    if variations == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{k + 1}{out.suffix}") for k in range(variations)]


def write_generation(generation: Generation, out: str | Path, model_id: str, source: str | None,
                     play: bool = False, on_chunk: Callable[[Chunk], None] | None = None) -> GenerateResult:
    """Run the stream into its sinks: one file per variation (or standard output), the sound device
    with `play`, and `on_chunk` (a web page's player); then retries, ranking, pictures and the
    sidecar. Files appear only when complete; an exception from `on_chunk` stops the run and
    leaves none."""
    options = generation.options
    sr, frames = generation.sample_rate, generation.frames
    variations = len(generation.seeds)
    # the device starts a second before the seam, so the continuation is heard in its context
    play_from = max(0, generation.prompt_frames - sr)
    sinks: list[Sink] = []  # one per take (standard output carries one)
    device: DeviceSink | None = None
    try:
        device = DeviceSink(sr) if play else None  # first: a missing device leaves no temporary files
        sinks = [open_sink(out, sr, frames, format=options.output.format)
                 for _ in range(1 if str(out) == STDOUT else variations)]
        try:
            for chunk in generation:
                for i, sink in enumerate(sinks):
                    sink.write(chunk.after(generation.first_frame)[i].numpy())
                if device is not None:
                    device.write(chunk.after(play_from)[0].numpy())
                if on_chunk is not None:
                    on_chunk(chunk)
        except BrokenPipeError:
            raise OutputClosed("standard output was closed by its reader") from None
        takes = generation.takes()
        for i in range(len(sinks)):
            takes[i].retries = _retry(generation, takes, i, sinks)
        order = sorted(range(variations), key=lambda i: takes[i].bits) if options.rank else list(range(variations))
        if str(out) != STDOUT:
            for i, path in zip(order, take_paths(Path(out), variations), strict=True):
                sinks[i].path = path  # ranked names, best first
        for take, sink in zip(takes, sinks, strict=True):
            take.path = sink.close()
        if device is not None:
            device.close()
    except BaseException:
        for sink in [*sinks, device]:
            if sink is not None:
                sink.abort()
        raise
    timings = generation.timings
    timings.total_s = time.perf_counter() - generation.started
    speed = timings.samples / sr / max(timings.generate_s, 1e-9)
    ranked = [takes[i] for i in order]
    if options.output.plot:
        for take in ranked:
            plot_continuation(take.path, generation.prompt_frames - generation.first_frame, take.path.with_suffix(".png"))
    sidecar = sidecar_path(out, options)
    level = {**generation.level.to_dict(), "limiter_max_reduction_db": generation.limiter_reduction_db,
             "gain_from_input_db": _gain_from_input(generation)}
    result = GenerateResult(ranked, sidecar, generation.guidance, generation.seeds[0], speed, timings.to_dict(), level,
                            device.underruns if device else 0)
    if sidecar is not None:
        write_json(sidecar, _sidecar(generation, result, model_id, source))
    return result


def _retry(generation: Generation, takes: list[Take], i: int, sinks: list[Sink]) -> int:
    """Resample variation i while it is degenerate, up to --retry-degenerate times; the new take
    replaces the old one's file. Returns the retries made."""
    retries = 0
    while takes[i].degenerate and retries < generation.options.retry_degenerate:
        retries += 1
        seed = generation.seeds[i] + RETRY_SEED_STRIDE * retries
        again = generation.retake(seed)
        sink = FileSink(sinks[i].path, generation.sample_rate, generation.frames, format=sinks[i].format)
        try:
            for chunk in again:
                sink.write(chunk.after(generation.first_frame)[0].numpy())
        except BaseException:
            sink.abort()
            raise
        sinks[i].abort()
        sinks[i] = sink
        takes[i] = again.takes()[0]
    takes[i].retries = retries
    return retries


def _gain_from_input(generation: Generation) -> float | None:
    """The prompt's gain from the input file to the output: the encoding scales a clip from its min
    and max to full scale (audio.encode) before `gain_db` applies; None from nothing."""
    if generation.prompt is None:
        return None
    x = generation.prompt.audio.samples
    span = float(x.max() - x.min()) if x.numel() else 0.0
    return generation.level.gain_db + dbfs(2 / span) if span > 0 else None


# Options that mean nothing for a take from nothing (no prompt to select, judge, or put first).
PROMPT_ONLY = {"prompt", "strict"}


def _options_record(options: GenerateOptions, source: str | None) -> dict:
    record = options.to_dict()
    if source is None:
        record = {k: v for k, v in record.items() if k not in PROMPT_ONLY}
        record["output"] = {k: v for k, v in record["output"].items() if k != "include_prompt"}
    return record


def _software(generation: Generation) -> dict:
    """What a seed's codes depend on besides the options: the same seed can give other music with
    another build, vector instruction set or prompt read precision."""
    import torch

    from s4music import __version__

    stepper = generation.stepper
    return {"s4music": __version__, "torch": torch.__version__,
            "instruction_set": getattr(stepper.fast, "isa", None) or torch.backends.cpu.get_cpu_capability(),
            "prompt_read": getattr(stepper.reader, "precision", "float32")}


def _sidecar(generation: Generation, result: GenerateResult, model_id: str, source: str | None) -> dict:
    net, options = generation.net, generation.options
    return {
        "command": "continue" if source else "generate",
        "prompt": source,
        "model": {"path": model_id, "parameters": net.num_parameters(), "config": net.config.to_dict(),
                  "audio": vars(net.audio), "trained": {k: net.summary.get(k) for k in ("mode", "step", "test_bits")}},
        "options": _options_record(options, source),
        "sampling": vars(generation.sampling),
        "seed": result.seed,
        "step": generation.step,
        "outputs": [{"file": t.path.name if t.path else STDOUT, "seed": t.seed, "bits_per_sample": t.bits,
                     "degenerate": t.degenerate, "retries": t.retries, "dc_offset_removed": t.dc_offset}
                    for t in result.takes],
        "check": generation.guidance.to_dict() if generation.guidance else None,  # not sampling's "guidance"
        "level": result.level,
        "timings": result.timings,
        "speed_x_realtime": result.speed_x_realtime,
        "software": _software(generation),
        "samples_per_second": result.timings["samples"] / max(result.timings["generate_s"], 1e-9),
    }


def plot_continuation(audio: Path, boundary: int, png: Path) -> Path:
    """Waveform and spectrogram of a written take, with the seam (sample `boundary`) marked."""
    from matplotlib.figure import Figure  # no pyplot: no global figure manager or backend to set

    x, sample_rate = sf.read(str(audio), dtype="float32", always_2d=True)
    x = x[:, 0]
    t = np.arange(len(x)) / sample_rate
    fig = Figure(figsize=(9, 5), dpi=110)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.plot(t, x, linewidth=0.4, color="#345")
    ax1.set_ylabel("amplitude")
    with np.errstate(divide="ignore"):  # digital silence is -inf dB: drawn as the floor (a context variable)
        ax2.specgram(x, NFFT=512, Fs=sample_rate, noverlap=384, cmap="magma")
    ax2.set_ylabel("Hz")
    ax2.set_xlabel("seconds")
    seam = boundary / sample_rate
    if boundary > 0:
        for ax in (ax1, ax2):
            ax.axvline(seam, color="#0a0", linewidth=1.5)
        ax1.text(seam, ax1.get_ylim()[1], " continuation", color="#0a0", va="top")
        ax1.text(seam, ax1.get_ylim()[1], "prompt ", color="#0a0", va="top", ha="right")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    return png
