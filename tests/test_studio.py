"""`s4music studio`: the page's functions through its API (gradio_client), and the page in a real
browser (Debian's Chromium, driven by Playwright)."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).parent.parent
ARTIFACTS = Path(os.environ.get("S4MUSIC_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts"))
gradio = pytest.importorskip("gradio", reason="gradio is installed by `make install`")
pytestmark = pytest.mark.slow  # a web server, a page and its clients
from conftest import closed_port, wav_header  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

from s4music.data.fetch import REFUSED  # noqa: E402
from s4music.guidance import FAR, PromptReport  # noqa: E402
from s4music.studio import (Cancelled, Failed, Finished, Made, Progress, ShownTake, Sound, Studio, build,  # noqa: E402
                            downloads, gallery_items, guidance_markdown, options_from, progress_line, takes_markdown)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(studio: Studio):
    """The studio's page on 127.0.0.1 (an ephemeral port): (page, url)."""
    page = build(studio)
    page.queue(default_concurrency_limit=1)
    port = free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(studio.out_dir)])
    return page, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def served(tmp_path_factory, request):
    """The studio on 127.0.0.1 with a small untrained model by default; yields (url, studio)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    model = request.getfixturevalue("tiny_model")
    studio = Studio(str(model), out_dir=tmp_path_factory.mktemp("studio"), max_prompt_minutes=0.2)
    page, url = launch(studio)
    yield url, studio
    page.close()


@pytest.fixture(scope="module")
def public(tmp_path_factory, request):
    """The studio as a page others can reach would be (only public URLs), with a model folder
    holding a copy of the small model as `mine`; yields (url, studio)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    model = request.getfixturevalue("tiny_model")
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(model, models / "mine")
    studio = Studio(str(model), out_dir=tmp_path_factory.mktemp("public"), model_dirs=[models],
                    public_urls_only=True)
    page, url = launch(studio)
    yield url, studio
    page.close()


def refusal(call) -> str:
    """The page's one-line error for `call`."""
    with pytest.raises(Exception) as e:
        call()
    message = str(e.value)
    assert "\n" not in message.strip(), message
    return message


def test_prompt_in_guidance_then_takes_through_the_api(served, synth_prompt):
    url, _ = served
    client = Client(url, verbose=False)
    guidance = client.predict(handle_file(str(synth_prompt)), None, 0, 0, 8, api_name="/show_guidance")
    assert "verdict: typical" in guidance and "bits/sample against" in guidance
    _, table, gallery, files = client.predict(handle_file(str(synth_prompt)), None, 1, 2, 1.0, 0, 1.0, 7, 0, 0, 8,
                                             api_name="/generate")
    assert "seed **7**" in table and table.count("|") > 10
    assert len(gallery) == 2 and all(Path(item["image"]).stat().st_size > 1000 for item in gallery)
    names = sorted(Path(f).name for f in files)
    assert names == ["take-1.wav", "take-2.wav", "take.json"]
    audio = [f for f in files if f.endswith("take-1.wav")][0]
    assert sf.info(audio).duration == pytest.approx(3 + 1)


def test_a_bad_file_and_a_bad_url_show_the_clis_one_line_reason(served, tmp_path):
    url, _ = served
    client = Client(url, verbose=False)
    (tmp_path / "bad.wav").write_text("not audio")
    message = refusal(lambda: client.predict(handle_file(str(tmp_path / "bad.wav")), None, 0, 0, 8,
                                             api_name="/show_guidance"))
    assert "bad.wav: not audio" in message
    assert not re.search(r"(^|[\s'\"(])/\w", message), message  # no server path: the file's name alone
    with pytest.raises(Exception, match="file:///etc/passwd: not a valid http"):
        client.predict("file:///etc/passwd", api_name="/prompt_from_url")


def test_a_prompt_longer_than_the_page_takes_is_refused(served, tmp_path):
    url, _ = served
    sf.write(str(tmp_path / "long.wav"), np.zeros(16000 * 20, np.float32) + 0.1, 16000)
    with pytest.raises(Exception, match="long.wav: 0.3 min long; the page takes prompts of up to 0.2 min"):
        Client(url, verbose=False).predict(handle_file(str(tmp_path / "long.wav")), None, 0, 0, 8,
                                           api_name="/show_guidance")


