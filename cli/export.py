"""`nanovlm-export onnx`, `quantize`, `trt` and `check`: make bundles and engines, and check them."""

from __future__ import annotations

import json
import os

import click

from core.install import install_hint
from core.recipes import QUANTIZE_MODES, RECIPES

from .options import image_tiles_option, installed, needs_torch, overwrite_option, user_errors


@click.command()
@click.argument("src")
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16"]),
    default="fp32",
    show_default=True,
    help="Float type of the graphs (fp16: for GPUs and TensorRT FP16 engines).",
)
@click.option("--opset", type=click.IntRange(17, 21), default=17, show_default=True, help="ONNX opset.")
@click.option(
    "--decoder",
    type=click.Choice(["standard", "fused"]),
    default="standard",
    show_default=True,
    help="standard: plain ONNX ops, runs everywhere incl. TensorRT. fused: ONNX Runtime contrib ops "
    "(GroupQueryAttention, SkipSimplifiedLayerNormalization), fp32, much faster decode on CPU.",
)
@click.option(
    "--vision",
    type=click.Choice(["standard", "fused"]),
    default=None,
    help="The same choice for the vision encoder (fused: MultiHeadAttention, SkipLayerNormalization, "
    "FastGelu; faster image encode on CPU). Default: as --decoder.",
)
@click.option(
    "--layout",
    type=click.Choice(["bundle", "transformers.js"]),
    default="bundle",
    show_default=True,
    help="bundle: this toolkit's bundle. transformers.js: onnx/ graphs and files transformers.js loads "
    "(Idefics3 / SmolVLM checkpoints).",
)
@image_tiles_option("Stored in the bundle as the runtimes' default (none: the checkpoint's own).")
@overwrite_option
@user_errors
def onnx(
    src: str,
    out: str,
    precision: str,
    opset: int,
    decoder: str,
    vision: str | None,
    layout: str,
    image_tiles: int | None,
    overwrite: bool,
) -> None:
    """Export checkpoint SRC (a directory or Hub id) to the ONNX bundle directory OUT."""
    needs_torch("onnx")
    from export.onnx_export import export_onnx

    if layout == "transformers.js":
        from transformers_js.layout import export_transformers_js

        if precision != "fp32" or decoder != "standard" or vision not in (None, "standard"):
            raise click.UsageError(
                "--layout transformers.js writes fp32 standard graphs (no --precision/--decoder/--vision)"
            )
        path = export_transformers_js(src, out, opset, overwrite)
        files = sorted(os.listdir(os.path.join(path, "onnx")))
        click.echo(json.dumps({"transformers.js": os.path.abspath(path), "onnx": files}, indent=2))
        return

    manifest = export_onnx(
        src,
        out,
        precision=precision,
        opset=opset,
        decoder=decoder,
        vision=vision,
        overwrite=overwrite,
        image_tiles=image_tiles,
    )
    sizes = {name: meta["bytes"] for name, meta in manifest.files.items()}
    summary = {"bundle": os.path.abspath(out), "precision": precision, "decoder": decoder}
    click.echo(json.dumps(summary | {"vision": manifest.vision_graph, "bytes": sizes}, indent=2))


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--mode",
    required=True,
    type=click.Choice(QUANTIZE_MODES),
    help="; ".join(f"{m}: {RECIPES[m].summary}" for m in QUANTIZE_MODES) + " (docs/quantization.md).",
)
@click.option(
    "--calibration",
    help="Calibrated modes: 'builtin' (default), a folder of images (+ prompts.txt, + texts.txt of "
    "text-only prompts) or hf:NAME[:SUBSET].",
)
@click.option(
    "--samples",
    type=click.IntRange(8, 100_000),
    default=32,
    show_default=True,
    help="Calibration samples, for the calibrated modes (the others take none).",
)
@click.option(
    "--method",
    type=click.Choice(["minmax", "entropy", "percentile"]),
    default="minmax",
    show_default=True,
    help="How int8-static calibration picks each activation's range from the recorded values.",
)
@click.option(
    "--exclude", multiple=True, help="Glob over node names left in float (repeatable), e.g. '*/head/*'."
)
@overwrite_option
@user_errors
def quantize(
    bundle: str,
    out: str,
    mode: str,
    calibration: str | None,
    samples: int,
    method: str,
    exclude: tuple[str, ...],
    overwrite: bool,
) -> None:
    """Quantize the fp32 bundle BUNDLE into the bundle directory OUT."""
    if not installed("onnx"):
        raise click.ClickException(f"`quantize` needs onnx: {install_hint('jetson')} (or pip install onnx)")
    from calibration.quantize import quantize_bundle

    manifest = quantize_bundle(bundle, out, mode, calibration, samples, method, exclude, overwrite=overwrite)
    sizes = {name: meta["bytes"] for name, meta in manifest.files.items()}
    click.echo(
        json.dumps(
            {
                "bundle": os.path.abspath(out),
                "mode": mode,
                "bytes": sizes,
                "total_bytes": sum(sizes.values()),
            },
            indent=2,
        )
    )


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--max-batch",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Largest batch the engines take.",
)
@click.option(
    "--max-seq",
    type=click.IntRange(1),
    default=None,
    help="Longest prefill incl. image tokens [min(512, context)].",
)
@click.option(
    "--max-context",
    type=click.IntRange(1),
    default=None,
    help="Prompt + generated positions [min(1024, the model's)].",
)
@click.option(
    "--max-images",
    type=click.IntRange(1),
    default=4,
    show_default=True,
    help="Tiles per vision-encoder call.",
)
@click.option(
    "--workspace", type=click.IntRange(1), default=2048, show_default=True, help="Builder workspace, MB."
)
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="Reuse and update this timing cache.")
@click.option("--print-trtexec", is_flag=True, help="Only print the equivalent trtexec command lines.")
@click.option("--tf32", is_flag=True, help="Let fp32 products run in TF32 (faster on Ampere+, less precise).")
@overwrite_option
@user_errors
def trt(
    bundle: str,
    out: str,
    max_batch: int,
    max_seq: int | None,
    max_context: int | None,
    max_images: int,
    workspace: int,
    timing_cache: str | None,
    print_trtexec: bool,
    tf32: bool,
    overwrite: bool,
) -> None:
    """Build TensorRT engines for BUNDLE (fp32, fp16 or int8-static) into OUT."""
    from core.bundle import load_bundle
    from trt.build import build_engines, check_buildable, describe
    from trt.plan import ProfileLimits, trtexec_commands

    max_context = max_context or min(
        1024, load_bundle(bundle, verify=False).config.lm_max_position_embeddings
    )
    limits = ProfileLimits(max_batch, max_seq or min(512, max_context), max_context, max_images)
    if print_trtexec:
        for graph, cmd in trtexec_commands(check_buildable(bundle), limits, workspace, tf32=tf32).items():
            click.echo(f"# {graph}\n{cmd}\n")
        return
    if not installed("tensorrt"):
        raise click.ClickException(
            f"the tensorrt Python package is not installed ({install_hint('trt')} on a machine "
            "with an NVIDIA GPU; on Jetson it comes with JetPack). --print-trtexec prints the trtexec "
            "commands instead."
        )
    manifest = build_engines(bundle, out, limits, workspace, timing_cache, overwrite=overwrite, tf32=tf32)
    load_bundle(out)  # the result verifies
    click.echo(describe(manifest))


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--target",
    "targets",
    multiple=True,
    type=click.Choice(["trt-10.3", "trt-10.13"]),
    help="TensorRT version to check for (repeatable; default: both).",
)
@user_errors
def check(bundle: str, targets: tuple[str, ...]) -> None:
    """Will TensorRT parse BUNDLE's graphs? Every node against onnx-tensorrt's support matrix; exit 1 if not."""
    if not installed("onnx"):
        raise click.ClickException(f"`check` needs onnx: {install_hint('jetson')} (or pip install onnx)")
    from trt.check import check_bundle

    failed = False
    for name in targets or ("trt-10.3", "trt-10.13"):
        problems = [p for graph in check_bundle(bundle, name).values() for p in graph]
        click.echo(f"{name}: {'ok' if not problems else f'{len(problems)} problems'}")
        for p in problems:
            click.echo(f"  {p}")
        failed |= bool(problems)
    if failed:
        raise SystemExit(1)
