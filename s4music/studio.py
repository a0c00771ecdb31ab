"""`s4music studio`: a local web page over the same library functions as the CLI.

    s4music studio                   # http://127.0.0.1:7860
    s4music studio --model runs/mine/best --port 8000

The page takes a prompt (an upload in any format `continue` reads, the microphone, a URL fetched
as `s4music fetch` does, or the bundled example), shows the guidance of `check` before anything is generated, plays the
first take while it is sampled, and lists the takes best first, each with its likelihood, a
spectrogram with the seam marked and downloads of the audio and its sidecar. A second tab improvises
from nothing. This file wires widgets to `s4music.generate`, `s4music.data.fetch` and the model
registry; it computes nothing of its own. It is three parts: the page's layout (`_layout`), the
messages a generation's worker thread sends the page (`Studio.run_in_background`), and the text the
page shows (`guidance_markdown`, `takes_markdown`, `progress_line`: plain functions).
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from s4music.addresses import public_address
from s4music.audio import declared_seconds
from s4music.data.fetch import FetchOptions, fetch
from s4music.errors import S4MusicError
from s4music.generate import (GenerateOptions, Output, PromptSelection, Sampling, StepOptions, check_prompt,
                              plot_continuation, stream_continuation, stream_improvisation, write_generation)
from s4music.generate.prompt import load_prompt
from s4music.guidance import PromptReport
from s4music.model.registry import DEFAULT_NAME, NAMED, checkpoints_under, load_model, resolve_model
from s4music.model.sashimi import SaShiMi

log = logging.getLogger(__name__)
MAX_UPLOAD_MB = 100  # uploads, and fetches from the URL box
MAX_PROMPT_MINUTES = 20.0  # a longer file is refused: the page reads the whole file to select from it
MAX_TAKES = 20  # generations kept on the server; the oldest go past this
MAX_FETCHED = 5  # prompts fetched from URLs kept on the server; the oldest go past this
CACHE_SWEEP = (300, 3600)  # Gradio's copies of files: every 5 minutes, those older than an hour go
# an absolute path in a message (not one inside a URL): the page shows its last part only
SERVER_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s/:'\"()]+/)*([^\s/:'\"()]+)")
# shipped with the package (examples/prompt.wav links here): a chorale the bundled model never heard
EXAMPLE_PROMPT = Path(__file__).resolve().parent / "assets" / "prompt.wav"
NO_PROMPT = "Choose a prompt: upload a file, record, paste a URL, or take the example under the prompt."


class Cancelled(Exception):
    """The page that asked for a generation went away."""


@dataclass(frozen=True)
class ShownTake:
    """One take as the page lists it: `rank` 1 is the likeliest."""

    rank: int
    seed: int
    bits: float  # bits/sample under the model
    degenerate: str | None  # see guidance.degeneracy
    audio: Path
    spectrogram: Path  # with the seam marked


@dataclass(frozen=True)
class Made:
    """What one generation left on the server: its takes, best first, and their JSON sidecar."""

    takes: list[ShownTake]
    sidecar: Path
    seed: int
    speed_x_realtime: float  # audio seconds per wall second


# What a generation's worker thread tells the page (Studio.run_in_background): Sound and Progress
# while it samples, then one Finished or Failed, the last.
@dataclass(frozen=True)
class Sound:
    """A piece of the first take, to play as it is made."""

    sample_rate: int
    samples: np.ndarray  # mono, float

    def pcm16(self) -> tuple[int, np.ndarray]:
        """As the page's player takes it."""
        return self.sample_rate, (np.clip(self.samples, -1, 1) * 32767).astype(np.int16)


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    speed_x_realtime: float


@dataclass(frozen=True)
class Finished:
    made: Made


@dataclass(frozen=True)
class Failed:
    message: str  # the CLI's one line, server paths and all


Message = Sound | Progress | Finished | Failed


def without_paths(message: str) -> str:
    """A message for the page: each absolute path cut to its last part ("/tmp/x/y/bad.wav" -> "bad.wav"),
    so a visitor learns nothing of the server's folders."""
    return SERVER_PATH.sub(lambda m: m.group(1), message)


