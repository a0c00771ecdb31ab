"""`s4music studio`: the page's functions through its API (gradio_client), and the page in a real
browser (Debian's Chromium, driven by Playwright)."""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).parent.parent
ARTIFACTS = Path(os.environ.get("S4MUSIC_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts"))
gradio = pytest.importorskip("gradio", reason="gradio is installed by `make install`")
pytestmark = pytest.mark.slow  # a web server, a page and its clients
from gradio_client import Client, handle_file  # noqa: E402

from s4music.studio import Studio, build  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, request):
    """The studio on 127.0.0.1 with a small untrained model by default; yields (url, studio)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    model = request.getfixturevalue("tiny_model")
    studio = Studio(str(model), out_dir=tmp_path_factory.mktemp("studio"), max_prompt_minutes=0.2)
    page = build(studio)
    page.queue(default_concurrency_limit=1)
    port = free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(studio.out_dir)])
    yield f"http://127.0.0.1:{port}/", studio
    page.close()


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
    with pytest.raises(Exception, match="bad.wav: not audio"):
        client.predict(handle_file(str(tmp_path / "bad.wav")), None, 0, 0, 8, api_name="/show_guidance")
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
        assert "warning: serving on 0.0.0.0: anyone who can reach this machine can use the studio" in said
    finally:
        run.terminate()
        run.wait(timeout=30)


def test_the_page_in_a_real_browser_continues_the_example_prompt(tmp_path):
    """Debian's Chromium, headless: upload examples/prompt.wav, see the guidance, press continue, and
    wait for the player to have a playable source. A screenshot is kept as a test artifact."""
    chromium = shutil.which("chromium")
    if chromium is None:
        from conftest import need

        need(False, "chromium (Debian package)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    studio = Studio(out_dir=tmp_path / "out")  # the bundled model
    page = build(studio)
    page.queue(default_concurrency_limit=1)
    port = free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(studio.out_dir)])
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            tab = browser.new_page(viewport={"width": 1280, "height": 1400})
            tab.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
            tab.locator("#prompt input[type=file]").first.set_input_files(str(ROOT / "examples" / "prompt.wav"))
            tab.wait_for_function("document.querySelector('#guidance').innerText.includes('verdict: typical')",
                                  timeout=120_000)
            tab.locator("#continue").click()
            started = time.time()
            tab.wait_for_function("() => { const a = document.querySelector('#player audio');"
                                  " return a && a.src && a.readyState >= 2; }", timeout=180_000)
            assert time.time() - started < 180
            tab.wait_for_function("document.querySelector('#takes').innerText.includes('bits/sample')",
                                  timeout=180_000)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            tab.screenshot(path=str(ARTIFACTS / "studio.png"), full_page=True)
            browser.close()
    finally:
        page.close()
    assert (ARTIFACTS / "studio.png").stat().st_size > 50_000
