"""`s4music render-midi`: MIDI collections (such as the Lakh MIDI layout) to audio with FluidSynth.

Each MIDI file is read with mido and flattened into one track of absolute times, keeping only the
chosen instruments (General MIDI programs or families; drums are channel 10) and stopping at
`max_seconds`, since some files hold a stray event half an hour after the music. FluidSynth renders
it with a General MIDI soundfont (a file, or an installed one by name: musescore, fluidr3, timgm6mb;
an SF3 is loaded as the SF2 decoded from it once, `s4music.data.soundfont`); leading and trailing
silence is trimmed and the result is written as mono WAV at the toolkit's rate. Output paths mirror
the sources, so a re-run skips what is done; of files that would write one output (a.mid beside
a.midi, or a file listed twice), the first listed renders and the rest are reported. A file that
cannot be read, or that FluidSynth fails or hangs on (a time limit per file), is reported and never
stops the batch; a full disk stops it.

A `shard` ("i/n", see `s4music.options.Shard`) renders only the files at sorted positions i-1,
i-1+n, ...: n processes (a cluster's array job) share one collection and one output directory with
no merge, since each writes files of its own. A shard lists its failures in
failures.shard-i-of-n.jsonl instead of failures.jsonl, so shards never overwrite each other's.

With `vary`, each file is played as a player might, by a seeded `Variation` drawn from the seed and
the file's path under its source: tempo, a velocity curve, humanized onsets, a transposition the
piano's range allows, one of several piano programs (with `program="piano"`), reverb and chorus.
The same seed gives the same bytes, and each output's sidecar (`name.json`) records the choices.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mido

from s4music.audio import load_audio, write_audio
from s4music.data.options import RenderOptions
from s4music.data.progress import FileCounter, FileProgress
from s4music.data.soundfont import SoundfontFormatError, playable
from s4music.errors import S4MusicError, first_line
from s4music.files import atomic_path, remove_stale_temporaries_of, scratch_directory, visible_files, write_json
from s4music.options import Shard, parse_shard
from s4music.system import SoundfontError, find_soundfont

log = logging.getLogger(__name__)

DRUM_CHANNEL = 9
GM_FAMILIES = [
    "piano", "chromatic-percussion", "organ", "guitar", "bass", "strings", "ensemble", "brass",
    "reed", "pipe", "synth-lead", "synth-pad", "synth-effects", "ethnic", "percussive", "sound-effects",
]
TICKS_PER_SECOND = 960  # 480 ticks per beat at a fixed 120 bpm
PIANO_PROGRAMS = (0, 1, 2)  # acoustic grand, bright acoustic, electric grand
PIANO_RANGE = (21, 108)  # A0 to C8: a transposition must keep every note on the keyboard
MIDI_EXTENSIONS = {".mid", ".midi", ".kar"}


class RenderError(S4MusicError):
    pass


@dataclass
class Variation:
    """How one file is played: drawn from a seed, applied while the MIDI is flattened, and recorded
    in the output's sidecar."""

    seed: int
    tempo: float = 1.0  # playback speed (1.05: 5% faster)
    transpose: int = 0  # semitones
    velocity_gamma: float = 1.0  # velocity curve v -> 127 (v / 127) ** gamma
    velocity_scale: float = 1.0
    timing_ms: float = 0.0  # standard deviation of each onset's shift (its note-off follows it)
    program: int | None = None  # every melodic part on this program (None: the file's own)
    reverb: dict = field(default_factory=dict)  # FluidSynth synth.reverb.* settings
    chorus: dict = field(default_factory=dict)  # FluidSynth synth.chorus.* settings

    def settings(self) -> list[str]:
        """FluidSynth `-o` settings for the reverb and chorus."""
        out = []
        for group, values in (("reverb", self.reverb), ("chorus", self.chorus)):
            out += [f"synth.{group}.active={1 if values else 0}"]
            out += [f"synth.{group}.{k}={v}" for k, v in values.items()]
        return out


