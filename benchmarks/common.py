"""What every benchmarks/bench_*.py shares: each configuration runs in a fresh subprocess of the
script itself (`--child SPEC`), so that its peak memory is its own."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable


def run_child(script: str, kind: str, env: dict | None = None, **kw) -> dict:
    """Run `kind` with keyword arguments `kw` in a fresh `script --child`; its JSON result, or {"error": ...}."""
    cmd = [sys.executable, script, "--child", json.dumps({"kind": kind, **kw})]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args(functions: dict[str, Callable[..., dict]], sections: list[str] | None = None) -> argparse.Namespace | None:
    """The command line of a benchmark script. In a child, run the function it names, print its
    result as JSON and return None; otherwise return the parsed arguments (`--quick`, and `--only`
    where the script has `sections`)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="short lengths, for a smoke run")
    if sections:
        parser.add_argument("--only", choices=sections, help="run this section alone")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(functions[spec.pop("kind")](**spec)))
        return None
    return args
