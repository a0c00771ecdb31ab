"""Running a generation: open the model once, read the prompt, and hand the stream to the output stage.

The stages it runs, each in its own module:
    prompt.py    read the prompt (decode, mono, resample, quantize as training data) and judge it
    sampler.py   the state after it, and the step that samples from it: fused CPU, CUDA graphs, plain
    stream.py    post-processing (causal) and the stream of chunks every sink consumes
    output.py    the takes into their sinks (files, standard output, the device), retried, ranked,
                 drawn, with a sidecar
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

from s4music.generate.options import GenerateOptions, PromptRefused, PromptSelection, new_seed
from s4music.generate.output import GenerateResult, check_outputs, write_generation
from s4music.generate.prompt import ReadPrompt, read_prompt
from s4music.generate.sampler import Stepper, resolve_device
from s4music.generate.stream import Generation, ProgressFn
from s4music.guidance import PromptReport
from s4music.model.registry import load_model, named, resolve_model
from s4music.model.sashimi import SaShiMi

log = logging.getLogger(__name__)


def open_model(spec: str | Path | None, device: str = "auto") -> tuple[SaShiMi, str]:
    """The model a name or path stands for (None: the bundled one) on the device that reads the
    prompt, and the checkpoint's path, for the sidecar."""
    path = resolve_model(spec)
    return named(load_model(path, device=resolve_device(device)), spec), str(path)


def _opened(model: str | Path | SaShiMi | None, device: str) -> tuple[SaShiMi, str]:
    """A loaded model as it is (named as it was loaded), or the one a name or path stands for."""
    if isinstance(model, SaShiMi):
        return model, model.name or "a model in memory"
    return open_model(model, device)


def _seeds(options: GenerateOptions) -> list[int]:
    """seed, seed + 1, ... for the variations; a fresh random seed when none is given."""
    seed = options.seed if options.seed is not None else new_seed()
    return [seed + i for i in range(options.variations)]


def stream_continuation(prompt: str | Path, model: str | Path | SaShiMi | None = None,
                        options: GenerateOptions | None = None, on_progress: ProgressFn | None = None) -> Generation:
    """Read and judge `prompt` (a file in any common format, or a URL); the returned Generation
    streams the continuation (see generate.stream). Raises PromptRefused for a far prompt with
    `strict`; otherwise its `guidance` says how well the model knows it."""
    options = options or GenerateOptions()
    options.check()
    started = time.perf_counter()
    return _continuation(prompt, _opened(model, options.step.device)[0], options, on_progress, started)


def stream_improvisation(model: str | Path | SaShiMi | None = None, options: GenerateOptions | None = None,
                         on_progress: ProgressFn | None = None) -> Generation:
    """Music from nothing: a Generation stepped from the model's rest state."""
    options = options or GenerateOptions()
    options.check()
    started = time.perf_counter()
    net = _opened(model, options.step.device)[0]
    return _generation(net, options, None, on_progress, started)


def _continuation(prompt: str | Path, net: SaShiMi, options: GenerateOptions, on_progress, started) -> Generation:
    read = read_prompt(net, prompt, options.prompt, options.step)
    if read.report.far and options.strict:
        raise PromptRefused(f"{prompt}: {read.report.verdict}: {'; '.join(read.report.reasons)} (--strict)")
    return _generation(net, options, read, on_progress, started)


def _generation(net: SaShiMi, options: GenerateOptions, read: ReadPrompt | None, on_progress, started) -> Generation:
    seeds = _seeds(options)
    stepper = Stepper(net, options.step)
    sampling = options.sampling.resolved(net.summary, unfamiliar=read is not None and read.report.unfamiliar)
    if read is None and sampling.guidance != 1:  # from nothing there is no prompt to guide by: say it is off
        sampling = dataclasses.replace(sampling, guidance=1.0)
    generation = Generation(stepper.net, stepper, options, sampling, seeds, read, on_progress, started=started)
    generation.timings.prefill_s = read.seconds if read else 0.0
    log.debug("%s; step %s; seeds %s; sampling %s", net.name or "a model in memory", stepper.name, seeds,
              dataclasses.asdict(sampling))
    generation.timings.load_s = time.perf_counter() - started - generation.timings.prefill_s
    return generation


def check_prompt(prompt: str | Path, model: str | Path | SaShiMi | None = None,
                 selection: PromptSelection | None = None, device: str = "auto") -> PromptReport:
    """Guidance alone: how well `prompt` suits the model, without generating."""
    net = _opened(model, device)[0]
    return read_prompt(net, prompt, selection or PromptSelection()).report


def continue_prompt(prompt: str | Path, out: str | Path, model: str | Path | SaShiMi | None = None,
                    options: GenerateOptions | None = None, on_progress: ProgressFn | None = None,
                    on_guidance: Callable[[PromptReport], None] | None = None, play: bool = False) -> GenerateResult:
    """Continue `prompt` into `out` (a file whose suffix picks the format, or "-" for standard
    output), and play it as it is made with `play`. `model`: loaded, or a name or path, opened
    here once (a named model is looked up, and downloaded, only here)."""
    options = options or GenerateOptions()
    check_outputs(out, options, play)
    started = time.perf_counter()  # the run's timings count the model's loading
    net, model_id = _opened(model, options.step.device)
    generation = _continuation(prompt, net, options, on_progress, started)
    if on_guidance is not None:
        on_guidance(generation.guidance)
    return write_generation(generation, out, model_id, source=str(prompt), play=play)


def improvise(out: str | Path, model: str | Path | SaShiMi | None = None, options: GenerateOptions | None = None,
              on_progress: ProgressFn | None = None, play: bool = False) -> GenerateResult:
    """Music from nothing into `out`: the model stepped from rest."""
    options = options or GenerateOptions()
    check_outputs(out, options, play)
    started = time.perf_counter()
    net, model_id = _opened(model, options.step.device)
    return write_generation(_generation(net, options, None, on_progress, started), out, model_id, source=None,
                            play=play)
