import functools
import http.server
import io
import os
import threading
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def perturbed(model, scale=0.05):
    """Move every parameter off its init so tests exercise trained-like values."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


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
