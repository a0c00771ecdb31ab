"""Where audio goes while it is made: a file, standard output, the sound device, a recording.

    sink = open_sink("out.flac", sample_rate=16000, frames=n)     # or "-" for standard output
    for chunk in chunks:                                           # float32 (n,) or (n, channels)
        sink.write(chunk)
    sink.close()                                                   # a file appears only now

Every sink is a `Sink`: write, close (finished: the file it wrote, if any) and abort (stopped:
nothing half-written stays).

WAV (16-bit PCM) is written by `WavWriter` to a file and to standard output alike, with the length in
its header known up front, so the two give the same bytes. FLAC, Ogg Vorbis and MP3 files go
through libsndfile; to standard output through ffmpeg. A file is written to a temporary name and
renamed into place on `close()`, so a run stopped half way leaves no partial file; `abort()`
discards it.
"""

from __future__ import annotations

import contextlib
import queue
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import soundfile as sf

from s4music.errors import S4MusicError, first_line
from s4music.files import AtomicFile

# name -> (libsndfile format, subtype); wav is written by WavWriter
FORMATS = {"wav": None, "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS"), "mp3": ("MP3", "MPEG_LAYER_III")}
STDOUT = "-"


class SinkError(S4MusicError):
    pass


class Sink(Protocol):
    """What every sink does: generate.output and jam write through this alone."""

    def write(self, samples: np.ndarray) -> None:
        """Float32 samples, (n,) or (n, channels)."""

    def close(self) -> Path | None:
        """Finish: a file is renamed into place (and returned), a stream ends, a device plays out."""

    def abort(self) -> None:
        """Stop at once: no partial file stays, and an existing file of that name is left as it was."""


def output_format(path: str | Path, format: str | None = None) -> str:
    """The format for `path`: its suffix, or `format` (which "-", standard output, needs; wav by
    default). A SinkError names what cannot be written, before any work."""
    if str(path) == STDOUT:
        name = (format or "wav").lower()
        if name not in FORMATS:
            raise SinkError(f"--format {format}: use one of {', '.join(FORMATS)}")
        return name
    if Path(path).is_dir():
        raise SinkError(f"{path}: is a folder; name a file in it (such as {Path(path) / 'out.wav'})")
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise SinkError(f"{path}: cannot write {'.' + suffix if suffix else 'a file without a suffix'}; "
                        f"use {', '.join('.' + f for f in FORMATS)} (or - for standard output)")
    if format is not None and format.lower() != suffix:
        raise SinkError(f"{path}: the name says {suffix}, but --format says {format}")
    return suffix


