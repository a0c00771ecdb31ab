"""`continue` and `generate`: what comes next after a prompt, or music from nothing.

    result = continue_prompt("prompt.ogg", "out.wav", options=GenerateOptions(seconds=10, seed=1))
    result = improvise("out.wav", options=GenerateOptions(seconds=5, variations=4, rank=True))
    generation = stream_continuation("prompt.ogg", options=GenerateOptions(seconds=30))
    for chunk in generation: ...                   # hear it as it is made: see generate.stream

The options (options.py) are imported with the package; everything else, which needs torch, on
first use, so the command line starts at once. The stages: prompt.py, sampler.py, stream.py,
output.py, and run.py, which runs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from s4music.generate.options import (GenerateOptions, GenerationError, Output, PromptRefused, PromptSelection,
                                      Sampling, StepOptions)

if TYPE_CHECKING:
    from s4music.generate.prompt import load_prompt
    from s4music.generate.output import GenerateResult, OutputClosed, plot_continuation, write_generation
    from s4music.generate.run import (check_prompt, continue_prompt, improvise, open_model, stream_continuation,
                                      stream_improvisation)
    from s4music.generate.stream import Chunk, Generation, Take
    from s4music.guidance import DEGENERACIES

_HOMES = {
    "s4music.generate.prompt": ("load_prompt",),
    "s4music.generate.output": ("GenerateResult", "OutputClosed", "plot_continuation", "write_generation"),
    "s4music.generate.run": ("check_prompt", "continue_prompt", "improvise", "open_model", "stream_continuation",
                             "stream_improvisation"),
    "s4music.generate.stream": ("Chunk", "Generation", "Take"),
    "s4music.guidance": ("DEGENERACIES",),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
__all__ = [
    "DEGENERACIES", "Chunk", "GenerateOptions", "GenerateResult", "Generation", "GenerationError", "Output",
    "OutputClosed", "PromptRefused", "PromptSelection", "Sampling", "StepOptions", "Take", "check_prompt",
    "continue_prompt", "improvise", "load_prompt", "open_model", "plot_continuation", "stream_continuation",
    "stream_improvisation", "write_generation",
]


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 's4music.generate' has no attribute {name!r}")
