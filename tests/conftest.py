import functools
import http.server
import io
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from s4music.extensions import cache_home

DATA = Path(__file__).parent / "data"


# Fixtures of real music (FluidSynth renders, music21 scores, recordings, a trained model): a test
# that uses one is slow, and `make test-fast` leaves it out. Everything else runs on synthesized data.
REAL_MUSIC_FIXTURES = {"music_dataset", "trained_model", "midi_corpus", "recordings", "short_recording"}


def pytest_configure(config):
    # A shell starts a background job with Ctrl-C ignored, and its children inherit that: the Ctrl-C
    # tests would then test nothing. Python's own handler here is reset to the default in each child.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items):
    for item in items:
        if REAL_MUSIC_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def cli(capsys):
    """Run the `s4music` console script in this process (its exit codes and one-line errors, without
    a second of interpreter start-up per call): cli("check", "x.wav") -> (code, stdout, stderr)."""
    import sys

    from s4music.cli.app import main

    def run(*args):
        capsys.readouterr()
        argv, sys.argv = sys.argv, ["s4music", *map(str, args)]
        try:
            main()
        except SystemExit as e:
            code = e.code
        finally:
            sys.argv = argv
        out, err = capsys.readouterr()
        return code, out, err

    return run


def load_script(path: Path):
    """A script of the repository's (examples/, benchmarks/), imported as a module by its file name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def perturbed(model, scale=0.05):
    """Move every parameter off its init so tests exercise trained-like values."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def synthesized_music(seconds: float = 3.0, rate: int = 16000, channels: int = 1) -> np.ndarray:
    """Piano-like notes: decaying harmonics of a few pitches, (L, channels) float32, peak 0.5."""
    t = np.arange(int(seconds * rate)) / rate
    wave = np.zeros_like(t)
    for k, pitch in enumerate([220.0, 277.2, 329.6, 440.0, 329.6, 277.2]):
        start = k * seconds / 6
        env = np.where(t >= start, np.exp(-4 * (t - start)), 0.0)
        wave += env * sum(np.sin(2 * np.pi * pitch * h * (t - start)) / h for h in (1, 2, 3))
    wave = 0.5 * wave / np.abs(wave).max()
    return np.repeat(wave[:, None], channels, axis=1).astype(np.float32)


@pytest.fixture(scope="session")
def synth_prompt(tmp_path_factory) -> Path:
    """3 s of synthesized piano-like notes, 16 kHz mono WAV."""
    import soundfile as sf

    path = tmp_path_factory.mktemp("synth") / "notes.wav"
    sf.write(str(path), synthesized_music(), 16000)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, synth_prompt) -> Path:
    """A small untrained SaShiMi (perturbed off its init), saved with a summary as eval --record
    leaves one: its NLL on `synth_prompt` as the test figure, so that prompt is typical for it."""
    from s4music.audio import encode, load_audio
    from s4music.model import S4Config, SaShiMi, SaShiMiConfig, save_model

    torch.manual_seed(0)
    model = perturbed(SaShiMi(SaShiMiConfig(d_model=16, n_layers=1, pool=[4, 4], s4=S4Config(d_state=16))))
    codes = encode(load_audio(synth_prompt).samples, "mulaw-official").long()[None]
    with torch.no_grad():
        bits = model.bits(codes).mean().item()
    summary = {"test_bits": bits, "domain": "synthesized notes", "eval": {"level": {"lufs": -20.0, "peak_dbfs": 0.0}}}
    return save_model(model, tmp_path_factory.mktemp("tiny") / "model", summary=summary)


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """A small prepared dataset of synthesized notes: 8 files in two folders, 0.512 s windows."""
    import soundfile as sf

    from s4music.data.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("synth-data")
    for k in range(8):
        folder = root / "audio" / ("low" if k < 4 else "high")
        folder.mkdir(parents=True, exist_ok=True)
        wave = synthesized_music(seconds=2.0)[:, 0] * (0.5 + 0.1 * k)
        rate = 16000 * (1 + k % 2)  # and half of them at 32 kHz, resampled by prepare
        sf.write(str(folder / f"notes{k}.wav"), np.repeat(wave, 1 + k % 2) if k % 2 else wave, rate)
    prepare([root / "audio"], root / "dataset", PrepareOptions(seconds=0.512, val_fraction=0.25, test_fraction=0.25))
    return root / "dataset"


