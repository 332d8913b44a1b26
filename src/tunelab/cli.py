"""The `tunelab` command line: one app, one thin wrapper per stage of the flow.

Every command parses its options, calls one library function, and prints. Library code raises
`TunelabError` for bad input; `main()` turns it into a one-line message and exit status 2.
Heavy imports (torch, diffusers) happen inside the commands so `tunelab --help` stays instant.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunelab import __version__
from tunelab.errors import TunelabError

app = typer.Typer(
    name="tunelab",
    help=(
        "Full fine-tuning of SDXL-class text-to-image models, and measuring what a finetune "
        "learned and what it forgot.\n\n"
        "The flow: data index -> data cache -> train -> grid / probe / loss / drift -> merge -> report. "
        "Start with `tunelab demo` (runs the whole flow on a tiny built-in model in minutes)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Create, inspect and convert model checkpoints (single-file SGM .safetensors).", no_args_is_help=True)
data_app = typer.Typer(help="Build the dataset index, preview captions, cache latents, verify caches.", no_args_is_help=True)
config_app = typer.Typer(help="Check and explain run files (TOML).", no_args_is_help=True)
toy_app = typer.Typer(help="The toy world: tiny models and synthetic data for trying tunelab on a laptop.", no_args_is_help=True)
merge_app = typer.Typer(help="Merge checkpoints with sd-mecha recipes (weighted sum, add difference, TIES, ...).", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
app.add_typer(toy_app, name="toy")
app.add_typer(merge_app, name="merge")

log = logging.getLogger("tunelab")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"tunelab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logging.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s" if not verbose else "%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Third-party libraries are chatty at INFO; keep their warnings only.
    for noisy in ("diffusers", "transformers", "accelerate", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _not_yet(command: str, what: str) -> None:
    """Commands whose stage has not landed yet say so plainly instead of pretending."""
    raise TunelabError(
        f"`tunelab {command}` ({what}) is not in this version yet; see docs/roadmap.md for what is planned."
    )


def _print_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=False))


# --- model ---------------------------------------------------------------------------------------


# --- config --------------------------------------------------------------------------------------


# --- data ----------------------------------------------------------------------------------------


# --- train ---------------------------------------------------------------------------------------


# --- grid / probe --------------------------------------------------------------------------------


# --- loss ----------------------------------------------------------------------------------------


# --- drift ---------------------------------------------------------------------------------------


# --- merge ---------------------------------------------------------------------------------------


# --- toy / demo / report -------------------------------------------------------------------------


def main() -> None:
    try:
        app()
    except TunelabError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
