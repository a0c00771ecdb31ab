"""`s4music render-midi`: MIDI collections (such as the Lakh MIDI layout) to audio with FluidSynth.

Each MIDI file is read with mido and flattened into one track of absolute times, keeping only the
chosen instruments (General MIDI programs or families; drums are channel 10) and stopping at
`max_seconds`, since some files hold a stray event half an hour after the music. FluidSynth renders
it with a General MIDI soundfont; leading and trailing silence is trimmed and the result is written
as mono WAV at the toolkit's rate. Output paths mirror the sources, so a re-run skips what is done.
A file that cannot be read is reported and never stops the batch.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mido

from s4music.audio import load_audio, write_audio
from s4music.data.progress import FileCounter, FileProgress
from s4music.errors import S4MusicError, first_line
from s4music.files import atomic_path, write_json
from s4music.system import find_soundfont

log = logging.getLogger(__name__)

DRUM_CHANNEL = 9
GM_FAMILIES = [
    "piano", "chromatic-percussion", "organ", "guitar", "bass", "strings", "ensemble", "brass",
    "reed", "pipe", "synth-lead", "synth-pad", "synth-effects", "ethnic", "percussive", "sound-effects",
]
TICKS_PER_SECOND = 960  # 480 ticks per beat at a fixed 120 bpm
MIDI_EXTENSIONS = {".mid", ".midi", ".kar"}


class RenderError(S4MusicError):
    pass


@dataclass
class RenderOptions:
    instruments: list[str] | None = None  # family names, program numbers 0-127, or "drums"; None: all
    drums: bool = True
    soundfont: Path | None = None
    sample_rate: int = 16000
    max_seconds: float | None = 600.0
    workers: int = 2
    gain: float = 0.5
    silence_db: float = -60.0  # trim threshold, relative to the rendered file's peak


@dataclass
class RenderReport:
    rendered: list[tuple[Path, Path, float]] = field(default_factory=list)  # (source, output, seconds)
    already: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # nothing of the chosen instruments
    failed: list[tuple[Path, str]] = field(default_factory=list)


def parse_instruments(specs: list[str] | None) -> tuple[set[int] | None, bool]:
    """(programs to keep or None for all, whether 'drums' was named)."""
    if not specs:
        return None, False
    programs, drums = set(), False
    for spec in specs:
        spec = spec.strip().lower()
        if spec == "drums":
            drums = True
        elif spec.isdigit() and 0 <= int(spec) <= 127:
            programs.add(int(spec))
        elif spec in GM_FAMILIES:
            start = 8 * GM_FAMILIES.index(spec)
            programs.update(range(start, start + 8))
        else:
            raise RenderError(f"unknown instrument {spec!r}; use a program 0-127, 'drums', or one of: "
                              + ", ".join(GM_FAMILIES))
    return programs, drums


def filter_midi(src: Path, programs: set[int] | None, keep_drums: bool,
                max_seconds: float | None) -> tuple[mido.MidiFile, int, float]:
    """One-track MIDI of the chosen instruments up to max_seconds; (file, notes kept, seconds read)."""
    try:
        midi = mido.MidiFile(str(src))
        messages = iter(midi)  # all tracks merged, times in seconds
        out = mido.MidiFile(type=0, ticks_per_beat=480)
        track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=500_000, time=0)])
        out.tracks.append(track)
        program = [0] * 16
        now, last_tick, kept = 0.0, 0, 0
        for msg in messages:
            now += msg.time
            if max_seconds is not None and now > max_seconds:
                now = max_seconds
                break
            if msg.is_meta:
                continue  # tempo is already folded into the seconds
            if msg.type == "program_change":
                program[msg.channel] = msg.program
            if msg.type in ("note_on", "note_off"):
                if msg.channel == DRUM_CHANNEL:
                    keep = keep_drums
                else:
                    keep = programs is None or program[msg.channel] in programs
                if not keep:
                    continue
                kept += msg.type == "note_on" and msg.velocity > 0
            tick = round(now * TICKS_PER_SECOND)
            track.append(msg.copy(time=tick - last_tick))
            last_tick = tick
    except (OSError, EOFError, ValueError, KeyError, IndexError, TypeError) as e:
        reason = first_line(e, "truncated file" if isinstance(e, EOFError) else "")
        raise RenderError(f"{src}: not a readable MIDI file ({reason})") from None
    end_tick = round(now * TICKS_PER_SECOND)
    for channel in range(16):  # all notes off, so a cut-off file ends cleanly
        track.append(mido.Message("control_change", channel=channel, control=123, value=0,
                                  time=end_tick - last_tick if channel == 0 else 0))
    return out, kept, now


def render_file(src: Path, out: Path, options: RenderOptions, soundfont: Path,
                programs: set[int] | None, keep_drums: bool) -> float | None:
    """Render one file to `out` (mono WAV); returns its seconds, or None if nothing is left to play."""
    midi, notes, _ = filter_midi(src, programs, keep_drums, options.max_seconds)
    if notes == 0:
        return None
    with tempfile.TemporaryDirectory(prefix=".render-", dir=out.parent) as tmp:
        mid_path, wav_path = Path(tmp) / "in.mid", Path(tmp) / "out.wav"
        midi.save(str(mid_path))
        cmd = ["fluidsynth", "-ni", "-q", "-g", str(options.gain), "-r", str(options.sample_rate),
               "-T", "wav", "-F", str(wav_path), str(soundfont), str(mid_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0 or not wav_path.exists():
            reason = first_line(proc.stderr, f"exit {proc.returncode}", last=True)
            raise RenderError(f"{src}: FluidSynth failed ({reason})")
        audio = load_audio(wav_path, options.sample_rate)
    samples = audio.samples
    peak = samples.abs().max()
    if peak == 0:
        return None
    loud = (samples.abs() > peak * 10 ** (options.silence_db / 20)).nonzero()
    samples = samples[loud[0, 0] : loud[-1, 0] + 1]
    write_audio(out, samples, options.sample_rate)
    return samples.numel() / options.sample_rate


def find_midi(sources: list[str | Path]) -> list[tuple[Path, Path]]:
    """(file, path relative to its source root) for each MIDI file, directories searched recursively."""
    found = []
    for source in map(Path, sources):
        if source.is_dir():
            files = sorted(p for p in source.rglob("*") if p.suffix.lower() in MIDI_EXTENSIONS and p.is_file())
            found += [(p, p.relative_to(source)) for p in files]
        else:
            found.append((source, Path(source.name)))
    return found


def render_midi(sources: list[str | Path], out_dir: str | Path, options: RenderOptions | None = None,
                on_file: FileProgress | None = None) -> RenderReport:
    """Render every MIDI file under `sources` into `out_dir`, in parallel. `on_file(src, status, done,
    total)` follows every file found: "already" rendered, then "rendered", "skipped" or "failed" as
    each finishes. Failures are collected (and written to failures.jsonl), not raised."""
    options = options or RenderOptions()
    programs, named_drums = parse_instruments(options.instruments)  # a bad name fails before anything else
    if shutil.which("fluidsynth") is None:
        raise RenderError("fluidsynth is not installed (run `make install`)")
    soundfont = Path(options.soundfont) if options.soundfont else find_soundfont()
    if soundfont is None or not soundfont.is_file():
        raise RenderError(f"{soundfont or 'soundfont'}: no General MIDI soundfont found; pass --soundfont")
    keep_drums = options.drums and (programs is None or named_drums)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = RenderReport()
    todo = []
    found = find_midi(sources)
    progress = FileCounter(on_file, len(found))

    for src, rel in found:
        out = out_dir / rel.with_suffix(".wav")
        if out.exists():
            report.already.append(src)
            progress(src, "already")
        elif not src.is_file():
            report.failed.append((src, f"{src}: no such file"))
            progress(src, "failed")
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            todo.append((src, out))

    def one(job):
        src, out = job
        try:
            seconds = render_file(src, out, options, soundfont, programs, keep_drums)
        except S4MusicError as e:
            return src, out, None, str(e)
        return src, out, seconds, None

    with ThreadPoolExecutor(max_workers=max(1, options.workers)) as pool:
        for src, out, seconds, error in pool.map(one, todo):
            if error:
                report.failed.append((src, error))
            elif seconds is None:
                report.skipped.append((src, f"{src}: the chosen instruments never play"))
            else:
                report.rendered.append((src, out, seconds))
            progress(src, "failed" if error else "skipped" if seconds is None else "rendered")
    if report.failed:
        with atomic_path(out_dir / "failures.jsonl") as tmp:
            tmp.write_text("".join(json.dumps({"source": str(s), "reason": r}) + "\n" for s, r in report.failed))
    write_json(out_dir / "render.json", {
        "soundfont": str(soundfont), "instruments": options.instruments, "drums": options.drums,
        "sample_rate": options.sample_rate, "max_seconds": options.max_seconds,
    })
    return report
