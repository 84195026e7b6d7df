"""Command line: parses and validates, then calls the library. Nothing else lives here."""

from __future__ import annotations

import platform
from typing import Annotated

import typer
from rich.console import Console

from . import __version__
from .errors import HellomemeError

app = typer.Typer(
    name="hellomeme",
    help="Make meme videos: give a portrait the head motion and expressions of a driving video (HelloMeme v1).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        print(f"hellomeme {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Make meme videos: give a portrait the head motion and expressions of a driving video (HelloMeme v1)."""


@app.command()
def info() -> None:
    """Show the versions and compute devices hellomeme would use."""
    import diffusers
    import torch

    print(f"hellomeme   {__version__}")
    print(f"python      {platform.python_version()} ({platform.machine()})")
    print(f"torch       {torch.__version__}")
    print(f"diffusers   {diffusers.__version__}")
    devices = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    print(f"devices     {', '.join(devices + ['cpu'])}")


def main() -> None:
    try:
        app()
    except HellomemeError as error:
        console.print(f"[red]error:[/red] {error}", highlight=False)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
