"""`fetch` against a real HTTP server on 127.0.0.1 serving real recordings."""

import json
import shutil

import pytest
import soundfile as sf

from s4music.data.fetch import FetchError, FetchOptions, check_url, fetch, safe_name


def test_fetch_downloads_converts_and_writes_a_sidecar(http_server, short_recording, tmp_path):
    root, base = http_server
    shutil.copy(short_recording, root / "song.ogg")
    report = fetch([f"{base}/song.ogg"], tmp_path / "out", FetchOptions(start=1.0, end=4.0))
    assert report.failed == [] and len(report.fetched) == 1
    item = report.fetched[0]
    info = sf.info(str(item.audio))
    assert info.samplerate == 16000 and info.channels == 1 and info.duration == pytest.approx(3.0, abs=0.01)
    assert item.original.read_bytes() == short_recording.read_bytes()  # the original is kept as is
    meta = json.loads(item.sidecar.read_text())
    assert meta["url"] == f"{base}/song.ogg" and meta["title"] == "song"
    assert meta["source_sample_rate"] == 44100 and meta["source_channels"] == 2


def test_bad_urls_fail_alone_with_one_line_reasons(http_server, short_recording, tmp_path):
    root, base = http_server
    shutil.copy(short_recording, root / "good.ogg")
    (root / "page.html").write_text("<html><body><p>No music here.</p></body></html>")
    (root / "broken.ogg").write_bytes(b"OggS" + b"\x00" * 2000)
    urls = {
        "malformed": "htp:/nonsense",
        "404": f"{base}/missing.ogg",
        "refused": "http://127.0.0.1:9/song.ogg",
        "no-audio page": f"{base}/page.html",
        "not decodable": f"{base}/broken.ogg",
        "good": f"{base}/good.ogg",
    }
    report = fetch(list(urls.values()), tmp_path / "out", FetchOptions(timeout=5))
    assert [f.url for f in report.fetched] == [urls["good"]]
    reasons = dict(report.failed)
    assert set(reasons) == set(urls.values()) - {urls["good"]}
    for url, reason in reasons.items():
        assert reason.startswith(url + ": ") and "\n" not in reason
    assert "not a valid" in reasons[urls["malformed"]]
    assert "404" in reasons[urls["404"]]
    assert "refused" in reasons[urls["refused"]].lower()
    assert "unsupported site" in reasons[urls["no-audio page"]]
    assert "decode" in reasons[urls["not decodable"]].lower() or "not audio" in reasons[urls["not decodable"]]


def test_hostile_titles_cannot_escape_the_output_directory():
    assert safe_name("../../etc/passwd") == "etc_passwd"
    assert safe_name("..") == "audio"
    assert safe_name("/abs/olute") == "abs_olute"
    assert safe_name("Café: 𝄞 Night / Day?") == "Cafe_Night_Day"
    assert len(safe_name("x" * 500)) == 100


def test_youtube_without_a_javascript_runtime_says_how_to_fix_it(monkeypatch):
    monkeypatch.setattr("s4music.data.fetch.js_runtimes", lambda: {})
    with pytest.raises(FetchError, match="deno"):
        check_url("https://www.youtube.com/watch?v=abc")


def test_a_page_with_several_recordings_is_a_playlist_and_items_select(http_server, recordings, tmp_path):
    root, base = http_server
    names = []
    for i, recording in enumerate(sorted(recordings)[:3]):
        names.append(f"track{i}.ogg")
        shutil.copy(recording, root / names[-1])
    players = "".join(f'<audio controls src="{name}"></audio>' for name in names)
    (root / "album.html").write_text(f"<html><head><title>Album</title></head><body>{players}</body></html>")
    report = fetch([f"{base}/album.html"], tmp_path / "out", FetchOptions(playlist_items="1,3"))
    assert report.failed == []
    kept = [item.original.read_bytes() for item in report.fetched]
    assert kept == [(root / names[0]).read_bytes(), (root / names[2]).read_bytes()]
    assert len({item.audio for item in report.fetched}) == 2  # each item has its own file
