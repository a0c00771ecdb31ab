"""Building the toolkit's compiled extensions: the fused CPU step and the CUDA Cauchy kernel.

    module = load_extension("s4music_fast_step_ab12", [source], cflags=["-O3", ...])

Builds go through torch.utils.cpp_extension into a cache directory (`S4MUSIC_CACHE`, default
~/.cache/s4music), keyed by torch's version and CUDA build, and are reused while the sources and
flags are unchanged. Whatever a build needs from the process (CUDA_HOME, the GPU architecture,
quieter torch logging) is set for the build only, one build at a time, and restored afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
from pathlib import Path

import torch

# Architecture to compile CUDA code for when no GPU is visible (a compile check): Hopper (H100/H200).
DEFAULT_CUDA_ARCH = "9.0"
_ONE_BUILD = threading.Lock()  # builds change the environment for their duration, so they take turns


def find_cuda_home() -> Path | None:
    """CUDA_HOME, else the toolkit behind `nvcc` (which may be a wrapper script), else /usr/local/cuda."""
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        try:
            text = real.read_text(errors="ignore") if real.stat().st_size < 65536 else ""
        except OSError:
            text = ""
        m = re.search(r"(/\S+)/bin/nvcc\b", text) if text.startswith("#!") else None
        if m:
            return Path(m.group(1))
        return real.parent.parent
    default = Path("/usr/local/cuda")
    return default if (default / "bin" / "nvcc").exists() else None


def cache_home() -> Path:
    """The toolkit's cache: S4MUSIC_CACHE, by default ~/.cache/s4music (builds, converted models, fixtures)."""
    return Path(os.environ.get("S4MUSIC_CACHE", Path.home() / ".cache" / "s4music"))


def cache_dir() -> Path:
    """Where builds are kept: one directory per torch version and CUDA build."""
    base = cache_home()
    tag = f"torch{torch.__version__.split('+')[0]}-cu{(torch.version.cuda or 'none').replace('.', '')}"
    path = base / "extensions" / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


class _Quiet(logging.Filter):
    """Drops cpp_extension's warnings below ERROR (e.g. "no CUDA runtime found" for a CPU build)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def _build_environment(cuda_home: Path | None):
    """torch.utils.cpp_extension, with CUDA_HOME (and an architecture when no GPU is visible) set for
    one build and restored afterwards."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    quiet = _Quiet()
    logger.addFilter(quiet)  # before the import: it warns about a missing CUDA runtime as it loads
    from torch.utils import cpp_extension

    names = ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST")
    saved_env = {name: os.environ.get(name) for name in names}
    saved_home = cpp_extension.CUDA_HOME
    try:
        if cuda_home is not None:
            os.environ["CUDA_HOME"] = str(cuda_home)
            cpp_extension.CUDA_HOME = str(cuda_home)  # it reads CUDA_HOME once, at its own import
            if not torch.cuda.is_available():
                os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH)
        yield cpp_extension
    finally:
        logger.removeFilter(quiet)
        cpp_extension.CUDA_HOME = saved_home
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def load_extension(name: str, sources: list[Path], cflags: list[str] | None = None,
                   ldflags: list[str] | None = None, cuda: bool = False, build_dir: Path | None = None,
                   verbose: bool = False):
    """Compile (or reuse the cached build of) an extension and import it. Raises when it cannot build.

    cuda: the sources include .cu files; the toolkit is found by `find_cuda_home`."""
    cuda_home = None
    if cuda:
        cuda_home = find_cuda_home()
        if cuda_home is None:
            raise RuntimeError("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
        if torch.version.cuda is None:
            raise RuntimeError("this torch build has no CUDA support")
        ldflags = [*(ldflags or []), f"-L{cuda_home / 'lib'}", f"-L{cuda_home / 'lib64'}"]
    build_dir = build_dir or cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    with _ONE_BUILD, _build_environment(cuda_home) as cpp_extension:
        return cpp_extension.load(
            name=name, sources=[str(s) for s in sources], extra_cflags=cflags or [],
            extra_cuda_cflags=["-O3"] if cuda else None, extra_ldflags=ldflags or [],
            build_directory=str(build_dir), verbose=verbose)