def file_seed(seed: int, rel: Path | str) -> int:
    """A seed for one file from the run's seed and its path under its source (order-free)."""
    digest = hashlib.sha256(f"{seed}:{Path(rel).as_posix()}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def draw_variation(seed: int, pitches: tuple[int, int] | None, program: str | int | None) -> Variation:
    """A player's take: tempo within 8%, a velocity curve, onsets humanized by 5-20 ms, a
    transposition within 3 semitones that keeps `pitches` (lowest, highest) on the piano, one of
    PIANO_PROGRAMS for "piano", and a room's reverb and a light chorus."""
    rng = random.Random(seed)
    tempo = round(rng.uniform(0.92, 1.08), 4)
    gamma = round(rng.uniform(0.7, 1.4), 3)
    scale = round(rng.uniform(0.8, 1.1), 3)
    timing = round(rng.uniform(5.0, 20.0), 2)
    shifts = [t for t in range(-3, 4) if pitches is None
              or (pitches[0] + t >= PIANO_RANGE[0] and pitches[1] + t <= PIANO_RANGE[1])]
    transpose = rng.choice(shifts) if shifts else 0
    chosen = rng.choice(PIANO_PROGRAMS) if program == "piano" else program
    reverb = {"room-size": round(rng.uniform(0.1, 0.8), 3), "damp": round(rng.uniform(0.1, 0.6), 3),
              "width": round(rng.uniform(0.5, 1.0), 3), "level": round(rng.uniform(0.1, 0.6), 3)}
    chorus = ({"nr": rng.choice((2, 3, 4)), "level": round(rng.uniform(0.3, 1.2), 3),
               "speed": round(rng.uniform(0.2, 0.6), 3), "depth": round(rng.uniform(2.0, 8.0), 3)}
              if rng.random() < 0.5 else {})
    return Variation(seed=seed, tempo=tempo, transpose=transpose, velocity_gamma=gamma, velocity_scale=scale,
                     timing_ms=timing, program=None if chosen is None else int(chosen), reverb=reverb, chorus=chorus)


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


def _read_events(src: Path, programs: set[int] | None, keep_drums: bool,
                 max_seconds: float | None) -> tuple[list[tuple[float, mido.Message]], int, float]:
    """The chosen instruments' messages at absolute seconds, up to max_seconds; (events, notes, seconds)."""
    try:
        midi = mido.MidiFile(str(src))
        events = []
        program = [0] * 16
        now, kept = 0.0, 0
        for msg in midi:  # all tracks merged, times in seconds
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
            events.append((now, msg))
    except (OSError, EOFError, ValueError, KeyError, IndexError, TypeError) as e:
        reason = first_line(e, "truncated file" if isinstance(e, EOFError) else "")
        raise RenderError(f"{src}: not a readable MIDI file ({reason})") from None
    return events, kept, now


def _pitch_range(events: list[tuple[float, mido.Message]]) -> tuple[int, int] | None:
    notes = [m.note for _, m in events if m.type == "note_on" and m.channel != DRUM_CHANNEL]
    return (min(notes), max(notes)) if notes else None


def _vary(events: list[tuple[float, mido.Message]], end: float, v: Variation) -> tuple[list, float]:
    """The events as `v` plays them: rescaled in time, transposed, velocities curved, onsets jittered."""
    rng = random.Random(v.seed ^ 0x5EED)
    shift: dict[tuple[int, int], float] = {}  # a sounding note's onset shift, which its note-off shares
    out = []
    for t, msg in events:
        t = t / v.tempo
        melodic = msg.channel != DRUM_CHANNEL if hasattr(msg, "channel") else False
        if msg.type in ("note_on", "note_off"):
            note = min(127, max(0, msg.note + v.transpose)) if melodic else msg.note
            key = (msg.channel, note)
            if msg.type == "note_on" and msg.velocity > 0:
                shift[key] = rng.gauss(0.0, v.timing_ms / 1000)
                velocity = round(127 * v.velocity_scale * (msg.velocity / 127) ** v.velocity_gamma)
                msg = msg.copy(note=note, velocity=min(127, max(1, velocity)))
            else:
                msg = msg.copy(note=note)
            t = max(0.0, t + shift.get(key, 0.0))
        elif msg.type == "program_change" and melodic and v.program is not None:
            msg = msg.copy(program=v.program)
        out.append((t, msg))
    if v.program is not None:  # parts that never change program play it too
        out = [(0.0, mido.Message("program_change", channel=c, program=v.program))
               for c in range(16) if c != DRUM_CHANNEL] + out
    out.sort(key=lambda e: e[0])  # stable: simultaneous events keep their order
    return out, end / v.tempo + 0.1


def _to_midi(events: list[tuple[float, mido.Message]], end: float) -> mido.MidiFile:
    """One-track MIDI of events at absolute seconds, all notes off at `end`."""
    out = mido.MidiFile(type=0, ticks_per_beat=480)
    track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=500_000, time=0)])
    out.tracks.append(track)
    last_tick = 0
    for t, msg in events:
        tick = round(t * TICKS_PER_SECOND)
        track.append(msg.copy(time=tick - last_tick))
        last_tick = tick
    end_tick = max(last_tick, round(end * TICKS_PER_SECOND))
    for channel in range(16):  # all notes off, so a cut-off file ends cleanly
        track.append(mido.Message("control_change", channel=channel, control=123, value=0,
                                  time=end_tick - last_tick if channel == 0 else 0))
    return out