def pcm16(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] as little-endian 16-bit PCM (as libsndfile converts: x * 32767, rounded)."""
    return np.rint(np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()


class WavWriter:
    """16-bit PCM WAV onto a binary stream, whose header states `frames` up front (so it can go to a
    pipe). Writing more or fewer frames than promised is an error."""

    def __init__(self, stream: BinaryIO, sample_rate: int, frames: int, channels: int = 1):
        self.stream, self.frames, self.channels, self.written = stream, frames, channels, 0
        data = frames * channels * 2
        stream.write(b"RIFF" + struct.pack("<I", 36 + data) + b"WAVE")
        stream.write(b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * channels * 2,
                                           channels * 2, 16))
        stream.write(b"data" + struct.pack("<I", data))

    def write(self, samples: np.ndarray) -> None:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1, self.channels)
        if self.written + len(samples) > self.frames:
            raise SinkError(f"more than the {self.frames} frames the WAV header promised")
        self.stream.write(pcm16(samples))
        self.written += len(samples)

    def finish(self) -> None:
        if self.written != self.frames:
            raise SinkError(f"wrote {self.written} frames, not the {self.frames} the WAV header promised")
        self.stream.flush()


class FileSink:
    """An audio file in any of FORMATS, written under a temporary name and renamed on close() to
    `path`, which the caller may point elsewhere first (a ranked take's name, in the same folder)."""

    def __init__(self, path: str | Path, sample_rate: int, frames: int, channels: int = 1, format: str | None = None):
        self.path = Path(path)
        self.format = output_format(self.path, format)
        try:
            self.file = AtomicFile(self.path)
        except OSError as e:
            raise SinkError(f"{self.path}: cannot write here ({e.strerror or e})") from None
        try:
            if self.format == "wav":
                self.stream = open(self.file.tmp, "wb")
                self.writer = WavWriter(self.stream, sample_rate, frames, channels)
            else:
                kind, subtype = FORMATS[self.format]
                self.writer = sf.SoundFile(str(self.file.tmp), "w", sample_rate, channels, format=kind,
                                           subtype=subtype)
        except (OSError, sf.LibsndfileError) as e:
            self.file.abort()
            raise SinkError(f"{self.path}: cannot write ({first_line(e)})") from None

    @staticmethod
    def check(path: str | Path, format: str | None = None) -> None:
        """Fail now, with the one-line reason, if `path` could not be written (before a long run)."""
        output_format(path, format)
        try:
            AtomicFile(path).abort()
        except OSError as e:
            raise SinkError(f"{path}: cannot write here ({e.strerror or e})") from None

    def write(self, samples: np.ndarray) -> None:
        self.writer.write(np.asarray(samples, dtype=np.float32))

    def close(self) -> Path:
        """Finish the file and rename it into place, at `path`."""
        if self.format == "wav":
            self.writer.finish()
            self.stream.close()
        else:
            self.writer.close()
        try:
            return self.file.commit(self.path)
        except OSError as e:
            self.file.abort()
            raise SinkError(f"{self.path}: cannot write ({e.strerror or e})") from None

    def abort(self) -> None:
        try:
            (self.stream if self.format == "wav" else self.writer).close()
        except Exception:  # noqa: BLE001 (a half-written file is being thrown away anyway)
            pass
        self.file.abort()


class StdoutSink:
    """Audio on standard output: WAV directly, other formats through ffmpeg. A reader that closes the
    pipe makes write() raise BrokenPipeError, which the caller treats as the end of the run."""

    def __init__(self, sample_rate: int, frames: int, channels: int = 1, format: str | None = None,
                 stream: BinaryIO | None = None):
        self.format = output_format(STDOUT, format)
        out = stream or sys.stdout.buffer
        self.process = None
        if self.format != "wav":
            if shutil.which("ffmpeg") is None:
                raise SinkError(f"--format {self.format} on standard output needs ffmpeg (run `make install`)")
            codec = {"flac": ["-c:a", "flac"], "ogg": ["-c:a", "libvorbis"], "mp3": ["-c:a", "libmp3lame"]}[self.format]
            self.process = subprocess.Popen(
                ["ffmpeg", "-nostdin", "-v", "error", "-f", "wav", "-i", "pipe:0", *codec, "-f", self.format, "pipe:1"],
                stdin=subprocess.PIPE, stdout=out)
            out = self.process.stdin
        self.writer = WavWriter(out, sample_rate, frames, channels)

    def write(self, samples: np.ndarray) -> None:
        self.writer.write(samples)

    def close(self) -> None:
        self.writer.finish()
        if self.process is not None:
            self.process.stdin.close()
            if self.process.wait() != 0:
                raise SinkError(f"ffmpeg could not encode {self.format} (exit {self.process.returncode})")

    def abort(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


class DeviceSink:
    """The default sound output (sounddevice / PortAudio), fed from a queue by a thread of its own, so
    the producer never waits on the device. `underruns` counts the times the device ran dry."""

    def __init__(self, sample_rate: int, channels: int = 1, device: int | str | None = None):
        sd = _sounddevice()
        try:
            self.stream = sd.OutputStream(samplerate=sample_rate, channels=channels, dtype="float32", device=device)
            self.stream.start()
        except Exception as e:  # PortAudioError, ValueError: no such device
            raise SinkError(f"no sound output device to play on ({first_line(e)})") from None
        self.channels = channels
        self.closed = False
        self.underruns = 0
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._play, daemon=True)
        self.thread.start()

    def _play(self) -> None:
        while (block := self.queue.get()) is not None:
            try:
                self.underruns += bool(self.stream.write(block))
            except Exception as e:  # noqa: BLE001 (reported by close())
                self.error = e
                return

    def write(self, samples: np.ndarray) -> None:
        if self.error is None and len(samples):
            self.queue.put(np.ascontiguousarray(np.asarray(samples, dtype=np.float32).reshape(-1, self.channels)))

    def close(self) -> None:
        """Wait until everything written has been played."""
        self.queue.put(None)
        self.thread.join()
        self.closed = True
        self.stream.stop()
        self.stream.close()
        if self.error is not None:
            raise SinkError(f"the sound device stopped ({first_line(self.error)})")

    @staticmethod
    def check(device: int | str | None = None) -> None:
        """Fail now, with the one-line reason, if there is no output device to play on."""
        try:
            _sounddevice().query_devices(device, "output")
        except SinkError:
            raise
        except Exception as e:  # PortAudioError, ValueError: no such device
            raise SinkError(f"no sound output device to play on ({first_line(e)})") from None

    def abort(self) -> None:
        """Stop at once: drop what is queued, stop the device (which ends a write in progress), and
        close it only once the player thread has let go of it. Nothing to do once closed."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
        self.queue.put(None)
        try:
            self.stream.abort()
        finally:
            self.thread.join(timeout=2.0)
            if not self.thread.is_alive():  # a write that never returns keeps the stream; never free it under it
                self.stream.close()


def _sounddevice():
    try:
        import sounddevice as sd
    except OSError as e:
        raise SinkError(f"--play needs PortAudio (Debian: libportaudio2; run `make install`): {first_line(e)}") from None
    return sd


class RecordingSink:
    """A recording whose length is not known up front (a jam): WAV or FLAC through libsndfile under a
    temporary name, renamed into place by close(), which a stopped run calls too, so what was
    recorded up to a Ctrl-C or a dead input is kept, whole and valid."""

    def __init__(self, path: str | Path, sample_rate: int, channels: int):
        self.path = Path(path)
        kind = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16")}.get(self.path.suffix.lower().lstrip("."))
        if kind is None:
            raise SinkError(f"{self.path}: a recording is .wav or .flac")
        try:
            self.file = AtomicFile(self.path)
        except OSError as e:
            raise SinkError(f"{self.path}: cannot write here ({e.strerror or e})") from None
        try:
            self.writer = sf.SoundFile(str(self.file.tmp), "w", sample_rate, channels, format=kind[0], subtype=kind[1])
        except BaseException as e:  # a Ctrl-C while opening too: no temporary stays
            self.file.abort()
            if isinstance(e, (OSError, sf.LibsndfileError)):
                raise SinkError(f"{self.path}: cannot write here ({first_line(e)})") from None
            raise

    def write(self, frames: np.ndarray) -> None:
        self.writer.write(np.asarray(frames, dtype=np.float32))

    def close(self) -> Path:
        """Finish the recording and rename it into place."""
        try:
            self.writer.close()
            return self.file.commit()
        except (OSError, sf.LibsndfileError) as e:
            self.file.abort()
            raise SinkError(f"{self.path}: cannot write ({first_line(e)})") from None

    def abort(self) -> None:
        """Throw the recording away (nothing was recorded): an existing file stays as it was."""
        with contextlib.suppress(Exception):
            self.writer.close()
        self.file.abort()


def open_sink(path: str | Path, sample_rate: int, frames: int, channels: int = 1,
              format: str | None = None) -> FileSink | StdoutSink:
    """A FileSink, or a StdoutSink for "-"."""
    if str(path) == STDOUT:
        return StdoutSink(sample_rate, frames, channels, format)
    return FileSink(path, sample_rate, frames, channels, format)