def is_loopback(host: str) -> bool:
    """Whether `host` (a --host) serves this machine alone."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Studio:
    """The page's state: loaded models (one of each, shared by every visitor) and where takes go.

    `model_dirs`: folders whose checkpoint directories visitors may choose (besides the model names
    and `model`); `public_urls_only`: the URL box fetches only public internet addresses (for a page
    others can reach). `out_dir` (default: a fresh temporary folder, removed by close()) holds the
    last `max_takes` takes and the last few fetched prompts."""

    def __init__(self, model: str | None = None, out_dir: str | Path | None = None,
                 max_prompt_minutes: float = MAX_PROMPT_MINUTES, max_upload_mb: float = MAX_UPLOAD_MB,
                 model_dirs: Iterable[str | Path] = (), public_urls_only: bool = False, max_takes: int = MAX_TAKES):
        self.default_model = model or DEFAULT_NAME
        self.own_dir = out_dir is None
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="s4music-studio-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_prompt_minutes = max_prompt_minutes
        self.max_upload_mb = max_upload_mb
        self.model_dirs = [Path(d).resolve() for d in model_dirs]
        self.public_urls_only = public_urls_only
        self.max_takes = max(1, max_takes)
        self._nets: dict[str, SaShiMi] = {}
        self._short_enough: set[tuple[str, int, int]] = set()  # prompts checked: (path, size, mtime)
        self._lock = threading.Lock()
        self._files_lock = threading.Lock()

    def close(self) -> None:
        """Remove the temporary folder this studio made (a folder it was given stays)."""
        if self.own_dir:
            shutil.rmtree(self.out_dir, ignore_errors=True)

    # ---------------------------------------------------------------- models
    def model_choices(self) -> list[str]:
        """What the model box offers: the names, the starting model, and each checkpoint directory
        (one with a config.json) up to three levels under a model directory, relative to it."""
        choices = [DEFAULT_NAME, *NAMED]
        if self.default_model not in choices:
            choices.insert(0, self.default_model)
        for root in self.model_dirs:
            choices += [str(c.relative_to(root)) for c in checkpoints_under(root)]
        return list(dict.fromkeys(choices))

    def model_spec(self, spec: str | None) -> str:
        """The model a visitor asked for, if this studio offers it: a name, the starting model, or a
        path inside a model directory (relative to it, or absolute). Anything else is refused in
        words that do not depend on the path, so the box tells nothing of what exists."""
        spec = (spec or "").strip() or self.default_model
        if spec == self.default_model or spec == DEFAULT_NAME or spec in NAMED:
            return spec
        for root in self.model_dirs:
            path = (root / spec).resolve()  # an absolute spec stays itself; ".." and links are followed
            if path != root and path.is_relative_to(root):
                return str(path)
        raise S4MusicError(f"{spec}: not a model this studio offers; choose one from the list "
                           f"({', '.join([DEFAULT_NAME, *NAMED])}, or one under its model folders)")

    def net(self, spec: str | None) -> tuple[SaShiMi, str]:
        path = str(resolve_model(self.model_spec(spec)))
        with self._lock:
            if path not in self._nets:
                self._nets[path] = load_model(path)
        return self._nets[path], path

    def recommended(self, spec: str | None) -> Sampling:
        return Sampling().resolved(self.net(spec)[0].summary)

    # ---------------------------------------------------------------- files on the server
    def _new_dir(self, prefix: str) -> Path:
        """A fresh folder `prefix`-* in out_dir; names sort by when they were made."""
        return Path(tempfile.mkdtemp(prefix=f"{prefix}-{time.time_ns():020d}-", dir=self.out_dir))

    def _keep_newest(self, prefix: str, keep: int) -> None:
        """Drop the oldest `prefix`-* folders past the newest `keep`."""
        with self._files_lock:
            old = sorted(self.out_dir.glob(f"{prefix}-*"), key=lambda p: p.name)
            for path in old[: max(0, len(old) - keep)]:
                shutil.rmtree(path, ignore_errors=True)

    # ---------------------------------------------------------------- prompt in
    def fetch_url(self, url: str) -> str:
        """A web page's audio, fetched as `s4music fetch` does (http and https only), within the page's
        upload and prompt limits; only its first item, and only the converted WAV, are kept."""
        where = self._new_dir("fetch")
        options = FetchOptions(playlist_items="1", max_mb=self.max_upload_mb, max_minutes=self.max_prompt_minutes,
                               allow_address=public_address if self.public_urls_only else None)
        try:
            report = fetch([url.strip()], where, options)
            if report.failed:
                raise S4MusicError(report.failed[0][1])
            item = report.fetched[0]
            shutil.rmtree(item.original.parent, ignore_errors=True)  # the download as it came: not needed
            item.sidecar.unlink(missing_ok=True)
        except BaseException:
            shutil.rmtree(where, ignore_errors=True)
            raise
        self._keep_newest("fetch", MAX_FETCHED)
        return str(item.audio)

    def check_length(self, prompt: str, sample_rate: int) -> None:
        """Refuse a prompt longer than max_prompt_minutes: at once where its header says so, else
        once it is decoded (once per file)."""
        info = Path(prompt).stat()
        key = (str(prompt), info.st_size, info.st_mtime_ns)
        if key in self._short_enough:
            return
        full = declared_seconds(prompt)
        if full is None or full <= self.max_prompt_minutes * 60:
            _, full = load_prompt(prompt, sample_rate, PromptSelection(seconds=self.max_prompt_minutes * 60))
        if full is not None:
            raise S4MusicError(f"{Path(prompt).name}: {full / 60:.1f} min long; the page takes prompts of up to "
                               f"{self.max_prompt_minutes:g} min (trim it, or use `s4music continue`)")
        self._short_enough.add(key)

    def check(self, prompt: str, model: str | None, selection: PromptSelection) -> PromptReport:
        """`check`'s report on `prompt`: its verdict, reasons, the model's bits and advice."""
        net, _ = self.net(model)
        self.check_length(prompt, net.audio.sample_rate)
        return check_prompt(prompt, net, selection)

    # ---------------------------------------------------------------- generation
    def run(self, prompt: str | None, model: str | None, options: GenerateOptions, cancelled: threading.Event,
            on_chunk, on_progress) -> Made:
        """Continue `prompt` (or improvise with None) into files under out_dir."""
        net, path = self.net(model)
        if prompt is not None:
            self.check_length(prompt, net.audio.sample_rate)
        run_dir = self._new_dir("take")
        try:
            if prompt is not None:
                generation = stream_continuation(prompt, net, options, on_progress=on_progress)
            else:
                generation = stream_improvisation(net, options, on_progress=on_progress)

            def chunk(c) -> None:
                if cancelled.is_set():
                    raise Cancelled()
                on_chunk(generation, c)

            result = write_generation(generation, run_dir / "take.wav", path, prompt, on_chunk=chunk)
            seam = generation.prompt_frames - generation.first_frame
            takes = [ShownTake(rank=k + 1, seed=take.seed, bits=take.bits, degenerate=take.degenerate, audio=take.path,
                               spectrogram=plot_continuation(take.path, seam, take.path.with_suffix(".png")))
                     for k, take in enumerate(result.takes)]
        except BaseException:  # cancelled or failed: no take, and no folder for it
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        self._keep_newest("take", self.max_takes)
        return Made(takes, result.sidecar, result.seed, result.speed_x_realtime)

    def run_in_background(self, prompt: str | None, model: str | None, options: GenerateOptions) -> Iterator[Message]:
        """run() on a worker thread, told as messages: Sound (from a second before the seam) and
        Progress while it samples, then one Finished or Failed, the last. Closing the iterator early
        (the page went away) stops the worker at its next chunk."""
        messages: queue.Queue[Message] = queue.Queue()
        cancelled = threading.Event()

        def on_chunk(generation, chunk) -> None:
            play_from = max(0, generation.prompt_frames - generation.sample_rate)
            part = chunk.after(play_from)[0].numpy()
            if len(part):
                messages.put(Sound(generation.sample_rate, part))

        def on_progress(done, total, speed) -> None:
            messages.put(Progress(done, total, speed))

        def work() -> None:
            try:
                messages.put(Finished(self.run(prompt, model, options, cancelled, on_chunk, on_progress)))
            except Cancelled:
                pass  # the iterator was closed: no one reads on
            except S4MusicError as e:
                messages.put(Failed(str(e)))
            except Exception as e:  # noqa: BLE001 (shown on the page, logged in full)
                log.exception("studio generation failed")
                messages.put(Failed(f"generation failed ({e})"))

        threading.Thread(target=work, daemon=True).start()
        try:
            while True:
                message = messages.get()
                yield message
                if isinstance(message, Finished | Failed):
                    return
        finally:
            cancelled.set()


def options_from(seconds, variations, temperature, top_k, top_p, seed, start, end, prompt_seconds,
                 guidance: float = 1.0) -> GenerateOptions:
    return GenerateOptions(seconds=float(seconds), variations=int(variations), rank=int(variations) > 1,
                           seed=None if seed in (None, "") or int(seed) < 0 else int(seed),
                           sampling=Sampling(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                                             guidance=float(guidance)),
                           prompt=PromptSelection(seconds=float(prompt_seconds), start=start or None,  # 0: not set
                                                  end=end or None),
                           output=Output(), step=StepOptions(device="cpu"))


# ---------------------------------------------------------------- what the page says
def guidance_markdown(report: PromptReport) -> str:
    """`check`'s report as the page shows it, before anything is generated."""
    lines = [f"### verdict: {report.verdict}",
             f"{report.seconds:.1f} s of prompt; " + ("; ".join(report.conversions) or "no conversion needed")]
    lines += [f"- {reason}" for reason in report.reasons]
    lines += [f"- **advice:** {advice}" for advice in report.advice]
    if report.far:
        lines.append("\n**Warning:** the model may continue this poorly; you can continue it anyway.")
    return "\n".join(lines)