def filter_midi(src: Path, programs: set[int] | None, keep_drums: bool, max_seconds: float | None,
                variation: Variation | None = None) -> tuple[mido.MidiFile, int, float]:
    """One-track MIDI of the chosen instruments up to max_seconds, played as `variation` says;
    (file, notes kept, seconds read)."""
    events, kept, now = _read_events(src, programs, keep_drums, max_seconds)
    end = now
    if variation is not None:
        events, end = _vary(events, now, variation)
    return _to_midi(events, end), kept, now


def render_file(src: Path, out: Path, options: RenderOptions, soundfonts: list[tuple[Path, Path]], programs: set[int] | None,
                keep_drums: bool, rel: Path | None = None) -> float | None:
    """Render one file to `out` (mono WAV, with a JSON sidecar when varied); returns its seconds, or
    None if nothing is left to play. `rel`, its path under its source, seeds its variation, which
    also picks one of `soundfonts` (the first, without variation): pairs of the soundfont asked for
    and the file FluidSynth loads for it (`s4music.data.soundfont.playable`)."""
    events, notes, end = _read_events(src, programs, keep_drums, options.max_seconds)
    if notes == 0:
        return None
    variation = None
    if options.vary:
        variation = draw_variation(file_seed(options.seed, rel or src.name), _pitch_range(events), options.program)
    elif options.program is not None:
        variation = Variation(seed=0, program=PIANO_PROGRAMS[0] if options.program == "piano" else int(options.program))
    soundfont, loaded = soundfonts[0]
    if variation is not None:
        events, end = _vary(events, end, variation)
        if options.vary:
            soundfont, loaded = soundfonts[variation.seed % len(soundfonts)]
    midi = _to_midi(events, end)
    for path in (out, out.with_suffix(".json")):  # what a killed render of this file left
        remove_stale_temporaries_of(path)
    with scratch_directory(out) as tmp:
        mid_path, wav_path = tmp / "in.mid", tmp / "out.wav"
        midi.save(str(mid_path))
        settings = [arg for item in (variation.settings() if options.vary else []) for arg in ("-o", item)]
        # Dynamic sample loading reads only the samples the file plays, and an SF3 is loaded as the
        # SF2 decoded from it once (s4music.data.soundfont): the same sound, 1.7-4x faster.
        cmd = ["fluidsynth", "-ni", "-q", "-g", str(options.gain), "-r", str(options.sample_rate),
               "-o", "synth.dynamic-sample-loading=1", *settings,
               "-T", "wav", "-F", str(wav_path), str(loaded), str(mid_path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=options.timeout)
        except subprocess.TimeoutExpired:
            raise RenderError(f"{src}: FluidSynth took longer than {options.timeout:g} s; stopped") from None
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
    if variation is not None:
        write_json(out.with_suffix(".json"), {"source": str(src), "soundfont": soundfont.name,
                                              "variation": asdict(variation)})
    write_audio(out, samples, options.sample_rate)
    return samples.numel() / options.sample_rate


def find_midi(sources: list[str | Path]) -> list[tuple[Path, Path]]:
    """(file, path relative to its source root) for each MIDI file, directories searched recursively
    (hidden files and folders skipped)."""
    found = []
    for source in map(Path, sources):
        if source.is_dir():
            found += [(p, p.relative_to(source)) for p in visible_files(source, MIDI_EXTENSIONS)]
        else:
            found.append((source, Path(source.name)))
    return found


def failures_name(shard: Shard | None) -> str:
    """The file a run's failures are listed in: failures.jsonl, or failures.shard-i-of-n.jsonl."""
    return "failures.jsonl" if shard is None else f"failures.{shard.label}.jsonl"


def render_midi(sources: list[str | Path], out_dir: str | Path, options: RenderOptions | None = None,
                on_file: FileProgress | None = None) -> RenderReport:
    """Render every MIDI file under `sources` into `out_dir`, in parallel. `on_file(src, status, done,
    total)` follows every file found: "already" rendered, then "rendered", "skipped" or "failed" as
    each finishes. Failures are collected (and written to failures.jsonl, or with a shard to
    failures.shard-i-of-n.jsonl), not raised. With `options.shard`, only that shard's files are
    found, rendered and counted."""
    options = options or RenderOptions()
    programs, named_drums = parse_instruments(options.instruments)  # a bad name fails before anything else
    shard = parse_shard(options.shard) if options.shard is not None else None
    if shutil.which("fluidsynth") is None:
        raise RenderError("fluidsynth is not installed (run `make install`)")
    if options.program not in (None, "piano") and not (str(options.program).isdigit() and 0 <= int(options.program) <= 127):
        raise RenderError(f"program {options.program!r}: use a General MIDI program 0-127 or 'piano'")
    try:
        names = [n.strip() for n in str(options.soundfont).split(",")] if options.soundfont else [None]
        soundfonts = [find_soundfont(n) for n in names]
    except SoundfontError as e:
        raise RenderError(str(e)) from None
    if None in soundfonts:
        raise RenderError("no General MIDI soundfont found; pass --soundfont or install one "
                          "(apt-get install fluid-soundfont-gm)")
    loaded = []
    for soundfont in soundfonts:  # an SF3 is decoded here, once, not by every worker at once
        try:
            loaded.append(playable(soundfont))
        except (OSError, SoundfontFormatError) as e:
            raise RenderError(f"{soundfont}: cannot read it as a soundfont ({first_line(e)})") from None
        if loaded[-1] != soundfont:
            log.info("%s: FluidSynth loads its samples decoded once, from %s", soundfont, loaded[-1])
    pairs = list(zip(soundfonts, loaded, strict=True))
    keep_drums = options.drums and (programs is None or named_drums)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = RenderReport()
    todo = []
    found = list(enumerate(find_midi(sources)))
    claimed: dict[Path, tuple[int, Path]] = {}  # output -> the first file listed that renders to it (a.mid, a.midi)
    for position, (src, rel) in found:
        claimed.setdefault(out_dir / rel.with_suffix(".wav"), (position, src))
    if shard is not None:
        found = [(position, item) for position, item in found if shard.owns(position)]
    progress = FileCounter(on_file, len(found))

    for position, (src, rel) in found:
        out = out_dir / rel.with_suffix(".wav")
        first, first_src = claimed[out]
        if first != position:
            report.failed.append((src, f"{src}: renders to {out}, as {first_src} does"))
            progress(src, "failed")
        elif out.exists():
            report.already.append(src)
            progress(src, "already")
        elif not src.is_file():
            report.failed.append((src, f"{src}: no such file"))
            progress(src, "failed")
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            todo.append((src, out, rel))

    def one(job):
        src, out, rel = job
        try:
            seconds = render_file(src, out, options, pairs, programs, keep_drums, rel)
        except S4MusicError as e:
            return src, out, None, str(e)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # every file after it would fail too: stop
                raise RenderError(f"{out.parent}: no space left for the renders ({first_line(e)})") from None
            return src, out, None, f"{src}: {first_line(e)}"
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
        with atomic_path(out_dir / failures_name(shard)) as tmp:
            tmp.write_text("".join(json.dumps({"source": str(s), "reason": r}) + "\n" for s, r in report.failed))
    write_json(out_dir / "render.json", {
        "soundfont": [str(f) for f in soundfonts], "instruments": options.instruments, "drums": options.drums,
        "sample_rate": options.sample_rate, "max_seconds": options.max_seconds,
        "program": options.program, "vary": options.vary, "seed": options.seed,
    })
    return report
