"""Files from the Hugging Face Hub, through `huggingface_hub`: its cache (HF_HOME), resumable
downloads, HF_HUB_OFFLINE, HF_ENDPOINT (a mirror, or a local server in the tests) and a token when
one is set (HF_TOKEN). Every failure becomes one line naming the repository and the file.

    path = download("krandiash/sashimi-release", "checkpoints/sashimi_youtubemix.pt")
    names = list_files("krandiash/youtubemix", repo_type="dataset")
"""

from __future__ import annotations

import logging
import socket
import urllib.parse
import urllib.request
from pathlib import Path

from s4music.errors import S4MusicError, first_line

log = logging.getLogger(__name__)


class HubError(S4MusicError):
    pass


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _reachable() -> bool:
    """Whether the Hub's address takes a connection, tried once: its client retries an unreachable
    address five times, 23 s before an offline machine hears so. Through a proxy, or with
    HF_HUB_OFFLINE set, the client decides alone."""
    from huggingface_hub import constants

    url = urllib.parse.urlsplit(_endpoint())
    if constants.HF_HUB_OFFLINE or urllib.request.getproxies().get(url.scheme):
        return True
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=constants.HF_HUB_ETAG_TIMEOUT).close()
        return True
    except OSError:
        return False


def _offline(where: str) -> HubError:
    return HubError(f"{where}: not downloaded yet, and the Hub cannot be reached (offline, HF_HUB_OFFLINE=1, or "
                    f"{_endpoint()} unreachable); run it once with network access")


def _explain(e: Exception, repo: str, filename: str | None, revision: str) -> HubError:
    from huggingface_hub import errors

    where = f"{repo}/{filename}" if filename else repo
    if isinstance(e, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        return _offline(where)
    if isinstance(e, errors.RepositoryNotFoundError):
        return HubError(f"{repo}: no such repository on {_endpoint()} (or a private one: set HF_TOKEN)")
    if isinstance(e, errors.RevisionNotFoundError):
        return HubError(f"{repo}: no revision {revision!r}")
    if isinstance(e, errors.EntryNotFoundError):
        return HubError(f"{where}: no such file in the repository (revision {revision})")
    return HubError(f"{where}: download failed ({first_line(e)}); run again to resume it")


def download(repo: str, filename: str, revision: str = "main", repo_type: str = "model") -> Path:
    """The file in the local cache, downloaded (or resumed) first where needed (the cached one when the
    Hub cannot be reached)."""
    from huggingface_hub import hf_hub_download

    local = not _reachable()
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, repo_type=repo_type, local_files_only=local))
    except Exception as e:  # the Hub client and its HTTP stack raise many types; each becomes one line
        raise _explain(e, repo, filename, revision) from None


def cached(repo: str, filename: str, revision: str = "main", repo_type: str = "model") -> Path | None:
    """The file if it is in the local cache (no network); else None. Read from the cache's documented
    layout (as huggingface_hub's try_to_load_from_cache does), since the client's own lookup imports
    its HTTP stack, a fifth of a second that `s4music models` would wait on."""
    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo.replace('/', '--')}"
    ref = root / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    found = root / "snapshots" / commit / filename
    return found if found.is_file() else None


def list_files(repo: str, revision: str = "main", repo_type: str = "model") -> list[str]:
    """Every file of a repository at `revision`."""
    from huggingface_hub import HfApi

    if not _reachable():
        raise _offline(repo)
    try:
        return HfApi().list_repo_files(repo, revision=revision, repo_type=repo_type)
    except Exception as e:  # as in download
        raise _explain(e, repo, None, revision) from None


def forget(path: Path) -> None:
    """Remove a downloaded file that turned out broken from the cache (its snapshot link and the blob
    it points to), so the next run downloads it afresh."""
    blob = path.resolve()
    for p in {path, blob}:
        if p.exists() or p.is_symlink():
            p.unlink()
    log.info("removed %s from the Hub cache", path)