def takes_markdown(made: Made) -> str:
    """The takes as a table, best first."""
    rows = "\n".join(f"| {t.rank} | {t.seed} | {t.bits:.3f} | {t.degenerate or ''} |" for t in made.takes)
    return (f"seed **{made.seed}**, {made.speed_x_realtime:.2f}× real time\n\n| take | seed | bits/sample | degenerate |\n"
            f"|---|---|---|---|\n{rows}")


def gallery_items(made: Made) -> list[tuple[str, str]]:
    """Each take's spectrogram with its caption."""
    return [(str(t.spectrogram), f"take {t.rank}: seed {t.seed}, {t.bits:.3f} bits/sample") for t in made.takes]


def downloads(made: Made) -> list[str]:
    return [str(t.audio) for t in made.takes] + [str(made.sidecar)]


def progress_line(progress: Progress, elapsed: float) -> str:
    """What the progress bar says, `elapsed` seconds into the generation."""
    left = (progress.total - progress.done) / max(progress.done, 1) * elapsed
    return f"sampling, {progress.speed_x_realtime:.2f}× real time, about {left:.0f} s left"


# ---------------------------------------------------------------- the page
def build(studio: Studio):
    """The Gradio page: the layout of `_layout`, its widgets wired to the studio."""
    import gradio as gr

    def error(e: S4MusicError):
        return gr.Error(without_paths(str(e)))  # the CLI's one line, without the server's folders

    def prompt_from_url(url):
        try:
            return studio.fetch_url(url)
        except S4MusicError as e:
            raise error(e) from None

    def show_guidance(prompt, model, start, end, prompt_seconds):
        if not prompt:
            return NO_PROMPT
        try:
            selection = PromptSelection(seconds=float(prompt_seconds), start=start or None, end=end or None)
            return guidance_markdown(studio.check(prompt, model, selection))
        except S4MusicError as e:
            raise error(e) from None

    def recommended(model):
        try:
            s = studio.recommended(model)
        except S4MusicError as e:
            raise error(e) from None
        return s.temperature, s.top_k, s.top_p, s.guidance

    def improvise(model, seconds, variations, temperature, top_k, top_p, seed, progress=gr.Progress()):
        yield from generate(None, model, seconds, variations, temperature, top_k, top_p, seed, None, None,
                            PromptSelection.seconds, 1.0, progress, from_nothing=True)

    def generate(prompt, model, seconds, variations, temperature, top_k, top_p, seed, start, end, prompt_seconds,
                 guidance_by_prompt, progress=gr.Progress(), from_nothing=False):
        if not prompt and not from_nothing:
            raise gr.Error(NO_PROMPT)
        options = options_from(seconds, variations, temperature, top_k, top_p, seed, start, end, prompt_seconds,
                               guidance_by_prompt)
        started = time.perf_counter()
        # closed however this ends (the page went away, too): the worker stops at its next chunk
        with closing(studio.run_in_background(prompt, model, options)) as messages:
            for message in messages:
                if isinstance(message, Sound):
                    yield message.pcm16(), gr.skip(), gr.skip(), gr.skip()
                elif isinstance(message, Progress):
                    progress(message.done / message.total, desc=progress_line(message, time.perf_counter() - started))
                elif isinstance(message, Finished):
                    yield gr.skip(), takes_markdown(message.made), gallery_items(message.made), downloads(message.made)
                else:
                    raise gr.Error(without_paths(message.message))

    def enabled_if(prompt):
        return gr.Button(interactive=bool(prompt))

    def shown():
        return gr.Column(visible=True)

    page, w = _layout(gr, studio)
    with page:
        selection = [w.prompt, w.model, w.start, w.end, w.prompt_seconds]
        w.fetch_button.click(prompt_from_url, w.url, w.prompt)
        for trigger in (w.prompt.change, w.start.change, w.end.change, w.prompt_seconds.change):
            trigger(show_guidance, selection, w.guidance, concurrency_id="check", concurrency_limit=2)
        w.prompt.change(enabled_if, w.prompt, w.go, queue=False, api_visibility="private")
        w.model.change(recommended, w.model, [*w.controls[2:5], w.guidance_by_prompt])
        runs = ((w.go, generate, [w.prompt, w.model, *w.controls, w.start, w.end, w.prompt_seconds,
                                  w.guidance_by_prompt], w.results),
                (w.go_free, improvise, [w.model, *w.controls_free], w.results_free))
        for button, fn, inputs, results in runs:
            # the player appears as the generation starts, the takes once it is done
            button.click(shown, None, results.playing, queue=False, api_visibility="private")
            button.click(fn, inputs, results.outputs(), concurrency_id="generate", concurrency_limit=1).success(
                shown, None, results.listed, queue=False, api_visibility="private")
    return page


