"""`nanovlm-export` command line. Subcommands (onnx, quantize, trt, validate, bench) live in their modules."""

from __future__ import annotations

import logging

import click


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Export nanoVLM checkpoints to ONNX / TensorRT bundles and check them against PyTorch."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )


if __name__ == "__main__":
    main()
