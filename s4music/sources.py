"""Live audio in: a WAV stream (standard output of ffmpeg, a pipe), a file at its own pace, or the
sound device. Each yields blocks of mono float32 samples at the model's rate, converted as prompts
are (mixed to mono, resampled), a block at a time.

    for block in wav_stream(sys.stdin.buffer, 16000): ...     # (n,) float32
    for block in file_at_pace("song.ogg", 16000): ...
    for block in device_input(16000): ...
"""

from __future__ import annotations

import queue
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from s4music.audio import load_audio
from s4music.dsp import Resampler
from s4music.errors import S4MusicError, first_line

BLOCK_SECONDS = 0.02  # what a source hands over at a time


class SourceError(S4MusicError):
    pass


def _read(stream: BinaryIO, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = stream.read(n - len(data))
        if not part:
            break
        data += part
    return data


MIN_RATE, MAX_RATE, MAX_CHANNELS = 1000, 384000, 32  # what a live WAV stream's header may say


def _wav_format(stream: BinaryIO, name: str) -> tuple[int, int, np.dtype, float]:
    """Parse a RIFF/WAVE header up to its data chunk: (rate, channels, sample dtype, full scale)."""
    head = _read(stream, 12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise SourceError(f"{name}: not a WAV stream (it starts with {head[:12]!r})")
    fmt = None
    while True:
        chunk = _read(stream, 8)
        if len(chunk) < 8:
            raise SourceError(f"{name}: the WAV stream ended before its audio began")
        kind, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if kind == b"data":
            break
        body = _read(stream, size + (size & 1))
        if kind == b"fmt ":
            fmt = body
    if fmt is None or len(fmt) < 16:
        raise SourceError(f"{name}: the WAV stream has no format chunk")
    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the subformat's tag
        tag = struct.unpack("<H", fmt[24:26])[0]
    kinds = {(1, 16): (np.dtype("<i2"), 32768.0), (1, 32): (np.dtype("<i4"), 2.0**31), (1, 8): (np.dtype("u1"), 128.0),
             (3, 32): (np.dtype("<f4"), 1.0), (3, 64): (np.dtype("<f8"), 1.0)}
    if not MIN_RATE <= rate <= MAX_RATE:
        raise SourceError(f"{name}: the WAV header's sample rate is {rate} Hz; a stream's must be {MIN_RATE}-{MAX_RATE} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise SourceError(f"{name}: the WAV header gives {channels} channels; a stream may have 1-{MAX_CHANNELS}")
    if (tag, bits) not in kinds:
        raise SourceError(f"{name}: WAV format {tag} with {bits}-bit samples is not supported "
                          "(use 8/16/32-bit PCM or 32/64-bit float)")
    dtype, scale = kinds[(tag, bits)]
    return rate, channels, dtype, scale


def wav_stream(stream: BinaryIO, sample_rate: int, name: str = "standard input") -> Iterator[np.ndarray]:
    """A WAV stream at any rate and channel count, as mono blocks at `sample_rate`, until it ends.
    A stream cut off mid-frame ends at its last whole frame."""
    rate, channels, dtype, scale = _wav_format(stream, name)
    frame = dtype.itemsize * channels
    per_block = max(1, int(rate * BLOCK_SECONDS))
    resample = Resampler(rate, sample_rate)
    while True:
        data = _read(stream, per_block * frame)
        whole = len(data) // frame * frame
        if whole:
            x = np.frombuffer(data[:whole], dtype=dtype).reshape(-1, channels).astype(np.float64)
            if dtype == np.dtype("u1"):
                x -= 128.0
            yield resample(x.mean(axis=1) / scale)
        if len(data) < per_block * frame:  # the end, or a cut: what was whole has been given
            tail = resample.flush()
            if len(tail):
                yield tail
            return


def file_at_pace(path: str | Path, sample_rate: int, realtime: bool = True) -> Iterator[np.ndarray]:
    """A file (any format `load_audio` reads) in blocks, each when its time comes with `realtime`."""
    samples = load_audio(path, sample_rate).samples.numpy()
    n = int(sample_rate * BLOCK_SECONDS)
    started = time.perf_counter()
    for i in range(0, len(samples), n):
        if realtime:
            time.sleep(max(0.0, started + i / sample_rate - time.perf_counter()))
        yield samples[i : i + n]


def device_input(sample_rate: int, device: int | str | None = None) -> Iterator[np.ndarray]:
    """The default sound input (sounddevice / PortAudio), at its own rate, as mono blocks at
    `sample_rate`. A missing device or PortAudio is a one-line SourceError."""
    try:
        import sounddevice as sd
    except OSError as e:
        raise SourceError(f"live input needs PortAudio (Debian: libportaudio2; run `make install`): {first_line(e)}") from None
    blocks: queue.Queue = queue.Queue()

    def callback(indata, frames, timing, status):
        blocks.put(indata.copy())

    stream = None
    try:
        rate = int(sd.query_devices(device, "input")["default_samplerate"])
        stream = sd.InputStream(samplerate=rate, channels=1, dtype="float32", device=device,
                                blocksize=int(rate * BLOCK_SECONDS), callback=callback)
        stream.start()
    except Exception as e:  # PortAudioError, ValueError: no such device
        if stream is not None:
            stream.close()
        raise SourceError(f"no sound input device to listen to ({first_line(e)})") from None
    resample = Resampler(rate, sample_rate)
    try:
        while True:
            yield resample(blocks.get()[:, 0])
    finally:
        stream.stop()
        stream.close()
