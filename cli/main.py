"""The two console scripts, each with its own job:

    nanovlm          train, demo, generate (the PyTorch reference: the `torch` extra)
                     run, watch (the runtime only: numpy, onnxruntime, tokenizers; no torch)
                     serve (+ the `serve` extra)
    nanovlm-export   onnx (torch), quantize, check (onnx), trt (TensorRT),
                     validate, bench (no torch against a bundle's stored results; torch with --reference)

One module a job beside it (train, run, watch, serve, export, evaluate). Modules load inside each
command, so `nanovlm run` works on a torch-free install, and a torch command there says which extra
to install. Expected errors (bad input, missing files, unsupported settings) print one line and exit
1; `-v` shows the traceback. A command given to the other script is named with the right one.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from .evaluate import bench, validate
from .export import check, onnx, quantize, trt
from .run import run
from .serve import serve
from .train import demo, generate, train
from .watch import watch


class Toolkit(click.Group):
    """Every error is one line on stderr: click's usage errors too (without the usage block)."""

    sibling: tuple[str, click.Group] | None = None  # the other script: its name and its group

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:
        extra.pop("standalone_mode", None)
        try:
            return super().main(args, prog_name, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if isinstance(e, click.UsageError) and ctx else ""
            click.echo(f"Error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if self.sibling and args and args[0] not in self.commands and args[0] in self.sibling[1].commands:
            raise click.UsageError(
                f"{args[0]!r} is a command of {self.sibling[0]}: run `{self.sibling[0]} {args[0]}`"
            )
        return super().resolve_command(ctx, args)


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )


@click.group(cls=Toolkit)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and tracebacks.")
def main(verbose: bool) -> None:
    """nanoVLM on the edge: train in PyTorch, then answer, watch a camera and serve from an exported
    bundle without torch. Making and checking bundles: nanovlm-export."""
    _logging(verbose)


@click.group(cls=Toolkit)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and tracebacks.")
def export_main(verbose: bool) -> None:
    """Make bundles and check them: export a checkpoint to ONNX, quantize it, build TensorRT
    engines, validate against PyTorch and measure. Answering from a bundle: nanovlm."""
    _logging(verbose)


for command in (train, demo, generate, run, watch, serve):
    main.add_command(command)
for command in (onnx, quantize, trt, check, validate, bench):
    export_main.add_command(command)
main.sibling = ("nanovlm-export", export_main)
export_main.sibling = ("nanovlm", main)


if __name__ == "__main__":
    main()