RECORDINGS_DIR = Path("/usr/share/scummvm/drascula/audio")


def need(condition: bool, what: str):
    """Skip when a real input is missing, except in CI, where `make test` installs it: fail there."""
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is missing; `make install` should have installed it")
        pytest.skip(f"{what} is missing (run `make install`)")


@pytest.fixture(scope="session")
def recordings() -> list[Path]:
    """Real music recordings from Debian's drascula-music: Ogg Vorbis, 44.1 kHz stereo."""
    files = sorted(RECORDINGS_DIR.glob("*.ogg")) if RECORDINGS_DIR.is_dir() else []
    need(len(files) >= 4, "drascula-music (real recordings)")
    return files


@pytest.fixture(scope="session")
def short_recording(recordings) -> Path:
    """The shortest real recording (about 9 s)."""
    import soundfile as sf

    return min(recordings, key=lambda p: sf.info(str(p)).duration)


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range support, as real media servers have."""

    def log_message(self, *args):
        pass

    def send_head(self):
        path = Path(self.translate_path(self.path))
        rng = self.headers.get("Range")
        if not path.is_file() or not rng:
            return super().send_head()
        size = path.stat().st_size
        start_s, _, end_s = rng.removeprefix("bytes=").partition("-")
        start = int(start_s or 0)
        end = min(int(end_s) if end_s else size - 1, size - 1)
        if start >= size:
            self.send_error(416)
            return None
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(str(path)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return io.BytesIO(f.read(end - start + 1)) if not f.close() else None


@pytest.fixture
def http_server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 (an ephemeral port); yields (root_dir, base_url)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(RangeHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def wav_header(rate: int, channels: int, bits: int, frames: int | None) -> bytes:
    """A PCM WAV header for `frames` frames (None: a stream's header, sizes 0xFFFFFFFF)."""
    import struct

    size = 0xFFFFFFFF if frames is None else frames * channels * bits // 8
    riff = 0xFFFFFFFF if frames is None else 36 + size
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 1, channels, rate, rate * channels * bits // 8, channels * bits // 8, bits)
        + b"data" + struct.pack("<I", size))


class StreamServer:
    """An HTTP server on 127.0.0.1 whose files are made as they are sent, so a test can serve hours
    of audio without writing it: add(path, head, length) serves `head` then `length` zero bytes
    (None: without end, and without a Content-Length); redirect(path, url) answers 302.
    `requests` lists the paths asked for, `sent[path]` the bytes written (socket buffers included)."""

    def __init__(self):
        self.routes: dict[str, tuple] = {}
        self.requests: list[str] = []
        self.sent: dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # a body without a length ends when the connection does

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                route = server.routes.get(self.path)
                if route is None:
                    return self.send_error(404)
                if route[0] == "redirect":
                    self.send_response(302)
                    self.send_header("Location", route[1])
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                _, head, length = route
                self.send_response(200)
                self.send_header("Content-Type", "audio/wav")
                if length is not None:
                    self.send_header("Content-Length", str(len(head) + length))
                self.end_headers()
                block, left = bytes(64 * 1024), (1 << 40) if length is None else length
                try:
                    self.wfile.write(head)
                    while left > 0:
                        n = min(left, len(block))
                        self.wfile.write(block[:n])
                        server.sent[self.path] = server.sent.get(self.path, 0) + n
                        left -= n
                except OSError:  # the client stopped reading
                    return

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add(self, path: str, head: bytes, length: int | None) -> str:
        self.routes[path] = ("file", head, length)
        return self.url + path

    def redirect(self, path: str, location: str) -> str:
        self.routes[path] = ("redirect", location)
        return self.url + path

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (one that was just let go)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def stream_server():
    server = StreamServer()
    yield server
    server.close()


FIXTURE_CACHE = cache_home() / "test-fixtures"


def _music21_midi(name: str, dest: Path) -> Path:
    from music21 import corpus

    score = corpus.parse(name)
    score.write("midi", fp=str(dest))
    return dest


