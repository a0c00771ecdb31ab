"""Models by name: the bundled one, the paper's released checkpoints on the Hugging Face Hub, or a path.

    load_model("default")               # the bundled 4.75M SaShiMi
    load_model("youtubemix")            # the paper's piano model: downloaded, converted once, cached
    load_model("runs/mine/best")        # an s4music checkpoint directory
    load_model("sashimi_youtubemix.pt") # an official SaShiMi checkpoint, imported

Every command that takes a model (`--model`, `--from`, `eval MODEL`) takes what `resolve_model`
understands; omitting it means `default`. A named model is downloaded through `s4music.hub`, and
its official `.pt` converted to our format once, into S4MUSIC_CACHE/models, keyed by the Hub
commit it came from; later runs load the conversion (with HF_HUB_OFFLINE=1, with no request).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from s4music import hub
from s4music.errors import did_you_mean
from s4music.extensions import cache_home

if TYPE_CHECKING:  # the names and the listing need no torch: `s4music models` answers at once
    import torch

    from s4music.model.sashimi import SaShiMi

log = logging.getLogger(__name__)
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "default-model"
DEFAULT_NAME = "default"


@dataclass(frozen=True)
class NamedModel:
    name: str
    repo: str  # on the Hugging Face Hub
    filename: str
    revision: str
    licence: str
    size_mb: float | None  # of the download, where known
    about: str  # what it is good for, in words
    domain: str  # what it was trained on; guidance quotes it
    kind: str = "music"  # or "speech": guidance says so when it is given music
    test_bits: float | None = None  # the paper's test NLL, bits/sample (guidance compares prompts to it)


# The checkpoints released with the paper (state-spaces/s4: "checkpoints/<model>_<dataset>.pt").
NAMED = {m.name: m for m in (
    NamedModel("youtubemix", "krandiash/sashimi-release", "checkpoints/sashimi_youtubemix.pt", "main",
               "Apache-2.0 (state-spaces/s4)", 27.0,
               "the paper's SaShiMi on YouTubeMix, solo piano; 600K steps; the best piano model here",
               "solo piano (YouTubeMix)", test_bits=1.294),
    NamedModel("sc09", "krandiash/sashimi-release", "checkpoints/sashimi_sc09.pt", "main",
               "Apache-2.0 (state-spaces/s4)", None,
               "the paper's SaShiMi on SC09: spoken digits, one second each; speech, not music",
               "spoken digits (SC09 speech)", kind="speech"),
)}


def cache_root() -> Path:
    return cache_home() / "models"


def _commit_of(path: Path) -> str:
    """The Hub commit a cached file came from (its snapshot directory's name)."""
    m = re.search(r"snapshots/([0-9a-f]{40})/", path.as_posix())
    return m.group(1)[:12] if m else "local"


def _converted(named: NamedModel) -> Path:
    """The named model in our format: downloaded and converted the first time, from the cache after."""
    pt = hub.download(named.repo, named.filename, named.revision)
    target = cache_root() / f"{named.name}-{_commit_of(pt)}"
    if (target / "config.json").exists():
        return target
    from s4music.model.checkpoint import CheckpointError, import_official, save_model

    log.info("converting %s (%s) to s4music's format, once", named.name, named.filename)
    try:
        model = import_official(pt)
    except CheckpointError as e:
        hub.forget(pt)  # a file that is not a checkpoint does not stay cached
        raise CheckpointError(f"{named.repo}/{named.filename}: {str(e).replace(str(pt) + ': ', '')}") from None
    summary = {**model.summary, "name": named.name, "hub": f"{named.repo}/{named.filename}@{named.revision}",
               "domain": named.domain, "kind": named.kind, "licence": named.licence}
    if named.test_bits is not None:
        summary["test_bits"] = named.test_bits
    return save_model(model, target, summary=summary)


def resolve_model(spec: str | Path | None) -> Path:
    """The checkpoint a model name or path stands for: None or "default" is the bundled model."""
    from s4music.model.checkpoint import CheckpointError

    if spec is None or str(spec) == DEFAULT_NAME:
        if not (DEFAULT_MODEL / "config.json").exists():
            raise CheckpointError(f"{DEFAULT_MODEL}: the bundled model is missing from this installation")
        return DEFAULT_MODEL
    if str(spec) in NAMED:
        return _converted(NAMED[str(spec)])
    path = Path(spec)
    if not path.exists():
        hint = did_you_mean(str(spec), [DEFAULT_NAME, *NAMED])
        raise CheckpointError(f"{spec}: no such file or directory, and not a model name{hint} "
                              f"(names: {', '.join([DEFAULT_NAME, *NAMED])}; `s4music models` lists them)")
    return path


def load_model(spec: str | Path | None = None, device: str | torch.device = "cpu") -> SaShiMi:
    """Load a model by name or path (see `resolve_model`), in eval mode, float32."""
    from s4music.model.checkpoint import load_checkpoint

    return named(load_checkpoint(resolve_model(spec), device=device), spec)


def named(net: SaShiMi, spec: str | Path | None) -> SaShiMi:
    """`net`, named as the user named it (None: the bundled model's name), for advice and logs."""
    net.name = str(spec) if spec is not None else DEFAULT_NAME
    return net


def checkpoints_under(root: Path) -> list[Path]:
    """The checkpoint directories (each holds a config.json) one to three levels under `root`."""
    return sorted(c.parent for depth in ("*", "*/*", "*/*/*") for c in root.glob(f"{depth}/config.json"))


def _local_row(path: Path) -> dict:
    """A checkpoint directory's row for `list_models`, from its config.json alone (no weights read)."""
    try:
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6
        summary = json.loads((path / "config.json").read_text()).get("summary") or {}
    except (OSError, ValueError, AttributeError):
        return {"name": str(path), "source": "a folder here", "about": "config.json unreadable", "cached": "here",
                "size_mb": None}
    run, step = summary.get("mode"), summary.get("step", "?")
    if run and step == 0:  # a fine-tune's best/ that no step beat
        run = f"{run}'s start ({summary.get('from')})"
    elif run:
        run = f"{run} to step {step}"
    figures = [f"{split} {summary[key]:.2f} bits/sample" for split, key in (("val", "val_bits"), ("test", "test_bits"))
               if isinstance(summary.get(key), float)]
    about = "; ".join(filter(None, [summary.get("domain"), run, *figures])) or "a checkpoint"
    return {"name": str(path), "source": "a folder here", "about": about, "cached": "here", "size_mb": size}


def list_models(folders: Iterable[Path] = ()) -> list[dict]:
    """Every name, with where it comes from and whether it is here already (no network); then the
    checkpoint directories under `folders` (`checkpoints_under`)."""
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.iterdir()) / 1e6 if DEFAULT_MODEL.is_dir() else None
    rows = [{"name": DEFAULT_NAME, "source": "bundled with s4music", "about": "4.75M SaShiMi on piano renders "
             "and game-soundtrack recordings; see its MODEL_CARD.md", "cached": "yes", "size_mb": size}]
    for m in NAMED.values():
        pt = hub.cached(m.repo, m.filename, m.revision)
        converted = pt is not None and (cache_root() / f"{m.name}-{_commit_of(pt)}" / "config.json").exists()
        rows.append({"name": m.name, "source": f"{m.repo}/{m.filename}", "about": m.about, "size_mb": m.size_mb,
                     "cached": "converted" if converted else "downloaded" if pt else "no"})
    return rows + [_local_row(path) for folder in folders for path in checkpoints_under(Path(folder))]