def test_a_far_prompt_shows_its_warning_and_still_continues(served, tmp_path):
    url, _ = served
    sf.write(str(tmp_path / "silence.wav"), np.zeros(32000, np.float32), 16000)
    client = Client(url, verbose=False)
    guidance = client.predict(handle_file(str(tmp_path / "silence.wav")), None, 0, 0, 8, api_name="/show_guidance")
    assert "far from what this model knows" in guidance and "Warning" in guidance
    _, table, _, files = client.predict(handle_file(str(tmp_path / "silence.wav")), None, 1, 1, 1.0, 0, 1.0, 1, 0, 0,
                                        8, api_name="/generate")
    assert "| 1 | 1 |" in table and any(f.endswith(".wav") for f in files)


def test_two_clients_at_once_both_get_their_continuations(served, synth_prompt):
    url, _ = served
    results = {}

    def run(seed):
        client = Client(url, verbose=False)
        results[seed] = client.predict(handle_file(str(synth_prompt)), None, 1, 1, 1.0, 0, 1.0, seed, 0, 0, 8,
                                       api_name="/generate")

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (11, 12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == [11, 12]
    for seed, (_, table, _, files) in results.items():
        assert f"seed **{seed}**" in table and any(f.endswith(".wav") for f in files)


def test_improvise_from_nothing(served):
    url, _ = served
    _, table, gallery, files = Client(url, verbose=False).predict(None, 1, 1, 1.0, 0, 1.0, 5, api_name="/improvise")
    assert "seed **5**" in table and len(gallery) == 1


def test_the_url_box_stops_large_or_long_downloads_and_keeps_nothing_large(served, stream_server):
    """Row 1: 2.7 h of silence behind a valid WAV header (297 MB) stops at the upload limit; 20 s
    against a 0.2-minute page stops at its header; a short one is kept as its 16 kHz WAV alone."""
    url, studio = served
    client = Client(url, verbose=False)
    frames = int(2.7 * 3600 * 16000)
    big = stream_server.add("/big.wav", wav_header(16000, 1, 16, frames), frames * 2)
    long = stream_server.add("/long.wav", wav_header(16000, 1, 16, 20 * 16000), 20 * 16000 * 2)
    short = stream_server.add("/short.wav", wav_header(16000, 2, 16, 3 * 16000), 3 * 16000 * 4)
    assert f"{big}: 297 MB, more than the 100 MB limit" in refusal(
        lambda: client.predict(big, api_name="/prompt_from_url"))
    assert f"{long}: 20.0 s long, more than the 0.2 min limit" in refusal(
        lambda: client.predict(long, api_name="/prompt_from_url"))
    assert sum(stream_server.sent.values()) < 80 * 2**20
    assert not list(studio.out_dir.glob("fetch-*"))  # nothing of either is kept
    got = client.predict(short, api_name="/prompt_from_url")
    assert sf.info(got).duration == pytest.approx(3.0)
    kept = [p for p in studio.out_dir.glob("fetch-*/**/*") if p.is_file()]
    assert [p.name for p in kept] == ["short.wav"] and kept[0].stat().st_size < 100_000  # mono 16 kHz, no original


def test_a_page_others_can_reach_fetches_no_local_address_and_says_nothing_of_ports(public, stream_server):
    """Row 2: loopback (an open port and a closed one), localhost, link-local metadata, private,
    unspecified and IPv6 forms are refused in the same words, and the local server hears nothing."""
    url, _ = public
    client = Client(url, verbose=False)
    stream_server.add("/small.wav", wav_header(16000, 1, 16, 16000), 32000)
    closed = closed_port()
    port = stream_server.port
    urls = [f"http://127.0.0.1:{port}/small.wav", f"http://127.0.0.1:{closed}/small.wav", "http://localhost:22/",
            "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", f"http://[::1]:{port}/small.wav",
            f"http://0.0.0.0:{port}/small.wav", f"http://[::ffff:127.0.0.1]:{port}/small.wav"]
    said = {u: refusal(lambda u=u: client.predict(u, api_name="/prompt_from_url")) for u in urls}
    assert all(f"{u}: {REFUSED}" in m for u, m in said.items()), said
    assert len({m.replace(u, "URL") for u, m in said.items()}) == 1  # nothing tells one from another
    assert stream_server.requests == []


def test_the_model_box_offers_names_and_allowed_folders_and_tells_nothing_of_other_paths(public, tmp_path):
    """Row 4: a name or a folder under --model-dir; /etc, /root, /nonexistent and a way out of the
    model folder are refused alike, whether they exist or not."""
    url, studio = public
    client = Client(url, verbose=False)
    assert "mine" in studio.model_choices() and "default" in studio.model_choices()
    temperature, *_ = client.predict("mine", api_name="/recommended")
    assert 0 <= temperature <= 1.5
    said = {}
    for spec in ["/etc", "/root", "/nonexistent", "../../../../etc", "mine/../../../root", str(tmp_path)]:
        said[spec] = refusal(lambda spec=spec: client.predict(spec, api_name="/recommended"))
    assert said["/etc"].startswith("etc: not a model this studio offers")  # a path is shown by its last part
    assert len({m.split(": ", 1)[1] for m in said.values()}) == 1, said  # the same words, whatever the path
    (tmp_path / "p.wav").write_bytes(wav_header(16000, 1, 16, 16000) + bytes(32000))
    assert "etc: not a model this studio offers" in refusal(
        lambda: client.predict(handle_file(str(tmp_path / "p.wav")), "/etc", 0, 0, 8, api_name="/show_guidance"))


def test_takes_are_bounded_and_a_cancelled_job_leaves_no_folder(tiny_model, tmp_path):
    """Row 3, while running: past max_takes the oldest take goes; a cancelled job leaves nothing."""
    studio = Studio(str(tiny_model), max_takes=2)
    assert studio.out_dir.name.startswith("s4music-studio-")
    try:
        for seed in (1, 2, 3):
            studio.run(None, None, options_from(1, 1, 1.0, 0, 1.0, seed, 0, 0, 8), threading.Event(),
                       lambda *a: None, lambda *a: None)
        takes = sorted(studio.out_dir.glob("take-*"))
        assert [sorted(p.name for p in t.iterdir()) for t in takes] == [["take.json", "take.png", "take.wav"]] * 2
        assert ['"seed": 2' in (t / "take.json").read_text() for t in takes] == [True, False]
        cancelled = threading.Event()
        cancelled.set()
        with pytest.raises(Cancelled):
            studio.run(None, None, options_from(1, 1, 1.0, 0, 1.0, 4, 0, 0, 8), cancelled, lambda *a: None,
                       lambda *a: None)
        assert sorted(studio.out_dir.glob("take-*")) == takes  # no empty take-* folder
    finally:
        studio.close()
    assert not studio.out_dir.exists()


def test_the_guidance_reads_as_markdown_with_the_warning_of_a_far_prompt():
    report = PromptReport(source="p.wav", seconds=8.04, source_rate=44100, source_channels=2, sample_rate=16000,
                          conversions=["mixed 2 channels down to mono", "resampled 44100 Hz to 16000 Hz"],
                          peak_dbfs=-1.0, rms_dbfs=-20.0, clipped=0.0, dc_offset=0.0, flatness=0.5, verdict=FAR,
                          reasons=["noise-like"], advice=["try music"])
    assert guidance_markdown(report) == (
        "### verdict: far from what this model knows\n"
        "8.0 s of prompt; mixed 2 channels down to mono; resampled 44100 Hz to 16000 Hz\n"
        "- noise-like\n- **advice:** try music\n\n"
        "**Warning:** the model may continue this poorly; you can continue it anyway.")
    report.verdict, report.conversions, report.reasons, report.advice = "typical", [], [], []
    assert guidance_markdown(report) == "### verdict: typical\n8.0 s of prompt; no conversion needed"


def test_the_takes_read_as_a_table_captions_and_downloads_best_first(tmp_path):
    made = Made([ShownTake(1, 8, 2.5, None, tmp_path / "take-1.wav", tmp_path / "take-1.png"),
                 ShownTake(2, 7, 3.25, "silent", tmp_path / "take-2.wav", tmp_path / "take-2.png")],
                tmp_path / "take.json", seed=7, speed_x_realtime=0.456)
    assert takes_markdown(made) == ("seed **7**, 0.46× real time\n\n| take | seed | bits/sample | degenerate |\n"
                                    "|---|---|---|---|\n| 1 | 8 | 2.500 |  |\n| 2 | 7 | 3.250 | silent |")
    assert gallery_items(made) == [(str(tmp_path / "take-1.png"), "take 1: seed 8, 2.500 bits/sample"),
                                   (str(tmp_path / "take-2.png"), "take 2: seed 7, 3.250 bits/sample")]
    assert downloads(made) == [str(tmp_path / n) for n in ("take-1.wav", "take-2.wav", "take.json")]


def test_the_progress_line_says_the_time_left_at_the_pace_so_far():
    assert progress_line(Progress(done=25, total=100, speed_x_realtime=0.5), elapsed=10.0) == \
        "sampling, 0.50× real time, about 30 s left"
    assert progress_line(Progress(done=0, total=100, speed_x_realtime=0.0), elapsed=0.5) == \
        "sampling, 0.00× real time, about 50 s left"


def test_a_generation_in_the_background_plays_and_progresses_then_finishes_or_fails(tiny_model, synth_prompt,
                                                                                   tmp_path):
    """The messages of Studio.run_in_background: Sound and Progress, then one Finished, the last;
    a prompt that cannot be read is one Failed with the CLI's line."""
    studio = Studio(str(tiny_model), out_dir=tmp_path / "out")
    messages = list(studio.run_in_background(str(synth_prompt), None, options_from(1, 2, 1.0, 0, 1.0, 3, 0, 0, 8)))
    kinds = [type(m) for m in messages]
    assert Sound in kinds and Progress in kinds and kinds[-1] is Finished and kinds.count(Finished) == 1
    sound = next(m for m in messages if isinstance(m, Sound))
    rate, pcm = sound.pcm16()
    assert rate == 16000 and pcm.dtype == np.int16 and len(pcm) > 0
    made = messages[-1].made
    assert made.seed == 3 and [t.rank for t in made.takes] == [1, 2]
    assert all(t.audio.exists() and t.spectrogram.exists() for t in made.takes) and made.sidecar.exists()
    (tmp_path / "bad.wav").write_text("not audio")
    failed = list(studio.run_in_background(str(tmp_path / "bad.wav"), None, options_from(1, 1, 1.0, 0, 1.0, 3, 0, 0, 8)))
    assert len(failed) == 1 and isinstance(failed[0], Failed) and "bad.wav: not audio" in failed[0].message


def start_studio(tmp_path, tiny_model, *args) -> tuple[subprocess.Popen, str, str]:
    """`s4music studio` in a subprocess whose temporary files go under tmp_path/tmp; once it serves:
    (process, url, what it said first)."""
    (tmp_path / "tmp").mkdir()
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(tmp_path / "tmp")}
    run = subprocess.Popen([sys.executable, "-m", "s4music.cli", "studio", "--port", str(port), "--model",
                            str(tiny_model), *args], stderr=subprocess.PIPE, text=True, env=env)
    said = ""
    while f"127.0.0.1:{port}" not in said:
        line = run.stderr.readline()
        assert line, said
        said += line
    url, deadline = f"http://127.0.0.1:{port}/", time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            break
        except OSError:
            assert run.poll() is None and time.time() < deadline, said
            time.sleep(0.2)
    return run, url, " ".join(said.split())


