"""`make bench`: run every benchmarks/bench_*.py and write benchmarks/RESULTS.md."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, GPU: {gpu}")


GPU_START, GPU_END = "<!-- gpu -->", "<!-- /gpu -->"


def recorded_gpu_section(results: Path) -> str | None:
    """The GPU section of an earlier RESULTS.md (GPU machines are lent only now and then)."""
    text = results.read_text() if results.exists() else ""
    start, end = text.find(GPU_START), text.find(GPU_END)
    return text[start : end + len(GPU_END)] + "\n" if 0 <= start < end else None


def main() -> None:
    args = sys.argv[1:]
    results = HERE / "RESULTS.md"
    parts = [f"# Benchmark results\n\nWritten by `make bench` on {time.strftime('%Y-%m-%d')}.\n\n"
             f"Machine: {machine()}\n"]
    for script in sorted(HERE.glob("bench_*.py")):
        cmd = [sys.executable, str(script.relative_to(HERE.parent)), *args]
        gpu = script.name == "bench_gpu.py"
        if gpu and not torch.cuda.is_available() and (kept := recorded_gpu_section(results)):
            print("no GPU here: keeping the GPU section recorded earlier", flush=True)
            parts.append("\n" + kept)
            continue
        print("running", " ".join(cmd), flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
        body = out.stdout if out.returncode == 0 else f"FAILED (exit {out.returncode}):\n\n```\n{out.stderr[-2000:]}\n```\n"
        section = f"\nCommand: `python {' '.join(cmd[1:])}`\n\n{body}"
        if gpu and torch.cuda.is_available():
            section = f"\n{GPU_START}\nRecorded on {time.strftime('%Y-%m-%d')}, machine: {machine()}\n{section}{GPU_END}\n"
        parts.append(section)
        print(body, flush=True)
    results.write_text("".join(parts))


if __name__ == "__main__":
    main()
