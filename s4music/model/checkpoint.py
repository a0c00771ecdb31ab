"""Checkpoints: our own format, and import of the SaShiMi checkpoints released with the paper.

Our format is a directory holding `model.safetensors` (tensors only) and `config.json` (model
config, audio format, free-form training summary). Nothing is unpickled on load.

Official checkpoints (`sashimi_youtubemix.pt` and friends) are torch pickles of a plain state dict
of the official experiment model. They are read with `torch.load(weights_only=True)`, which only
rebuilds tensors and containers. Two layouts exist: V4 (as listed in the reference key table) and
the older V3. See `import_official`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from s4music.files import sha256_of, write_json
from s4music.errors import S4MusicError, first_line
from s4music.model.config import AudioFormat, S4Config, SaShiMiConfig
from s4music.model.sashimi import SaShiMi

FORMAT = "s4music"
FORMAT_VERSION = 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"


class CheckpointError(S4MusicError, ValueError):
    """A checkpoint that cannot be read; the message names the file and the reason."""


# ------------------------------------------------------------------------------------------
# Our format

KEEP_FLOAT32 = ("A_real", "A_imag", "P", "B", "C", "inv_dt", "D")  # the S4 layers' parameters


def save_model(model: SaShiMi, directory: str | Path, summary: dict | None = None,
               dtype: torch.dtype | None = None, extra: Callable[[Path], None] | None = None) -> Path:
    """Write the checkpoint directory atomically: a reader sees the old one or the new one.

    `dtype` (e.g. torch.float16) stores floating tensors smaller, except the S4 layers' own
    parameters (KEEP_FLOAT32: 5% of the default model's), whose rounding costs a clear part of a bit
    per sample; they load back as float32. The rest in float16 moved a fine-tuned default model's
    bits/sample by 1e-5 on its test windows.
    `extra(tmp_dir)` may add files (training state) that then commit together with the model.
    """
    directory = Path(directory)
    if directory.exists() and not (directory / CONFIG).exists() and any(directory.iterdir()):
        raise CheckpointError(f"{directory}: exists and is not an s4music checkpoint; not replacing it")
    if summary is not None:
        model.summary = dict(summary)
    def stored(name: str, v: torch.Tensor) -> torch.Tensor:
        smaller = dtype is not None and v.is_floating_point() and name.rsplit(".", 1)[-1] not in KEEP_FLOAT32
        return (v.to(dtype) if smaller else v).detach().contiguous().cpu()

    tensors = {k: stored(k, v) for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "parameters": model.num_parameters(),
        "model": model.config.to_dict(),
        "audio": vars(model.audio),
        "summary": getattr(model, "summary", {}),
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        if extra is not None:
            extra(tmp)
        # sizes and checksums of everything but the config, so a torn or changed file is named on load
        meta["files"] = {f.name: {"size": f.stat().st_size, "sha256": sha256_of(f)} for f in sorted(tmp.iterdir())}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, old / "ckpt")
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def verify_checkpoint(directory: str | Path) -> None:
    """Raise a CheckpointError naming the first file of `directory` whose size or checksum differs
    from what was recorded when it was saved (checkpoints saved before checksums pass as they are)."""
    directory = Path(directory)
    for name, expected in _read_meta(directory).get("files", {}).items():
        path = directory / name
        if not path.exists():
            raise CheckpointError(f"{path}: missing (the checkpoint was saved with it)")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"{path}: damaged: {size} bytes, {expected['size']} when it was saved")
        if sha256_of(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: damaged: its checksum differs from the one recorded when it was saved")


def convert_official(source: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Import an official SaShiMi checkpoint and write it in our format."""
    return save_model(import_official(source), out, dtype=dtype)


def _read_meta(directory: Path) -> dict[str, Any]:
    try:
        meta = json.loads((directory / CONFIG).read_text())
    except FileNotFoundError:
        runs = [f"{directory / d}" for d in ("best", "model") if (directory / d / CONFIG).exists()]
        hint = f" (a training run: its models are {' and '.join(runs)})" if runs else ""
        raise CheckpointError(f"{directory}: no {CONFIG}; not an s4music checkpoint{hint}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{directory / CONFIG}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory / CONFIG}: not an s4music checkpoint config")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{directory}: written by a newer s4music (format {meta['format_version']})")
    return meta


def read_summary(path: str | Path) -> dict[str, Any]:
    """A checkpoint's summary, from its config.json alone (no weights read)."""
    return _read_meta(Path(path)).get("summary") or {}


def update_summary(path: str | Path, fields: dict[str, Any]) -> None:
    """Merge `fields` into a checkpoint's summary (config.json only; weights untouched), atomically."""
    directory = Path(path)
    meta = _read_meta(directory)
    meta["summary"] = {**meta.get("summary", {}), **fields}
    write_json(directory / CONFIG, meta)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> SaShiMi:
    """Load an s4music checkpoint directory (or its model.safetensors), or import an official
    SaShiMi `.pt` checkpoint. Returns the model in eval mode, float32."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file() and path.suffix in (".pt", ".pth", ".ckpt"):
        return import_official(path).to(device).eval()
    if path.is_file() and path.name not in (WEIGHTS, CONFIG):  # not its folder's name: rag.mp3 is no model
        raise CheckpointError(f"{path}: not a model; give an s4music checkpoint directory (or its {WEIGHTS}) or "
                              "an official .pt")
    directory = path if path.is_dir() else path.parent
    meta = _read_meta(directory)
    verify_checkpoint(directory)
    try:
        config = SaShiMiConfig.from_dict(meta["model"])
        audio = AudioFormat(**meta.get("audio", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / CONFIG}: bad model config ({e})") from None
    try:
        tensors = load_file(str(directory / WEIGHTS))
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {WEIGHTS}") from None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{directory / WEIGHTS}: unreadable ({e})") from None
    model = SaShiMi(config)
    _load_strict(model, {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()},
                 str(directory / WEIGHTS))
    model.audio = audio
    model.summary = meta.get("summary", {})
    return model.to(device).eval()


def _load_strict(model: SaShiMi, tensors: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: keys do not match the model; missing {_short(missing)}, unexpected {_short(unexpected)}"
        )
    bad = [f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in tensors.items()
           if v.shape != expected[k].shape]
    if bad:
        raise CheckpointError(f"{source}: shapes do not match the model: {_short(bad)}")
    model.load_state_dict(tensors)


def _short(keys: list[str], limit: int = 12) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + "]" + more


# ------------------------------------------------------------------------------------------
# Official SaShiMi checkpoints

# Official key -> ours. Block-level names ("rest") are mapped by _BLOCK_RULES below.
_TOP_RULES = [
    (r"encoder\.0\.weight", "encoder.weight"),
    (r"decoder\.0\.output_transform\.(weight|bias)", r"decoder.\1"),
    (r"model\.norm\.(weight|bias)", r"norm.\1"),
    (r"model\.d_layers\.(\d+)\.linear\.(weight_g|weight_v|bias)", r"down_pools.\1.linear.\2"),
    (r"model\.u_layers\.(\d+)\.0\.linear\.(weight_g|weight_v|bias)", r"up_blocks.\1.pool.linear.\2"),
]
_BLOCK_RULES = {
    "v4": [
        (r"norm\.norm\.(m|s)", r"norm.\1"),
        (r"layer\.layer\.kernel\.(inv_dt|A_real|A_imag|B|C|P|l_kernel)", r"layer.kernel.\1"),
        (r"layer\.layer\.D", "layer.D"),
        (r"layer\.output_linear\.0\.(weight|bias)", r"layer.output_linear.\1"),
        (r"layer\.ff\.0\.0\.(weight|bias)", r"layer.fc1.\1"),
        (r"layer\.ff\.2\.(weight|bias)", r"layer.fc2.\1"),
    ],
    "v3": [
        (r"norm\.norm\.(m|s)", r"norm.\1"),
        (r"layer\.kernel\.kernel\.(B|C|P)", r"layer.kernel.\1"),
        (r"layer\.kernel\.kernel\.log_dt", "layer.kernel.inv_dt"),
        (r"layer\.kernel\.kernel\.log_w_real", "layer.kernel.A_real"),
        (r"layer\.kernel\.kernel\.w_imag", "layer.kernel.A_imag"),
        (r"layer\.kernel\.kernel\.L", "layer.kernel.l_kernel"),
        (r"layer\.D", "layer.D"),
        (r"layer\.output_linear\.0\.(weight|bias)", r"layer.output_linear.\1"),
        (r"layer\.ff\.0\.0\.(weight|bias)", r"layer.fc1.\1"),
        (r"layer\.ff\.2\.(weight|bias)", r"layer.fc2.\1"),
    ],
}


def _map_key(key: str, layout: str) -> str | None:
    for pattern, repl in _TOP_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    m = re.fullmatch(r"model\.c_layers\.(\d+)\.(.+)", key)
    if m:
        prefix, rest = f"center.{m.group(1)}.", m.group(2)
    else:
        m = re.fullmatch(r"model\.u_layers\.(\d+)\.(\d+)\.(.+)", key)
        if not m or m.group(2) == "0":
            return None
        prefix, rest = f"up_blocks.{m.group(1)}.layers.{int(m.group(2)) - 1}.", m.group(3)
    for pattern, repl in _BLOCK_RULES[layout]:
        if re.fullmatch(pattern, rest):
            return prefix + re.sub(pattern, repl, rest)
    return None


def _detect_layout(keys: list[str]) -> str:
    if any(".layer.layer.kernel." in k for k in keys):
        return "v4"
    if any(".layer.kernel.kernel." in k for k in keys):
        return "v3"
    raise CheckpointError(
        f"not an official SaShiMi state dict (no S4 kernel keys); keys: {_short(sorted(keys))}"
    )


def _infer_config(sd: dict[str, torch.Tensor], layout: str) -> SaShiMiConfig:
    n_codes, d_model = sd["encoder.0.weight"].shape
    pools, expand, h = [], 2, d_model
    i = 0
    while f"model.d_layers.{i}.linear.weight_v" in sd:
        out, inp = sd[f"model.d_layers.{i}.linear.weight_v"].shape
        pools.append(inp // h)
        expand = out // h
        h = out
        i += 1
    n_center = len({k.split(".")[2] for k in sd if k.startswith("model.c_layers.")})
    ff = sd["model.c_layers.1.layer.ff.0.0.weight"].shape[0] // h
    kernel = "model.c_layers.0.layer.layer.kernel." if layout == "v4" else "model.c_layers.0.layer.kernel.kernel."
    a_real = sd[kernel + ("A_real" if layout == "v4" else "log_w_real")]
    s4 = S4Config(
        mode="dplr",
        d_state=2 * sd[kernel + "C"].shape[-2],
        n_ssm=a_real.shape[0],
        dt_transform="softplus" if layout == "v4" else "exp",
    )
    return SaShiMiConfig(d_model=d_model, n_layers=n_center // 2, pool=pools, expand=expand,
                         ff_expand=ff, n_codes=n_codes, s4=s4)


def import_official(path: str | Path) -> SaShiMi:
    """Build an s4music model from an official SaShiMi checkpoint (V3 or V4 layout).

    V3 differs from V4 in: `log_dt` (H,) read through exp instead of `inv_dt` (H, 1) through
    softplus (kept as is, with dt_transform "exp"); `log_w_real` for A_real; `w_imag` = -A_imag;
    `L` for l_kernel; and the kernel and D sit one module level higher. C keeps its C-tilde
    convention together with l_kernel, so the function is unchanged.
    """
    path = Path(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except pickle.UnpicklingError as e:  # what weights_only refuses: the file would run code to load
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" (it names {found.group(1)})" if found else ""
        raise CheckpointError(f"{path}: not a plain tensor checkpoint: it holds Python objects that loading would "
                              f"have to run{what}; s4music loads only tensors, for safety") from None
    except Exception as e:  # torch raises several types for a damaged file
        raise CheckpointError(f"{path}: not a loadable tensor-only checkpoint ({first_line(e)})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]  # a Lightning checkpoint: the state dict sits inside
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    try:
        layout = _detect_layout(list(sd))
        config = _infer_config(sd, layout)
    except KeyError as e:
        raise CheckpointError(f"{path}: not an official SaShiMi state dict (missing {e})") from None
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None

    mapped, unknown = {}, []
    for key, value in sd.items():
        ours = _map_key(key, layout)
        if ours is None:
            unknown.append(key)
            continue
        if layout == "v3" and ours.endswith("kernel.inv_dt"):
            value = value.reshape(-1, 1)
        if layout == "v3" and ours.endswith("kernel.A_imag"):
            value = -value
        mapped[ours] = value
    if unknown:
        raise CheckpointError(f"{path}: unexpected keys for the {layout.upper()} layout: {_short(unknown)}")
    model = SaShiMi(config)
    _load_strict(model, mapped, str(path))
    model.summary = {"imported_from": path.name, "official_layout": layout}
    return model.eval()
