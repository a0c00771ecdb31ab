"""`s4music studio`: a local web page over the same library functions as the CLI.

    s4music studio                   # http://127.0.0.1:7860
    s4music studio --model runs/mine/best --port 8000

The page takes a prompt (an upload in any format `continue` reads, the microphone, or a URL fetched
as `s4music fetch` does), shows the guidance of `check` before anything is generated, plays the
first take while it is sampled, and lists the takes best first, each with its likelihood, a
spectrogram with the seam marked and downloads of the audio and its sidecar. A second tab improvises
from nothing. This file wires widgets to `s4music.generate`, `s4music.data.fetch` and the model
registry; it computes nothing of its own.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from s4music.data.fetch import FetchOptions, fetch
from s4music.errors import S4MusicError
from s4music.generate import (GenerateOptions, Output, PromptSelection, Sampling, StepOptions, check_prompt,
                              plot_continuation, stream_continuation, stream_improvisation, write_generation)
from s4music.generate.prompt import load_prompt
from s4music.model.registry import DEFAULT_NAME, load_model, resolve_model
from s4music.model.sashimi import SaShiMi

log = logging.getLogger(__name__)
MAX_UPLOAD_MB = 100
MAX_PROMPT_MINUTES = 20.0  # a longer file is refused: the page reads the whole file to select from it


class Cancelled(Exception):
    """The page that asked for a generation went away."""


class Studio:
    """The page's state: loaded models (one of each, shared by every visitor) and where takes go."""

    def __init__(self, model: str | None = None, out_dir: str | Path | None = None,
                 max_prompt_minutes: float = MAX_PROMPT_MINUTES):
        self.default_model = model or DEFAULT_NAME
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="s4music-studio-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_prompt_minutes = max_prompt_minutes
        self._nets: dict[str, SaShiMi] = {}
        self._short_enough: set[tuple[str, int, int]] = set()  # prompts checked: (path, size, mtime)
        self._lock = threading.Lock()

    def net(self, spec: str | None) -> tuple[SaShiMi, str]:
        path = str(resolve_model(spec or self.default_model))
        with self._lock:
            if path not in self._nets:
                self._nets[path] = load_model(path)
        return self._nets[path], path

    def recommended(self, spec: str | None) -> Sampling:
        return Sampling().resolved(self.net(spec)[0].summary)

    # ---------------------------------------------------------------- prompt in
    def fetch_url(self, url: str) -> str:
        """A web page's audio, fetched as `s4music fetch` does (http and https only)."""
        report = fetch([url.strip()], self.out_dir / "fetched", FetchOptions())
        if report.failed:
            raise S4MusicError(report.failed[0][1])
        return str(report.fetched[0].audio)

    def check_length(self, prompt: str, sample_rate: int) -> None:
        """Refuse a prompt longer than max_prompt_minutes (decoded once per file)."""
        info = Path(prompt).stat()
        key = (str(prompt), info.st_size, info.st_mtime_ns)
        if key in self._short_enough:
            return
        _, full = load_prompt(prompt, sample_rate, PromptSelection(seconds=self.max_prompt_minutes * 60))
        if full is not None:
            raise S4MusicError(f"{Path(prompt).name}: {full / 60:.1f} min long; the page takes prompts of up to "
                               f"{self.max_prompt_minutes:g} min (trim it, or use `s4music continue`)")
        self._short_enough.add(key)

    def guidance(self, prompt: str, model: str | None, selection: PromptSelection) -> str:
        """The verdict of `check`, its reasons, the model's bits against its test figure, and advice."""
        net, _ = self.net(model)
        self.check_length(prompt, net.audio.sample_rate)
        report = check_prompt(prompt, net, selection)
        lines = [f"### verdict: {report.verdict}",
                 f"{report.seconds:.1f} s of prompt; " + ("; ".join(report.conversions) or "no conversion needed")]
        lines += [f"- {reason}" for reason in report.reasons]
        lines += [f"- **advice:** {advice}" for advice in report.advice]
        if report.far:
            lines.append("\n**Warning:** the model may continue this poorly; you can continue it anyway.")
        return "\n".join(lines)

    # ---------------------------------------------------------------- generation
    def run(self, prompt: str | None, model: str | None, options: GenerateOptions, cancelled: threading.Event,
            on_chunk, on_progress) -> dict:
        """Continue `prompt` (or improvise with None) into files under out_dir: the takes best first."""
        net, path = self.net(model)
        if prompt is not None:
            self.check_length(prompt, net.audio.sample_rate)
        run_dir = Path(tempfile.mkdtemp(prefix="take-", dir=self.out_dir))
        out = run_dir / "take.wav"
        if prompt is not None:
            generation = stream_continuation(prompt, net, options, on_progress=on_progress)
        else:
            generation = stream_improvisation(net, options, on_progress=on_progress)

        def chunk(c) -> None:
            if cancelled.is_set():
                raise Cancelled()
            on_chunk(generation, c)

        result = write_generation(generation, out, path, prompt, on_chunk=chunk)
        takes = []
        for k, take in enumerate(result.takes):
            png = plot_continuation(take.path, generation.prompt_frames - generation.first_frame,
                                    take.path.with_suffix(".png"))
            takes.append({"rank": k + 1, "seed": take.seed, "bits": take.bits, "audio": str(take.path),
                          "png": str(png), "degenerate": take.degenerate})
        return {"takes": takes, "sidecar": str(result.sidecar), "seed": result.seed, "speed": result.speed_x_realtime,
                "guidance": result.guidance.verdict if result.guidance else None}


