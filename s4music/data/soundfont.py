"""A compressed soundfont (SF3, each sample an Ogg Vorbis stream) written out once as a plain SF2.

FluidSynth decodes an SF3's samples every time it loads one, and a render is one FluidSynth process.
Measured on a 2-core Xeon, MuseScore General's piano rendered a 144 s Palestrina motet in 1.72 s
from its SF3 and 0.41 s from the SF2 written here, and a 242 s Mozart movement in 5.96 s against
3.53 s, with every sample within 1 of 32768 of the SF3's render. The SF2 holds the samples
FluidSynth itself would decode (libsndfile's 16-bit reading of each stream, `sf_readf_short`), each
followed by the 46 zero words the SF2 format asks for, with the loop points moved from the SF3's
per-sample frames to the sample chunk's. It is kept in the toolkit's cache, keyed by the SF3's path,
size and time, so a corpus decodes it once.

Layout (SoundFont 2.04): RIFF 'sfbk' holding LIST 'INFO', LIST 'sdta' (the 'smpl' chunk of 16-bit
samples) and LIST 'pdta', whose last chunk 'shdr' has a 46-byte header per sample:
name[20], start, end, loop start, loop end, rate (uint32 each), pitch, correction (int8 each),
link, type (uint16 each). In an SF3, start and end are byte offsets of a sample's stream (end
inclusive, as FluidSynth reads it), the loop points count frames from the sample's start, and type
bit 0x10 marks Vorbis.
"""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path

import numpy as np
import soundfile

from s4music.extensions import cache_home
from s4music.files import atomic_path

VORBIS = 0x10
ROM = 0x8000
SHDR = struct.Struct("<20s5I2b2H")
PAD_WORDS = 46


class SoundfontFormatError(ValueError):
    pass


def _chunks(data: bytes, start: int, end: int) -> dict[bytes, tuple[int, int]]:
    """{id: (offset of the body, size)} of the RIFF chunks in data[start:end]; a LIST is keyed by
    its type ('INFO', 'sdta', 'pdta')."""
    found, pos = {}, start
    while pos + 8 <= end:
        cid, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if cid == b"LIST":
            found[data[body : body + 4]] = (body + 4, size - 4)
        else:
            found[cid] = (body, size)
        pos = body + size + (size & 1)
    return found


def _chunk(cid: bytes, body: bytes) -> bytes:
    return cid + struct.pack("<I", len(body)) + body + (b"\0" if len(body) & 1 else b"")


def is_compressed(path: str | Path) -> bool:
    """Whether the soundfont at `path` is an SF3 (version 3 in its 'ifil' chunk)."""
    with open(path, "rb") as f:
        head = f.read(64 * 1024)  # INFO comes first and is small
    if head[:4] != b"RIFF" or head[8:12] != b"sfbk":
        return False
    info = _chunks(head, 12, len(head)).get(b"INFO")
    if info is None:
        return False
    ifil = _chunks(head, info[0], min(len(head), info[0] + info[1])).get(b"ifil")
    return ifil is not None and struct.unpack_from("<H", head, ifil[0])[0] == 3


def sf3_to_sf2(src: str | Path, dest: str | Path) -> None:
    """Write the SF3 at `src` as an SF2 at `dest` (atomically): the same presets, instruments and
    sample headers, with every Vorbis sample decoded to 16-bit words."""
    data = Path(src).read_bytes()
    if data[:4] != b"RIFF" or data[8:12] != b"sfbk":
        raise SoundfontFormatError(f"{src}: not a SoundFont file (no RIFF sfbk header)")
    top = _chunks(data, 12, min(len(data), 8 + struct.unpack_from("<I", data, 4)[0]))
    if not {b"INFO", b"sdta", b"pdta"} <= top.keys():
        raise SoundfontFormatError(f"{src}: a SoundFont needs INFO, sdta and pdta lists")
    sdta, pdta = _chunks(data, *_span(top[b"sdta"])), _chunks(data, *_span(top[b"pdta"]))
    if b"smpl" not in sdta or b"shdr" not in pdta:
        raise SoundfontFormatError(f"{src}: no sample data or sample headers")
    smpl_at, smpl_size = sdta[b"smpl"]
    shdr_at, shdr_size = pdta[b"shdr"]

    words, headers, filled = [], [], 0
    for i in range(shdr_size // SHDR.size):
        name, start, end, loop_start, loop_end, rate, pitch, correction, link, kind = SHDR.unpack_from(
            data, shdr_at + i * SHDR.size)
        last = i == shdr_size // SHDR.size - 1  # the terminal "EOS" record
        if last or kind & ROM:
            pcm = np.zeros(0, np.int16)
            loop_start = loop_end = 0
        elif kind & VORBIS:
            if not 0 <= start < end <= smpl_size:
                label = name.split(b"\0")[0].decode("latin-1")
                raise SoundfontFormatError(f"{src}: sample {label!r} lies outside the sample data")
            # FluidSynth reads bytes start..end inclusive, though MuseScore's SF3s end a stream at
            # the next one's start: the decoder stops at the stream's last page either way.
            stream = io.BytesIO(data[smpl_at + start : smpl_at + min(end + 1, smpl_size)])
            pcm = soundfile.read(stream, dtype="int16", always_2d=True)[0][:, 0]
        else:  # an uncompressed sample in an SF3: its words, loops relative to it as for Vorbis
            pcm = np.frombuffer(data, "<i2", end - start, smpl_at + 2 * start)
            loop_start, loop_end = loop_start - start, loop_end - start
        offset = filled
        words += [pcm.astype("<i2").tobytes(), bytes(2 * PAD_WORDS)]
        filled += len(pcm) + PAD_WORDS
        headers.append(SHDR.pack(name, offset, offset + len(pcm), offset + loop_start, offset + loop_end,
                                 rate, pitch, correction, link, kind & ~VORBIS))

    with atomic_path(dest) as tmp:
        Path(tmp).write_bytes(rebuilt(data, (2, 4), b"".join(words), b"".join(headers)))


def rebuilt(data: bytes, version: tuple[int, int], samples: bytes, headers: bytes) -> bytes:
    """The soundfont `data` with its 'ifil' version, sample chunk and sample headers replaced."""
    top = _chunks(data, 12, len(data))
    info, pdta = _chunks(data, *_span(top[b"INFO"])), _chunks(data, *_span(top[b"pdta"]))
    info_body = b"".join(_chunk(cid, struct.pack("<2H", *version) if cid == b"ifil" else data[at : at + size])
                         for cid, (at, size) in info.items())
    pdta_body = b"".join(_chunk(cid, headers if cid == b"shdr" else data[at : at + size])
                         for cid, (at, size) in pdta.items())
    body = (b"sfbk" + _chunk(b"LIST", b"INFO" + info_body) + _chunk(b"LIST", b"sdta" + _chunk(b"smpl", samples))
            + _chunk(b"LIST", b"pdta" + pdta_body))
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _span(chunk: tuple[int, int]) -> tuple[int, int]:
    return chunk[0], chunk[0] + chunk[1]


def playable(path: str | Path, cache: str | Path | None = None) -> Path:
    """The soundfont FluidSynth should load for `path`: an SF3's decoded SF2 from the cache
    (written on first use), else `path` itself."""
    path = Path(path)
    if not is_compressed(path):
        return path
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = Path(cache or cache_home() / "soundfonts") / f"{path.stem}-{key}.sf2"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        sf3_to_sf2(path, dest)
    return dest
