"""Building the toolkit's compiled extensions: the fused CPU step and the CUDA Cauchy kernel.

    module = load_extension("s4music_fast_step", [source], cflags=["-O3", ...], what="the fused CPU step")

Builds go through torch.utils.cpp_extension into a cache directory (`S4MUSIC_CACHE`, default
~/.cache/s4music). A build's directory is named by everything that changes it: the sources' text,
the flags, torch's version and CUDA build, the compiler's and ninja's versions and whatever the
caller adds (the CPU's flags, for -march=native). The sources are copied into it and built from there, so the build
command names no checkout: two checkouts of one commit share one build, and two different ones
never overwrite each other's. A build says that it is building, and why; a process that finds
another one building the same directory says once that it waits. Whatever a build needs from the
process (CUDA_HOME, the GPU architecture, quieter torch logging) is set for the build only, one
build at a time, and restored afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)
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
    import torch
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


@functools.cache
def version_of(program: str) -> str:
    """The first line of `program --version` ("" when it does not run)."""
    try:
        out = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (out.stdout.strip().splitlines() or [""])[0]


def build_inputs(sources: list[Path], cflags: list[str], ldflags: list[str], cuda: bool, extra: str) -> dict:
    """Everything that changes a build, by name (a build directory's key, kept in it as build.json).
    `sources`: the files compiled and the headers they include."""
    import torch  # here, not at the top: `cache_home` serves the command line, which starts without torch

    inputs = {
        "sources": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sources},
        "flags": " ".join(cflags + ldflags),
        # Where torch is, too: its headers' path is in the compile command, so a second environment
        # sharing this cache (a CI clone's) would otherwise make ninja rebuild each time it alternates.
        "torch": f"{torch.__version__} cuda {torch.version.cuda} at {Path(torch.__file__).parent}",
        "compiler": version_of(os.environ.get("CXX", "c++")),
        # ninja 1.11 and 1.13 hash a command differently, so each reads the other's build as stale:
        # a venv's ninja and the system's, taking turns on one directory, rebuilt it (40 s) every time.
        "ninja": version_of(shutil.which("ninja") or "ninja"),
        "extra": hashlib.sha256(extra.encode()).hexdigest()[:16],
    }
    if cuda:
        cuda_home = find_cuda_home()
        inputs["nvcc"] = version_of(str(cuda_home / "bin" / "nvcc")) if cuda_home else ""
    return inputs


def _why_build(build_dir: Path, name: str, inputs: dict) -> str:
    """What differs from the newest other build of `name`, in words."""
    others = sorted((p for p in build_dir.parent.glob(f"{name}-*/build.json") if p.parent != build_dir),
                    key=lambda p: p.stat().st_mtime)
    if not others:
        return "no build of it here yet"
    try:
        before = json.loads(others[-1].read_text())
    except (OSError, ValueError):
        return "no readable build of it here yet"
    changed = [key for key in inputs if before.get(key) != inputs[key]]
    return f"{', '.join(changed) or 'nothing'} changed since the build in {others[-1].parent.name}"


@contextlib.contextmanager
def _directory_lock(build_dir: Path, what: str):
    """Hold build_dir's lock file; say once when another process holds it."""
    with open(build_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process's build of %s (%s)", what, build_dir)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_extension(name: str, sources: list[Path], cflags: list[str] | None = None,
                   ldflags: list[str] | None = None, cuda: bool = False, verbose: bool = False,
                   what: str | None = None, key_extra: str = "", headers: list[Path] = ()):
    """Compile (or reuse the cached build of) an extension and import it. Raises when it cannot build.

    cuda: the sources include .cu files; the toolkit is found by `find_cuda_home`. what: the build's
    name in the log lines. key_extra: more that changes the build (see the module docstring).
    headers: files the sources include by a plain name ("vectors.h"): copied beside them, and keyed."""
    import torch

    what = what or name
    cflags, ldflags = list(cflags or []), list(ldflags or [])
    cuda_home = None
    if cuda:
        cuda_home = find_cuda_home()
        if cuda_home is None:
            raise RuntimeError("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
        if torch.version.cuda is None:
            raise RuntimeError("this torch build has no CUDA support")
        ldflags += [f"-L{cuda_home / 'lib'}", f"-L{cuda_home / 'lib64'}"]
    inputs = build_inputs([*sources, *headers], cflags, ldflags, cuda, key_extra)
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    # Resolved: a cache reached through a symlink (as tests share the machine's builds) must name the
    # same paths, or ninja sees a changed command line and rebuilds.
    build_dir = (cache_home() / "extensions").resolve() / f"{name}-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    module_name = f"{name}_{key}"
    with _directory_lock(build_dir, what):
        copies = []
        for source in [*sources, *headers]:  # built from a copy: the build command names no checkout
            copy = build_dir / "src" / source.name
            if not copy.exists() or copy.read_bytes() != source.read_bytes():
                copy.parent.mkdir(exist_ok=True)
                partial = copy.with_name(copy.name + ".part")
                partial.write_bytes(source.read_bytes())
                partial.replace(copy)
            copies.append(copy)
        copies = copies[: len(sources)]
        fresh = not (build_dir / f"{module_name}.so").exists()
        if fresh:
            log.info("building %s (%s); once, about a minute", what, _why_build(build_dir, name, inputs))
        started = time.perf_counter()
        with _ONE_BUILD, _build_environment(cuda_home) as cpp_extension:
            module = cpp_extension.load(
                name=module_name, sources=[str(s) for s in copies], extra_cflags=cflags,
                extra_cuda_cflags=["-O3"] if cuda else None, extra_ldflags=ldflags,
                build_directory=str(build_dir), verbose=verbose)
        if fresh:
            (build_dir / "build.json").write_text(json.dumps(inputs, indent=1))
            log.info("built %s in %.0f s (%s)", what, time.perf_counter() - started, build_dir)
    return module
