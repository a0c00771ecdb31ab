"""`fetch` against a real HTTP server on 127.0.0.1 serving real recordings."""

import json
import shutil
import time

import pytest
import soundfile as sf
from conftest import StreamServer, closed_port, wav_header

from s4music.addresses import public_address
from s4music.data.fetch import REFUSED, FetchError, FetchOptions, check_url, fetch, safe_name

MB = 1024 * 1024


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


# ------------------------------------------------------------------ sizes and lengths, while downloading


def settled(server: StreamServer, path: str) -> int:
    """The bytes the server wrote for `path`, once that no longer grows (the client let go)."""
    last = -1
    while server.sent.get(path, 0) != last:
        last = server.sent.get(path, 0)
        time.sleep(0.3)
    return last


def test_a_download_stops_once_past_its_size_limit(stream_server, tmp_path):
    """2.7 h of silence behind a valid WAV header (297 MB), and a stream without end or length:
    each stopped near the limit with one line, nothing written."""
    frames = int(2.7 * 3600 * 16000)
    big = stream_server.add("/big.wav", wav_header(16000, 1, 16, frames), frames * 2)
    endless = stream_server.add("/endless.wav", wav_header(16000, 1, 16, None), None)
    report = fetch([big, endless], tmp_path / "out", FetchOptions(max_mb=5, timeout=10))
    reasons = dict(report.failed)
    assert report.fetched == [] and set(reasons) == {big, endless}
    assert reasons[big] == f"{big}: 297 MB, more than the 5 MB limit"
    assert reasons[endless] == f"{endless}: more than the 5 MB limit (stopped there)"
    assert settled(stream_server, "/big.wav") < 64 * MB  # the sniff and the download, socket buffers included
    assert settled(stream_server, "/endless.wav") < 64 * MB
    assert not (tmp_path / "out").exists()  # nothing came of it: nothing left


def test_a_download_longer_than_its_limit_is_refused_from_its_header(stream_server, short_recording, http_server,
                                                                      tmp_path):
    """A two-hour WAV (58 MB, under the size limit) is refused once its header is in; a real Ogg
    recording (9 s), whose header does not say, once it is whole, before it is decoded."""
    frames = 2 * 3600 * 8000
    long = stream_server.add("/long.wav", wav_header(8000, 1, 8, frames), frames)
    root, base = http_server
    shutil.copy(short_recording, root / "song.ogg")
    report = fetch([long, f"{base}/song.ogg"], tmp_path / "out", FetchOptions(max_mb=100, max_minutes=0.1))
    reasons = dict(report.failed)
    assert reasons[long] == f"{long}: 120.0 min long, more than the 0.1 min limit"
    seconds = sf.info(str(short_recording)).duration
    assert reasons[f"{base}/song.ogg"] == f"{base}/song.ogg: {seconds:.1f} s long, more than the 0.1 min limit"
    assert settled(stream_server, "/long.wav") < 32 * MB  # of 58
    assert not (tmp_path / "out").exists()
    # within the limits, the same recording is fetched
    report = fetch([f"{base}/song.ogg"], tmp_path / "out", FetchOptions(max_mb=1, max_minutes=0.2))
    assert report.failed == [] and len(report.fetched) == 1


def test_the_cli_takes_size_and_length_limits(cli, stream_server, tmp_path):
    frames = 30 * 60 * 16000
    url = stream_server.add("/half-hour.wav", wav_header(16000, 1, 16, frames), frames * 2)
    code, _, err = cli("fetch", url, "-o", tmp_path / "out", "--max-mb", "10")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and lines[0] == f"failed: {url}: 55 MB, more than the 10 MB limit", err
    code, _, err = cli("fetch", url, "-o", tmp_path / "out", "--max-minutes", "20")
    assert code == 1 and f"failed: {url}: 30.0 min long, more than the 20 min limit" in err
    assert not (tmp_path / "out").exists()
    code, _, err = cli("fetch", url, "-o", tmp_path / "out", "--max-mb", "-1")
    assert code == 1 and "--max-mb and --max-minutes are 0 (no limit) or more" in err


