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


@main.command()
@click.argument("src")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (17..21).")
def onnx(src: str, out: str, precision: str, opset: int) -> None:
    """Export checkpoint SRC (a directory or Hub id) to the ONNX bundle directory OUT."""
    import json
    import os

    from .onnx_export import export_onnx

    try:
        manifest = export_onnx(src, out, precision=precision, opset=opset)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    sizes = {name: meta["bytes"] for name, meta in manifest["files"].items()}
    click.echo(json.dumps({"bundle": os.path.abspath(out), "precision": precision, "bytes": sizes}, indent=2))


if __name__ == "__main__":
    main()