def test_the_studio_on_the_network_refuses_local_urls_and_leaves_nothing_after_sigterm(tmp_path, tiny_model,
                                                                                      stream_server):
    """Rows 2 and 3 through the command: served on 0.0.0.0 its URL box refuses a loopback server;
    used, then stopped by SIGTERM, it leaves no folder of its own and no Gradio cache."""
    small = stream_server.add("/small.wav", wav_header(16000, 1, 16, 2 * 16000), 4 * 16000)
    run, url, said = start_studio(tmp_path, tiny_model, "--host", "0.0.0.0")
    try:
        assert "warning: serving on 0.0.0.0" in said and "fetches public addresses only" in said
        client = Client(url, verbose=False)
        assert f"{small}: {REFUSED}" in refusal(lambda: client.predict(small, api_name="/prompt_from_url"))
        assert stream_server.requests == []
        prompt = tmp_path / "prompt.wav"
        prompt.write_bytes(wav_header(16000, 1, 16, 16000) + bytes(32000))
        client.predict(handle_file(str(prompt)), None, 1, 1, 1.0, 0, 1.0, 3, 0, 0, 8, api_name="/generate")
        (folder,) = (tmp_path / "tmp").glob("s4music-studio-*")
        assert list(folder.glob("take-*/take.wav")) and (folder / "gradio").is_dir()  # Gradio's cache inside
    finally:
        run.send_signal(signal.SIGTERM)
        run.communicate(timeout=60)
    assert run.returncode == 130
    assert list((tmp_path / "tmp").iterdir()) == []


