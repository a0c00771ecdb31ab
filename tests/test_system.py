"""The machine around the toolkit: the C allocator setting the CLI's inference commands use."""

import json
import subprocess
import sys

import pytest

# In a fresh process: the page faults of each of sixteen 64 MB tensors, allocated, touched and freed.
FAULTS = """
import json, resource, sys, torch
from s4music.system import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(1 << 24)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.slow  # two fresh interpreters
def test_kept_memory_is_reused_without_page_faults():
    kept = _faults("keep")
    if not kept["kept"]:
        pytest.skip("not glibc")
    default = _faults("default")
    pages = (1 << 24) * 4 // 4096
    assert all(f >= pages // 2 for f in default["faults"])  # glibc maps each one afresh
    # once the heap has grown to hold them, blocks are reused; torch's 64-byte aligned requests and
    # its small allocations between them leave gaps, so growing has taken one to seven allocations
    assert all(f < 100 for f in kept["faults"][8:]), kept["faults"]
