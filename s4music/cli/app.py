"""The `s4music` command line. Each subcommand parses options and calls one library function."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path


import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from s4music.errors import S4MusicError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Continue music with SaShiMi, a multi-scale S4 state-space model over raw 16 kHz audio.",
)
console = Console(stderr=True)


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def command(fn):
    """Register a subcommand whose toolkit errors become one line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except S4MusicError as e:
            fail(str(e))

    return app.command()(wrapper)


@app.callback()
def main_options(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging.")):
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
    )


@command
def doctor():
    """Report torch and CUDA, the active S4 kernel path, and the external tools the toolkit uses."""
    from s4music.doctor import run_checks

    table = Table(title="s4music doctor", show_header=True)
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    checks = run_checks()
    for c in checks:
        status = "[green]ok[/]" if c.ok else ("[red]missing[/]" if c.required else "[yellow]absent[/]")
        table.add_row(c.name, status, c.detail)
    Console().print(table)
    if not all(c.ok for c in checks if c.required):
        raise typer.Exit(1)


@command
def convert(
    checkpoint: Path = typer.Argument(..., help="Official SaShiMi checkpoint (.pt), V3 or V4 layout."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (model.safetensors + config.json)."),
    bf16: bool = typer.Option(False, help="Store weights in bfloat16 (half the size)."),
):
    """Convert a SaShiMi checkpoint released with the paper into an s4music checkpoint."""
    import torch

    from s4music.model.checkpoint import convert_official

    path = convert_official(checkpoint, out, dtype=torch.bfloat16 if bf16 else None)
    console.print(f"wrote {path}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