def test_allow_local_urls_lifts_the_filter_and_ctrl_c_leaves_nothing(tmp_path, tiny_model, stream_server):
    small = stream_server.add("/small.wav", wav_header(16000, 1, 16, 2 * 16000), 4 * 16000)
    run, url, said = start_studio(tmp_path, tiny_model, "--host", "0.0.0.0", "--allow-local-urls")
    try:
        assert "fetches any address (--allow-local-urls)" in said
        got = Client(url, verbose=False).predict(small, api_name="/prompt_from_url")
        assert sf.info(got).duration == pytest.approx(2.0)
    finally:
        run.send_signal(signal.SIGINT)
        run.communicate(timeout=60)
    assert run.returncode == 130
    assert list((tmp_path / "tmp").iterdir()) == []


def test_the_command_binds_to_localhost_and_warns_when_told_otherwise(tmp_path, tiny_model):
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    run = subprocess.Popen([sys.executable, "-m", "s4music.cli", "studio", "--host", "0.0.0.0", "--port", str(port),
                            "--model", str(tiny_model)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        said = ""
        while f"127.0.0.1:{port}" not in said:
            line = run.stderr.readline()
            assert line, said
            said += line
        said = " ".join(said.split())
        assert "warning: serving on 0.0.0.0: anyone who can reach it can use the studio" in said
    finally:
        run.terminate()
        run.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """The studio with the bundled model on 127.0.0.1, and Debian's Chromium (headless, driven by
    Playwright): yields open_tab(), which opens the page in a fresh tab."""
    chromium = shutil.which("chromium")
    if chromium is None:
        from conftest import need

        need(False, "chromium (Debian package)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    page, url = launch(Studio(out_dir=tmp_path_factory.mktemp("browser")))
    try:
        with sync_playwright() as p:
            chrome = p.chromium.launch(executable_path=chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])

            def open_tab():
                tab = chrome.new_page(viewport={"width": 1280, "height": 1400})
                tab.goto(url, wait_until="networkidle")
                return tab

            yield open_tab
            chrome.close()
    finally:
        page.close()


def test_the_page_in_a_real_browser_continues_the_example_prompt(browser):
    """Upload examples/prompt.wav, see the guidance, press continue, and wait for the player to have
    a playable source. The player, the table of takes, the spectrograms and the downloads appear only
    then: a fresh page has no empty panels. Screenshots of both are kept as test artifacts."""
    tab = browser()
    panels = ["#player", "#takes", "#spectrograms", "#downloads"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(ARTIFACTS / "studio-fresh.png"), full_page=True)
    assert [tab.locator(p).is_visible() for p in panels] == [False] * 4
    tab.locator("#prompt input[type=file]").first.set_input_files(str(ROOT / "examples" / "prompt.wav"))
    tab.wait_for_function("document.querySelector('#guidance').innerText.includes('verdict: typical')",
                          timeout=120_000)
    tab.locator("#continue").click()
    tab.wait_for_function("() => { const a = document.querySelector('#player audio');"
                          " return a && a.src && a.readyState >= 2; }", timeout=180_000)
    tab.wait_for_function("document.querySelector('#takes')?.innerText.includes('bits/sample')", timeout=180_000)
    assert [tab.locator(p).is_visible() for p in panels] == [True] * 4
    tab.screenshot(path=str(ARTIFACTS / "studio.png"), full_page=True)
    assert (ARTIFACTS / "studio.png").stat().st_size > 50_000


def test_continue_waits_for_a_prompt(browser, synth_prompt):
    """Greyed out on a fresh page; live once a file is chosen; greyed out again when it is cleared."""
    tab = browser()
    assert tab.locator("#continue").is_disabled()
    tab.locator("#prompt input[type=file]").first.set_input_files(str(synth_prompt))
    tab.wait_for_function("!document.querySelector('#continue').disabled", timeout=60_000)
    tab.locator("#prompt button[aria-label=Clear]").click()
    tab.wait_for_function("document.querySelector('#continue').disabled", timeout=60_000)


def test_the_bundled_example_is_one_click_away(browser):
    """A musician without a file of their own clicks the example under the prompt: it is read, and
    continue comes alive."""
    tab = browser()
    tab.locator("#example").get_by_text("a Bach chorale on piano").click()
    tab.wait_for_function("document.querySelector('#guidance').innerText.includes('verdict: typical')",
                          timeout=120_000)
    assert "5.0 s of prompt" in tab.locator("#guidance").inner_text()
    tab.wait_for_function("!document.querySelector('#continue').disabled", timeout=60_000)


def test_each_sampling_control_says_what_it_does_in_words(tiny_model, tmp_path):
    """temperature, top-k and top-p carry a line of `info` on both tabs, as does the guidance by the prompt."""
    page = build(Studio(str(tiny_model), out_dir=tmp_path))
    info = {}
    for block in page.blocks.values():
        if isinstance(getattr(block, "label", None), str):
            info.setdefault(block.label.split(" (")[0], []).append(getattr(block, "info", None))
    assert info["temperature"] == ["lower: safer, more repetitive; higher: bolder, noisier"] * 2
    for name, tabs in (("top-k", 2), ("top-p", 2), ("guidance by the prompt", 1)):
        assert len(info[name]) == tabs and all(info[name]), (name, info[name])
