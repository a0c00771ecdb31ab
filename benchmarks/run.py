"""`make bench`: run every benchmarks/bench_*.py and write this machine's section of benchmarks/RESULTS.md.

RESULTS.md keeps one section per kind of machine seen (the CPU model and its vector and matrix
features), and the GPU section; a run replaces only its own machine's section, so figures from an
AVX2-only EPYC and an AVX-512/AMX Xeon stand side by side, each with its bounds from its own run.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
FEATURES = [("avx2", "AVX2"), ("fma", "FMA"), ("f16c", "F16C"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"),
            ("avx512_vnni", "AVX512-VNNI"), ("amx_bf16", "AMX-BF16"), ("amx_int8", "AMX-INT8")]
GPU_START, GPU_END = "<!-- gpu -->", "<!-- /gpu -->"


def cpu() -> tuple[str, list[str]]:
    """The CPU's model name and the vector and matrix features the toolkit cares about."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, [label for flag, label in FEATURES if flag in flags]


def machine() -> str:
    name, features = cpu()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{name} ({', '.join(features) or 'no AVX2'}), {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, GPU: {gpu}")


def kind() -> str:
    """The machine kind a section is kept for: the CPU model and whether it has AVX-512 and AMX."""
    name, features = cpu()
    vendor = "AMD EPYC" if "EPYC" in name else "Intel Xeon" if "Xeon" in name else name
    widest = [f for f in ("AVX-512", "AMX-BF16") if f in features] or ["AVX2" if "AVX2" in features else "no AVX2"]
    return f"{vendor}, {' + '.join(widest)}"


def sections(text: str) -> dict[str, str]:
    """The machine sections of an earlier RESULTS.md, by kind (the marker holds the kind)."""
    found = {}
    for m in re.finditer(r"<!-- machine: (.+?) -->\n.*?<!-- /machine -->\n", text, flags=re.S):
        found[m.group(1)] = m.group(0)
    return found


def recorded_gpu_section(text: str) -> str | None:
    start, end = text.find(GPU_START), text.find(GPU_END)
    return text[start : end + len(GPU_END)] + "\n" if 0 <= start < end else None


def main() -> None:
    args = sys.argv[1:]
    results = HERE / "RESULTS.md"
    earlier = results.read_text() if results.exists() else ""
    here = kind()
    body = [f"<!-- machine: {here} -->\n## {here}\n\nWritten by `make bench` on {time.strftime('%Y-%m-%d')}.\n\n"
            f"Machine: {machine()}\n"]
    gpu_section = recorded_gpu_section(earlier)
    for script in sorted(HERE.glob("bench_*.py")):
        cmd = [sys.executable, str(script.relative_to(HERE.parent)), *args]
        gpu = script.name == "bench_gpu.py"
        if gpu and not torch.cuda.is_available():
            print("no GPU here: keeping the GPU section recorded earlier", flush=True)
            continue
        print("running", " ".join(cmd), flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
        text = out.stdout if out.returncode == 0 else f"FAILED (exit {out.returncode}):\n\n```\n{out.stderr[-2000:]}\n```\n"
        section = f"\nCommand: `python {' '.join(cmd[1:])}`\n\n{text}"
        if gpu:
            gpu_section = f"{GPU_START}\nRecorded on {time.strftime('%Y-%m-%d')}, machine: {machine()}\n{section}{GPU_END}\n"
        else:
            body.append(section.replace("\n### ", "\n#### ").replace("\n## ", "\n### "))  # under the machine's ##
        print(text, flush=True)
    body.append("<!-- /machine -->\n")
    kept = sections(earlier)
    kept[here] = "".join(body)
    parts = ["# Benchmark results\n\nOne section per kind of machine `make bench` has run on; every figure beside a "
             "baseline or bound measured in the same run on the same machine.\n\n"]
    parts += [kept[k] + "\n" for k in sorted(kept)]
    if gpu_section:
        parts.append(gpu_section)
    results.write_text("".join(parts))


if __name__ == "__main__":
    main()
