"""`s4music doctor`: what this machine can run, and which kernel path is active."""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch

from s4music import system
from s4music.extensions import find_cuda_home
from s4music.model.fast import fused_report
from s4music.model.kernels import kernel_path


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


def run_checks() -> list[Check]:
    checks = [
        Check("python", True, platform.python_version()),
        Check("torch", True, f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})"),
    ]
    if torch.cuda.is_available():
        checks.append(Check("gpu", True, torch.cuda.get_device_name(0), required=False))
        checks.append(Check("s4 kernel (cuda)", True, kernel_path("cuda"), required=False))
    else:
        checks.append(Check("gpu", False, "none visible; running on CPU", required=False))
    checks.append(Check("s4 kernel (cpu)", True, kernel_path("cpu")))
    checks.append(Check("fused cpu step", *fused_report(), required=False))
    home = find_cuda_home()
    checks.append(Check("cuda toolkit", home is not None, str(home) if home else "nvcc not found", required=False))
    for prog in ("ffmpeg", "fluidsynth"):
        version = system.program_version(prog)
        checks.append(Check(prog, version is not None, version or "not installed (run `make install`)"))
    fonts = system.installed_soundfonts()
    if fonts:
        listed = "; ".join(f"{name} {path}" + (" (default)" if i == 0 else "") for i, (name, path) in enumerate(fonts.items()))
        checks.append(Check("soundfonts", True, listed))
    else:
        sf2 = system.find_soundfont()
        checks.append(Check("soundfonts", sf2 is not None, str(sf2) if sf2 else
                            "no General MIDI soundfont found (apt-get install " + system.SOUNDFONTS["fluidr3"][0] + ")"))
    js_ok, js_detail = system.js_runtime_report()
    checks.append(Check("js runtime (YouTube)", js_ok, js_detail, required=False))
    return checks