@dataclass
class Results:
    """Where a tab shows what it made; each part hidden until it has something to show."""

    playing: Any  # a column: the player
    player: Any
    listed: Any  # a column: the table, the spectrograms and the downloads
    table: Any
    gallery: Any
    files: Any

    def outputs(self) -> list:
        return [self.player, self.table, self.gallery, self.files]


@dataclass
class Widgets:
    model: Any
    prompt: Any
    url: Any
    fetch_button: Any
    start: Any
    end: Any
    prompt_seconds: Any
    guidance: Any
    controls: list
    guidance_by_prompt: Any
    go: Any
    results: Results
    controls_free: list
    go_free: Any
    results_free: Results


def _layout(gr, studio: Studio):
    """The page and its widgets, not yet wired: (page, Widgets)."""
    with gr.Blocks(title="s4music studio", delete_cache=CACHE_SWEEP) as page:
        gr.Markdown("# s4music studio\nContinue music with SaShiMi. Choose a prompt, read the guidance, then "
                    "continue it; the first take plays while it is made.")
        rec = studio.recommended(studio.default_model)  # the sliders start at the model's recommended sampling
        model = gr.Dropdown(studio.model_choices(), value=studio.default_model, allow_custom_value=True,
                            label="model (a name, or a checkpoint folder the studio offers)", elem_id="model")
        with gr.Tab("Continue"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Audio(sources=["upload", "microphone"], type="filepath", label="prompt",
                                      editable=True, elem_id="prompt")
                    gr.Examples([[str(EXAMPLE_PROMPT)]], [prompt], label="or try the example", elem_id="example",
                                example_labels=["a Bach chorale on piano, 5 s"])
                    with gr.Row():
                        url = gr.Textbox(label="or a URL (http/https; YouTube works where yt-dlp does)", scale=4)
                        fetch_button = gr.Button("fetch", scale=1)
                    with gr.Row():
                        start = gr.Number(label="selection start, s (0: the start)", value=0)
                        end = gr.Number(label="selection end, s (0: the end)", value=0)
                        prompt_seconds = gr.Number(label="use its last seconds", value=PromptSelection.seconds)
                with gr.Column():
                    guidance = gr.Markdown(NO_PROMPT, elem_id="guidance")
            controls = _controls(gr, rec)
            guidance_by_prompt = gr.Slider(0, 5, value=rec.guidance, step=0.25, elem_id="guidance-by-prompt",
                                           label="guidance by the prompt (1: off; 2x the work)",
                                           info="higher: follows the prompt more closely")
            go = gr.Button("continue", variant="primary", interactive=False, elem_id="continue")  # until a prompt
            results = _results(gr, "", "takes, best first: spectrograms with the seam")
        with gr.Tab("Generate from nothing"):
            controls_free = _controls(gr, rec)
            go_free = gr.Button("generate", variant="primary", elem_id="generate")
            results_free = _results(gr, "-free", "takes, best first: spectrograms")
    return page, Widgets(model=model, prompt=prompt, url=url, fetch_button=fetch_button, start=start, end=end,
                         prompt_seconds=prompt_seconds, guidance=guidance, controls=controls,
                         guidance_by_prompt=guidance_by_prompt, go=go, results=results, controls_free=controls_free,
                         go_free=go_free, results_free=results_free)


def _results(gr, suffix: str, gallery_label: str) -> Results:
    """The player and the takes, hidden; `suffix` tells one tab's elem_ids from the other's."""
    with gr.Column(visible=False, elem_id=f"playing{suffix}") as playing:
        player = gr.Audio(streaming=True, autoplay=True, label="first take, as it is made", elem_id=f"player{suffix}")
    with gr.Column(visible=False, elem_id=f"listed{suffix}") as listed:
        table = gr.Markdown(elem_id=f"takes{suffix}")
        gallery = gr.Gallery(label=gallery_label, columns=2, height="auto", elem_id=f"spectrograms{suffix}")
        files = gr.File(label="downloads: audio and settings", file_count="multiple", elem_id=f"downloads{suffix}")
    return Results(playing, player, listed, table, gallery, files)


def _controls(gr, rec: Sampling) -> list:
    with gr.Row():
        seconds = gr.Slider(1, 60, value=GenerateOptions.seconds, step=1, label="seconds")
        variations = gr.Slider(1, 8, value=GenerateOptions.variations, step=1, label="variations")
        temperature = gr.Slider(0, 1.5, value=rec.temperature, step=0.05, label="temperature",
                                info="lower: safer, more repetitive; higher: bolder, noisier")
        top_k = gr.Number(value=rec.top_k, precision=0, label="top-k (0: off)",
                          info="picks from this many likeliest sounds; fewer: safer")
        top_p = gr.Slider(0.05, 1, value=rec.top_p, step=0.01, label="top-p (1: off)",
                          info="picks from the likeliest sounds; lower: safer")
        seed = gr.Number(value=-1, precision=0, label="seed (-1: random)")
    return [seconds, variations, temperature, top_k, top_p, seed]


def serve(host: str = "127.0.0.1", port: int = 7860, model: str | None = None, share: bool = False,
          max_upload_mb: int = MAX_UPLOAD_MB, model_dirs: Iterable[str | Path] = (), allow_local_urls: bool = False,
          work_dir: str | Path | None = None, max_takes: int = MAX_TAKES) -> None:
    """Serve the page until interrupted (Ctrl-C: KeyboardInterrupt), then stop the server and remove
    the temporary folder it made (a given `work_dir` stays: the caller's). Where others can reach the
    page (a host other than loopback, or `share`), its URL box fetches only public internet addresses
    unless `allow_local_urls`. Gradio keeps its own copies of files where GRADIO_TEMP_DIR says (the
    CLI points it into `work_dir`) and drops them after an hour (CACHE_SWEEP) and at the end."""
    public = share or not is_loopback(host)
    studio = Studio(model, work_dir, max_upload_mb=max_upload_mb, model_dirs=model_dirs,
                    public_urls_only=public and not allow_local_urls, max_takes=max_takes)
    page = None
    try:
        page = build(studio)
        page.queue(default_concurrency_limit=1)
        page.launch(server_name=host, server_port=port, share=share, max_file_size=f"{max_upload_mb}mb",
                    prevent_thread_lock=True, quiet=True, show_error=True, allowed_paths=[str(studio.out_dir)])
        while True:
            time.sleep(0.2)
    finally:
        if page is not None:
            page.close()
        studio.close()
