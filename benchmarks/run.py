"""`make bench`: run every benchmarks/bench_*.py and write this machine's section of benchmarks/RESULTS.md.

RESULTS.md keeps one section per kind of machine seen (the CPU model and its vector and matrix
features), and the GPU section; a run replaces only its own machine's section, so figures from an
AVX2-only EPYC and an AVX-512/AMX Xeon stand side by side, each with its bounds from its own run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import cpu, kind

HERE = Path(__file__).parent
GPU_START, GPU_END = "<!-- gpu -->", "<!-- /gpu -->"
# The GPU leases' training records (examples/gpu_lease.py), written by hand after each lease and kept as they are.
LEASES_START, LEASES_END = "<!-- leases -->", "<!-- /leases -->"


def machine() -> str:
    name, features = cpu()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{name} ({', '.join(features) or 'no AVX2'}), {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, GPU: {gpu}")


def sections(text: str) -> dict[str, str]:
    """The machine sections of an earlier RESULTS.md, by kind (the marker holds the kind)."""
    found = {}
    for m in re.finditer(r"<!-- machine: (.+?) -->\n.*?<!-- /machine -->\n", text, flags=re.S):
        found[m.group(1)] = m.group(0)
    return found


def recorded_gpu_section(text: str, start_mark: str = GPU_START, end_mark: str = GPU_END) -> str | None:
    start, end = text.find(start_mark), text.find(end_mark)
    return text[start : end + len(end_mark)] + "\n" if 0 <= start < end else None


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
    leases = recorded_gpu_section(earlier, LEASES_START, LEASES_END)
    if leases:
        parts.append("\n" + leases)
    results.write_text("".join(parts))


if __name__ == "__main__":
    main()
