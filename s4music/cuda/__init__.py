"""The compiled CUDA Cauchy kernel: build, cache, check, or fall back.

The extension is JIT-built with torch.utils.cpp_extension into a cache directory (rebuilt only when
its sources or flags change). On first use on a GPU it must reproduce the PyTorch path on random
inputs, values and gradients, before it is trusted; if it is unavailable or fails that check, the
toolkit warns once and uses the PyTorch path, which is always correct.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name("cauchy_kernel.cu")]
NAME = "s4music_cauchy"
# Architecture to compile for when no GPU is visible (a compile check): Hopper (H100/H200).
DEFAULT_ARCH = "9.0"

_state: dict = {"checked": False, "fn": None, "reason": "not tried yet"}


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


def cache_dir() -> Path:
    base = Path(os.environ.get("S4MUSIC_CACHE", Path.home() / ".cache" / "s4music"))
    tag = f"torch{torch.__version__.split('+')[0]}-cu{(torch.version.cuda or 'none').replace('.', '')}"
    path = base / "extensions" / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


def build(verbose: bool = False):
    """Compile (or reuse the cached build of) the extension and import it."""
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    if torch.version.cuda is None:
        raise RuntimeError("this torch build has no CUDA support")
    os.environ["CUDA_HOME"] = str(cuda_home)
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH)
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = str(cuda_home)  # it reads CUDA_HOME once, at its own import
    return cpp_extension.load(
        name=NAME,
        sources=[str(s) for s in SOURCES],
        extra_cuda_cflags=["-O3"],
        extra_ldflags=[f"-L{cuda_home / 'lib'}", f"-L{cuda_home / 'lib64'}"],
        build_directory=str(cache_dir()),
        verbose=verbose,
    )


class _CudaCauchy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, z, w):
        ctx.save_for_backward(v, z, w)
        return _state["module"].forward(v, z, w)

    @staticmethod
    def backward(ctx, grad):
        v, z, w = ctx.saved_tensors
        grad_v, grad_w = _state["module"].backward(grad.contiguous(), v, z, w)
        return grad_v, None, grad_w


def _cuda_apply(v, z, w):
    return _CudaCauchy.apply(v, z, w)


def check(fn: Callable, device: str = "cuda") -> float:
    """Largest relative error of `fn` against the PyTorch path, values and gradients."""
    from s4music.model.kernels import _ChunkedCauchy

    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(4, 8, 64, dtype=torch.cfloat, generator=gen).to(device)
    w = (-0.5 - 1j * torch.rand(8, 64, generator=gen) * 50).to(torch.cfloat).to(device)
    omega = torch.exp(-2j * torch.pi * torch.arange(257, dtype=torch.float64) / 512)
    z = (2 * (1 - omega) / (1 + omega)).to(torch.cfloat).to(device)
    grad = torch.randn(4, 8, 257, dtype=torch.cfloat, generator=gen).to(device)
    errors = []
    outs = []
    for f in (fn, _ChunkedCauchy.apply):
        vv, ww = v.clone().requires_grad_(), w.clone().requires_grad_()
        out = f(vv, z, ww)
        out.backward(grad)
        outs.append((out.detach(), vv.grad, ww.grad))
    for a, b in zip(*outs, strict=True):
        errors.append(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item())
    return max(errors)


def cuda_cauchy() -> Callable | None:
    """The checked CUDA Cauchy product, or None (after one warning) when it cannot be used."""
    if _state["checked"]:
        return _state["fn"]
    _state["checked"] = True
    if os.environ.get("S4MUSIC_NO_CUDA_EXT"):
        _state["reason"] = "disabled by S4MUSIC_NO_CUDA_EXT"
        return None
    try:
        _state["module"] = build()
        err = check(_cuda_apply)
        if err > 1e-4:
            raise RuntimeError(f"numerical check failed (relative error {err:.2e})")
        _state["fn"], _state["reason"] = _cuda_apply, f"active (check error {err:.1e})"
    except Exception as e:  # any failure means: use the PyTorch path
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        _state["reason"] = f"unavailable: {reason}"
        warnings.warn(f"s4music: CUDA Cauchy extension {_state['reason']}; using the PyTorch kernel path",
                      RuntimeWarning, stacklevel=2)
    return _state["fn"]


def kernel_path(device: str) -> str:
    """Which Cauchy implementation tensors on `device` use, for `s4music doctor`."""
    if not device.startswith("cuda"):
        return "pytorch (chunked, CPU)"
    fn = cuda_cauchy()
    return "cuda extension" if fn is not None else f"pytorch ({_state['reason']})"