# ------------------------------------------------------------------ the address filter


LOCAL = ["127.0.0.1", "127.255.0.9", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1",
         "0.0.0.0", "255.255.255.255", "224.0.0.1", "::1", "::", "fc00::1", "fd00:ec2::254", "fe80::1",
         "fe80::1%lo", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1", "2002:7f00:1::1",
         "64:ff9b::a00:1", "ff02::1", "2001:db8::1"]


def test_only_public_addresses_are_public():
    assert [a for a in LOCAL if public_address(a)] == []
    assert all(public_address(a) for a in ("8.8.8.8", "151.101.1.1", "2606:4700::1111", "2002:808:808::1"))


@pytest.mark.parametrize("host", ["169.254.169.254", "10.0.0.1", "[::1]", "0.0.0.0", "localhost", "127.1",
                                  "[::ffff:127.0.0.1]", "[fe80::1]", "[fc00::1]", "2130706433"])
def test_a_url_at_a_local_address_is_refused_before_any_request(host):
    url = f"http://{host}:8000/song.wav"
    with pytest.raises(FetchError) as e:
        check_url(url, public_address)
    assert str(e.value) == f"{url}: {REFUSED}"
    check_url(url)  # without the filter, any address, as curl


def test_every_hop_is_checked_and_open_and_closed_ports_read_alike(stream_server, tmp_path):
    """A redirect from an allowed server to a refused one is refused at that hop; the refused server
    hears nothing; a closed port and an open one give the same words."""
    inner = StreamServer()  # the server behind the redirect: loopback, as the refused kinds are
    try:
        secret = inner.add("/secret.wav", wav_header(16000, 1, 16, 16000), 32000)
        hop = stream_server.redirect("/hop.wav", secret)
        allow_first = lambda address, port: port == stream_server.port  # noqa: E731 (the first server stands in for a public one)
        report = fetch([hop], tmp_path / "out", FetchOptions(allow_address=allow_first, timeout=5))
        assert report.failed == [(hop, f"{hop}: {REFUSED}")]
        assert stream_server.requests[0] == "/hop.wav" and inner.requests == []
        assert not (tmp_path / "out").exists()
        # the filter of the studio: an open port and a closed one are refused in the same words
        urls = [secret, f"http://127.0.0.1:{closed_port()}/secret.wav", "http://localhost:22/"]
        report = fetch(urls, tmp_path / "out", FetchOptions(allow_address=public_address, timeout=5))
        assert [r.removeprefix(u) for u, r in report.failed] == [f": {REFUSED}"] * 3
        assert inner.requests == []
        # without the filter, the redirect is followed
        report = fetch([hop], tmp_path / "out", FetchOptions(timeout=5))
        assert report.failed == [] and set(inner.requests) == {"/secret.wav"}
    finally:
        inner.close()


def test_the_proxy_tunnels_only_to_allowed_addresses(stream_server):
    """https goes through CONNECT: a tunnel to an allowed address carries bytes both ways; one to a
    refused address is answered 403 and never opened."""
    import socket

    from s4music.addresses import AddressProxy

    stream_server.add("/a.wav", wav_header(8000, 1, 8, 100), 100)
    allowed = lambda address, port: port == stream_server.port  # noqa: E731
    with AddressProxy(allowed, timeout=5) as proxy:
        port = int(proxy.url.rsplit(":", 1)[1])
        for target, expect in ((f"127.0.0.1:{stream_server.port}", b"200"), ("127.0.0.1:9", b"403"),
                               ("localhost:22", b"403")):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
                reply = s.recv(4096)
                assert reply.split()[1] == expect, (target, reply)
                if expect == b"200":
                    s.sendall(b"GET /a.wav HTTP/1.0\r\n\r\n")
                    body = b""
                    while part := s.recv(65536):
                        body += part
                    assert body.startswith(b"HTTP/1.0 200") and body.endswith(bytes(100))
        assert proxy.refused
    assert stream_server.requests == ["/a.wav"]