@pytest.fixture(scope="session")
def midi_corpus() -> dict[str, Path]:
    """Real MIDI made from the music21 corpus (public-domain scores), cached between runs.

    piano: Joplin, Maple Leaf Rag (GM program 0).  strings: Mozart K. 80, i (program 48).
    chorale: Bach BWV 66.6.  mixed: piano on channel 1, the strings on channel 2 and the chorale's
    rhythm as drums on channel 10.  stray_tail: the chorale plus one note 30 minutes later.
    """
    import mido

    need(__import__("importlib").util.find_spec("music21") is not None, "music21")
    cache = FIXTURE_CACHE / "midi-v1"
    names = {"piano": "joplin/maple_leaf_rag", "strings": "mozart/k80/movement1", "chorale": "bach/bwv66.6"}
    paths = {key: cache / f"{key}.mid" for key in [*names, "mixed", "stray_tail"]}
    if not all(p.exists() for p in paths.values()):
        cache.mkdir(parents=True, exist_ok=True)
        for key, name in names.items():
            _music21_midi(name, paths[key])
        piano, strings, chorale = (mido.MidiFile(str(paths[k])) for k in names)
        mixed = mido.MidiFile(type=1, ticks_per_beat=piano.ticks_per_beat)

        def moved(src, channel, program=None, drum_note=None):
            track = mido.MidiTrack()
            if program is not None:
                track.append(mido.Message("program_change", channel=channel, program=program, time=0))
            ticks = 0
            for msg in mido.merge_tracks(src.tracks):
                ticks += msg.time
                if msg.is_meta or msg.type == "program_change":
                    continue
                if hasattr(msg, "channel"):
                    msg = msg.copy(channel=channel)
                if drum_note is not None and msg.type in ("note_on", "note_off"):
                    msg = msg.copy(note=drum_note)
                track.append(msg.copy(time=int(ticks * mixed.ticks_per_beat / src.ticks_per_beat)))
                ticks = 0
            return track

        mixed.tracks.append(mido.merge_tracks(piano.tracks))
        mixed.tracks.append(moved(strings, 1, program=48))
        mixed.tracks.append(moved(chorale, 9, drum_note=38))
        mixed.save(str(paths["mixed"]))
        tail = mido.MidiFile(str(paths["chorale"]))
        tail.tracks[-1].insert(len(tail.tracks[-1]) - 1, mido.Message(
            "note_on", note=60, velocity=80, time=int(30 * 60 * 2 * tail.ticks_per_beat)))
        tail.save(str(paths["stray_tail"]))
    return paths


@pytest.fixture(scope="session")
def music_dataset() -> Path:
    """A prepared dataset of real rendered music, cached between runs: 8 Bach chorales (piano) and
    4 Mozart string-quartet movements (first 30 s), two strata, 1.024 s windows, split 50/25/25."""
    from music21 import corpus

    from s4music.data.midi import RenderOptions, render_midi
    from s4music.data.prepare import PrepareOptions, prepare

    need(__import__("shutil").which("fluidsynth") is not None, "fluidsynth")
    root = FIXTURE_CACHE / "music-dataset-v1"
    dataset = root / "dataset"
    if (dataset / "dataset.json").exists():
        return dataset
    chorales = [p for p in corpus.getComposer("bach") if "bwv" in p.name][:8]
    quartets = [p for p in corpus.getComposer("mozart") if p.suffix in (".mxl", ".xml", ".musicxml")][:4]
    for folder, paths in (("chorale", chorales), ("mozart", quartets)):
        (root / "midi" / folder).mkdir(parents=True, exist_ok=True)
        for p in paths:
            dest = root / "midi" / folder / f"{p.stem}.mid"
            if not dest.exists():
                corpus.parse(str(p)).write("midi", fp=str(dest))
    render_midi([root / "midi"], root / "audio", RenderOptions(max_seconds=30.0, soundfont="timgm6mb"))
    prepare([root / "audio"], dataset, PrepareOptions(seconds=1.024, val_fraction=0.25, test_fraction=0.25))
    return dataset


