"""The CUDA Cauchy kernel's sources and its build.

`build()` compiles `cauchy_kernel.cu` (forward and backward of the Cauchy product) and `cauchy.cpp`
(its tensors and bindings) through `s4music.extensions` and imports it. Whether the build is used
is decided by the kernel layer (`s4music.model.kernels.cuda_cauchy`), which checks it against the
PyTorch path first.
"""

from __future__ import annotations

from pathlib import Path

from s4music.extensions import load_extension

HERE = Path(__file__).parent
SOURCES = [HERE / "cauchy.cpp", HERE / "cauchy_kernel.cu"]  # tensors and bindings (g++); kernels (nvcc)
HEADERS = [HERE / "cauchy.h"]
NAME = "s4music_cauchy"


def build(verbose: bool = False):
    """Compile (or reuse the cached build of) the extension and import it; raises when it cannot."""
    return load_extension(NAME, SOURCES, cuda=True, verbose=verbose, headers=HEADERS)