def options_from(seconds, variations, temperature, top_k, top_p, seed, start, end, prompt_seconds,
                 guidance: float = 1.0) -> GenerateOptions:
    return GenerateOptions(seconds=float(seconds), variations=int(variations), rank=int(variations) > 1,
                           seed=None if seed in (None, "") or int(seed) < 0 else int(seed),
                           sampling=Sampling(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                                             guidance=float(guidance)),
                           prompt=PromptSelection(seconds=float(prompt_seconds), start=start or None,  # 0: not set
                                                  end=end or None),
                           output=Output(), step=StepOptions(device="cpu"))


def build(studio: Studio):
    """The Gradio page."""
    import gradio as gr

    def error(e: S4MusicError):
        return gr.Error(str(e))  # the same one line the CLI prints

    def prompt_from_url(url):
        try:
            return studio.fetch_url(url)
        except S4MusicError as e:
            raise error(e) from None

    def show_guidance(prompt, model, start, end, prompt_seconds):
        if not prompt:
            return "Choose a prompt: upload a file, record, or paste a URL."
        try:
            return studio.guidance(prompt, model, PromptSelection(seconds=float(prompt_seconds), start=start or None,
                                                                  end=end or None))
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
            raise gr.Error("Choose a prompt first: upload a file, record, or paste a URL.")
        options = options_from(seconds, variations, temperature, top_k, top_p, seed, start, end, prompt_seconds,
                               guidance_by_prompt)
        pieces: queue.Queue = queue.Queue()
        cancelled = threading.Event()
        started = time.perf_counter()

        def on_chunk(generation, chunk):
            play_from = max(0, generation.prompt_frames - generation.sample_rate)  # a second before the seam
            part = chunk.after(play_from)[0].numpy()
            if len(part):
                pieces.put(("audio", generation.sample_rate, part))

        def on_progress(done, total, speed):
            pieces.put(("progress", done, total, speed))

        def work():
            try:
                pieces.put(("done", studio.run(prompt, model, options, cancelled, on_chunk, on_progress)))
            except Cancelled:
                pieces.put(("cancelled",))
            except S4MusicError as e:
                pieces.put(("error", str(e)))
            except Exception as e:  # noqa: BLE001 (shown on the page, logged in full)
                log.exception("studio generation failed")
                pieces.put(("error", f"generation failed ({e})"))

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            while True:
                item = pieces.get()
                if item[0] == "audio":
                    yield (item[1], (np.clip(item[2], -1, 1) * 32767).astype(np.int16)), gr.skip(), gr.skip(), \
                        gr.skip()
                elif item[0] == "progress":
                    _, done, total, speed = item
                    left = (total - done) / max(done, 1) * (time.perf_counter() - started)
                    progress(done / total, desc=f"sampling, {speed:.2f}× real time, about {left:.0f} s left")
                elif item[0] == "done":
                    result = item[1]
                    rows = "\n".join(f"| {t['rank']} | {t['seed']} | {t['bits']:.3f} | "
                                     f"{t['degenerate'] or ''} |" for t in result["takes"])
                    table = (f"seed **{result['seed']}**, {result['speed']:.2f}× real time\n\n| take | seed | bits/sample | "
                             f"degenerate |\n|---|---|---|---|\n{rows}")
                    gallery = [(t["png"], f"take {t['rank']}: seed {t['seed']}, {t['bits']:.3f} bits/sample")
                               for t in result["takes"]]
                    files = [t["audio"] for t in result["takes"]] + [result["sidecar"]]
                    yield gr.skip(), table, gallery, files
                    return
                elif item[0] == "error":
                    raise gr.Error(item[1])
                else:
                    return
        finally:
            cancelled.set()  # the page went away (or we are done): the worker stops at its next chunk

    with gr.Blocks(title="s4music studio") as page:
        gr.Markdown("# s4music studio\nContinue music with SaShiMi. Choose a prompt, read the guidance, then "
                    "continue it; the first take plays while it is made.")
        rec = studio.recommended(studio.default_model)  # the sliders start at the model's recommended sampling
        model = gr.Textbox(value=studio.default_model, label="model (a name, or a checkpoint directory)", elem_id="model")
        with gr.Tab("Continue"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Audio(sources=["upload", "microphone"], type="filepath", label="prompt",
                                      editable=True, elem_id="prompt")
                    with gr.Row():
                        url = gr.Textbox(label="or a URL (http/https; YouTube works where yt-dlp does)", scale=4)
                        fetch_button = gr.Button("fetch", scale=1)
                    with gr.Row():
                        start = gr.Number(label="selection start, s (0: the start)", value=0)
                        end = gr.Number(label="selection end, s (0: the end)", value=0)
                        prompt_seconds = gr.Number(label="use its last seconds", value=PromptSelection.seconds)
                with gr.Column():
                    guidance = gr.Markdown("Choose a prompt: upload a file, record, or paste a URL.",
                                           elem_id="guidance")
            controls = _controls(gr, rec)
            guidance_by_prompt = gr.Slider(0, 5, value=rec.guidance, step=0.25, elem_id="guidance-by-prompt",
                                           label="guidance by the prompt (1: off; 2x the work)")
            go = gr.Button("continue", variant="primary", elem_id="continue")
            player = gr.Audio(streaming=True, autoplay=True, label="first take, as it is made", elem_id="player")
            table = gr.Markdown(elem_id="takes")
            gallery = gr.Gallery(label="takes, best first: spectrograms with the seam", columns=2, height="auto")
            files = gr.File(label="downloads: audio and settings", file_count="multiple")
        with gr.Tab("Generate from nothing"):
            controls_free = _controls(gr, rec)
            go_free = gr.Button("generate", variant="primary", elem_id="generate")
            player_free = gr.Audio(streaming=True, autoplay=True, label="the first take, as it is made")
            table_free = gr.Markdown()
            gallery_free = gr.Gallery(label="takes, best first", columns=2, height="auto")
            files_free = gr.File(label="downloads", file_count="multiple")

        selection = [prompt, model, start, end, prompt_seconds]
        fetch_button.click(prompt_from_url, url, prompt)
        for trigger in (prompt.change, start.change, end.change, prompt_seconds.change):
            trigger(show_guidance, selection, guidance, concurrency_id="check", concurrency_limit=2)
        model.submit(recommended, model, [*controls[2:5], guidance_by_prompt])
        go.click(generate, [prompt, model, *controls, start, end, prompt_seconds, guidance_by_prompt],
                 [player, table, gallery, files],
                 concurrency_id="generate", concurrency_limit=1)
        go_free.click(improvise, [model, *controls_free], [player_free, table_free, gallery_free, files_free],
                      concurrency_id="generate", concurrency_limit=1)
    return page


def _controls(gr, rec: Sampling) -> list:
    with gr.Row():
        seconds = gr.Slider(1, 60, value=GenerateOptions.seconds, step=1, label="seconds")
        variations = gr.Slider(1, 8, value=GenerateOptions.variations, step=1, label="variations")
        temperature = gr.Slider(0, 1.5, value=rec.temperature, step=0.05, label="temperature")
        top_k = gr.Number(value=rec.top_k, precision=0, label="top-k (0: off)")
        top_p = gr.Slider(0.05, 1, value=rec.top_p, step=0.01, label="top-p (1: off)")
        seed = gr.Number(value=-1, precision=0, label="seed (-1: random)")
    return [seconds, variations, temperature, top_k, top_p, seed]


def serve(host: str = "127.0.0.1", port: int = 7860, model: str | None = None, share: bool = False,
          max_upload_mb: int = MAX_UPLOAD_MB, block: bool = True):
    """Start the page's server; returns the running Gradio app (with block=False, for tests)."""
    studio = Studio(model)
    page = build(studio)
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=host, server_port=port, share=share, max_file_size=f"{max_upload_mb}mb",
                prevent_thread_lock=not block, quiet=True, show_error=True, allowed_paths=[str(studio.out_dir)])
    return page