@pytest.fixture(scope="session")
def trained_model(music_dataset, tmp_path_factory) -> Path:
    """A tiny model trained briefly on `music_dataset`, with its test NLL recorded for guidance."""
    from s4music.eval_options import EvalOptions
    from s4music.evaluate import evaluate, record_result
    from s4music.train import TrainConfig, train

    out = tmp_path_factory.mktemp("trained") / "run"
    config = TrainConfig(data=[str(music_dataset)], out=str(out), seq_len=4096, batch_size=4, steps=40, lr=1e-2,
                         eval_every=40, save_every=40, eval_windows=2,
                         model={"d_model": 16, "n_layers": 1, "pool": [4], "s4": {"d_state": 16}})
    result = train(config)
    record_result(result.model, evaluate(result.model, music_dataset, EvalOptions(context=4096, max_windows=24)))
    return result.model


@pytest.fixture
def null_sound_env(tmp_path):
    """An environment for a subprocess whose ALSA default device is a real null device (alsa-lib's
    `null` plugin: it plays into nothing and records silence), sharing this machine's builds."""
    pytest.importorskip("sounddevice", reason="sounddevice (PortAudio) is installed by `make install`")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".asoundrc").write_text("pcm.!default { type null }\n")
    return {**os.environ, "HOME": str(home), "S4MUSIC_CACHE": str(cache_home())}


class LocalHub:
    """A Hugging Face Hub on 127.0.0.1, well enough for huggingface_hub's downloads and file listings.

    hub.add("model", "krandiash/sashimi-release", "checkpoints/x.pt", data); hub.url for HF_ENDPOINT.
    hub.cut[path] = k cuts the next k downloads of a file off half way; hub.requests logs each request.
    """

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self):
        self.files: dict[tuple[str, str], dict[str, bytes]] = {}
        self.cut: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)

    def add(self, kind: str, repo: str, path: str, data: bytes) -> None:
        self.files.setdefault((kind, repo), {})[path] = data

    def handler(self):
        import hashlib
        import json as _json
        import re as _re

        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _route(self):
                hub.requests.append((self.command, self.path, self.headers.get("Range")))
                path = self.path.split("?")[0]
                m = _re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
                if m:
                    files = hub.files.get((m.group(1)[:-1], m.group(2)))
                    if files is None:
                        return self._error(404, "RepoNotFound")
                    body = _json.dumps([{"type": "file", "path": p, "size": len(d),
                                         "oid": hashlib.sha1(d).hexdigest()} for p, d in sorted(files.items())])
                    return self._send(200, body.encode(), {"Content-Type": "application/json"})
                m = _re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if not m:
                    return self._error(404, "RepoNotFound")
                files = hub.files.get(("dataset" if m.group(1) else "model", m.group(2)))
                if files is None:
                    return self._error(404, "RepoNotFound")
                data = files.get(m.group(4))
                if data is None:
                    return self._error(404, "EntryNotFound")
                etag = hashlib.sha256(data).hexdigest()
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0] or 0)
                headers = {"X-Repo-Commit": hub.COMMIT, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                           "Content-Type": "application/octet-stream"}
                if self.command == "HEAD":
                    return self._send(200, b"", {**headers, "Content-Length": str(len(data))}, head=True)
                body = data[start:]
                status = 206 if rng else 200
                if rng:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                if hub.cut.get(m.group(4), 0) > 0:
                    hub.cut[m.group(4)] -= 1
                    self.send_response(status)
                    for k, v in {**headers, "Content-Length": str(len(body))}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return None
                return self._send(status, body, headers)

            def _error(self, status, code):
                return self._send(status, _json.dumps({"error": code}).encode(),
                                  {"X-Error-Code": code, "Content-Type": "application/json"})

            def _send(self, status, body, headers, head=False):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)
                return None

            do_GET = do_HEAD = _route

        return Handler


@pytest.fixture
def local_hub(tmp_path):
    """A LocalHub served on 127.0.0.1, and the environment that points huggingface_hub (and s4music's
    caches) at it and at fresh cache directories: yields (hub, env)."""
    hub = LocalHub()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), hub.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
           "S4MUSIC_CACHE": str(tmp_path / "s4music-cache"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    env.pop("HF_HUB_OFFLINE", None)
    # the fused step's build is the machine's, not the test's: share it
    (tmp_path / "s4music-cache").mkdir()
    shared = FIXTURE_CACHE.parent / "extensions"
    shared.mkdir(parents=True, exist_ok=True)
    (tmp_path / "s4music-cache" / "extensions").symlink_to(shared)
    yield hub, env
    server.shutdown()
    server.server_close()
