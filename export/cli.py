"""`nanovlm-export` command line. Subcommands (onnx, quantize, trt, validate, bench) live in their modules."""

from __future__ import annotations

import logging
import os

import click

from nanovlm.cli import pipeline_options


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
@click.option(
    "--decoder", type=click.Choice(["standard", "fused"]), default="standard", show_default=True,
    help="standard: plain ONNX ops, runs everywhere incl. TensorRT. fused: ONNX Runtime contrib ops "
    "(GroupQueryAttention, SkipSimplifiedLayerNormalization), fp32, much faster decode on CPU.",
)  # fmt: skip
def onnx(src: str, out: str, precision: str, opset: int, decoder: str) -> None:
    """Export checkpoint SRC (a directory or Hub id) to the ONNX bundle directory OUT."""
    import json
    import os

    from .onnx_export import export_onnx

    try:
        manifest = export_onnx(src, out, precision=precision, opset=opset, decoder=decoder)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    sizes = {name: meta["bytes"] for name, meta in manifest["files"].items()}
    click.echo(json.dumps({"bundle": os.path.abspath(out), "precision": precision, "decoder": decoder,
                           "bytes": sizes}, indent=2))  # fmt: skip


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--mode", required=True, type=click.Choice(["int8-dynamic", "int8-static", "int4", "int4-fp16", "fp16"])
)
@click.option(
    "--calibration",
    help="int8-static, int4, int4-fp16: 'builtin' (default), a folder of images (+ prompts.txt, "
    "+ texts.txt of text-only prompts) or hf:NAME[:SUBSET].",
)
@click.option("--samples", default=32, show_default=True, help="Calibration samples.")
@click.option(
    "--method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax", show_default=True
)
@click.option(
    "--exclude", multiple=True, help="Glob over node names left in float (repeatable), e.g. '*/head/*'."
)
def quantize(bundle: str, out: str, mode: str, calibration: str | None, samples: int, method: str,
             exclude: tuple[str, ...]) -> None:  # fmt: skip
    """Quantize the fp32 bundle BUNDLE into the bundle directory OUT."""
    import json
    import os

    from calibration.quantize import quantize_bundle
    from runtime.bundle import BundleError

    try:
        manifest = quantize_bundle(bundle, out, mode, calibration, samples, method, exclude)
    except (ValueError, RuntimeError, FileNotFoundError, BundleError) as e:
        raise click.ClickException(str(e)) from None
    sizes = {name: meta["bytes"] for name, meta in manifest["files"].items()}
    click.echo(json.dumps({"bundle": os.path.abspath(out), "mode": mode, "bytes": sizes,
                           "total_bytes": sum(sizes.values())}, indent=2))  # fmt: skip


def _thresholds(items: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            raise click.BadParameter(f"{item!r} is not KEY=NUMBER", param_hint="--threshold") from None
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=NUMBER", param_hint="--threshold")
    return out


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--reference", required=True, help="The PyTorch checkpoint the bundle came from (directory or Hub id)."
)
@click.option(
    "--images", default="builtin", show_default=True, help="'builtin' (test split) or a folder of images."
)
@click.option(
    "--prompts", type=click.Path(exists=True, dir_okay=False), help="One prompt per line, for --images DIR."
)
@click.option("--samples", default=24, show_default=True, help="Cases to compare.")
@click.option("--max-new-tokens", default=16, show_default=True)
@pipeline_options
@click.option(
    "--threshold", "thresholds", multiple=True, help="Override a gate, e.g. kl_mean_max=0.02 (repeatable)."
)
@click.option(
    "--json", "json_out", type=click.Path(dir_okay=False), help="Write the full report (per case) here."
)
def validate(bundle: str, reference: str, images: str, prompts: str | None, samples: int, max_new_tokens: int,
             backend: str, provider: str, thresholds: tuple[str, ...], json_out: str | None) -> None:  # fmt: skip
    """Compare BUNDLE with its PyTorch checkpoint; exit code 1 when a threshold fails."""
    import json

    from runtime.bundle import BundleError
    from runtime.pipeline import VLMPipeline

    from . import parity

    try:
        limits = parity.thresholds_for(parity.precision_of(bundle), _thresholds(thresholds))
        pipe = VLMPipeline.from_bundle(bundle, provider=provider, backend=backend)
        cases = (parity.builtin_cases(samples) if images == "builtin"
                 else parity.folder_cases(images, samples, prompts))  # fmt: skip
        summary = parity.compare(pipe, parity.Reference(reference), cases, max_new_tokens)
    except (ValueError, RuntimeError, FileNotFoundError, BundleError) as e:
        raise click.ClickException(str(e)) from None
    failures = parity.gate(summary, limits)
    click.echo(parity.table(summary, limits))
    if json_out:
        with open(json_out + ".tmp", "w") as f:
            json.dump({"bundle": bundle, "reference": reference, "thresholds": limits, "failures": failures,
                       "summary": summary}, f, indent=2)  # fmt: skip
        os.replace(json_out + ".tmp", json_out)
    if failures:
        click.echo("FAILED: " + "; ".join(failures), err=True)
        raise SystemExit(1)
    click.echo("passed")


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--reference", help="PyTorch checkpoint to measure alongside (with and without KV cache).")
@click.option(
    "--variants",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="More bundles (e.g. quantized) to measure in the same run (repeatable).",
)
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="Default: a scikit-image photo.")
@click.option("--prompt", default="Describe this image in detail.", show_default=True)
@click.option("--new-tokens", default=64, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads (default: all cores).")
@click.option(
    "--growth",
    default="16,32,64",
    show_default=True,
    help="Output lengths for the PyTorch cost-growth curve ('' to skip).",
)
@click.option("--plot", "plot_path", default="bench.png", show_default=True, help="PNG chart.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False))
def bench(bundle: str, reference: str | None, variants: tuple[str, ...], image: str | None, prompt: str,
          new_tokens: int, repeats: int, threads: int | None, growth: str, plot_path: str,
          json_out: str | None) -> None:  # fmt: skip
    """Image encode, TTFT, prefill and decode speed, peak memory and size: PyTorch and bundles."""
    import json

    from runtime.bundle import BundleError

    from . import bench as b

    try:
        lengths = tuple(int(x) for x in growth.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(
            f"{growth!r} is not a comma-separated list of lengths", param_hint="--growth"
        ) from None
    try:
        result = b.bench([bundle, *variants], reference, image, prompt, new_tokens, repeats, threads, lengths)
    except (ValueError, RuntimeError, FileNotFoundError, BundleError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(b.table(result))
    b.plot(result, plot_path)
    click.echo(f"chart: {plot_path}")
    if json_out:
        with open(json_out + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(json_out + ".tmp", json_out)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--max-batch", default=1, show_default=True)
@click.option(
    "--max-seq", type=int, default=None, help="Longest prefill incl. image tokens [min(512, context)]."
)
@click.option(
    "--max-context", type=int, default=None, help="Prompt + generated positions [min(1024, the model's)]."
)
@click.option("--max-images", default=4, show_default=True, help="Tiles per vision-encoder call.")
@click.option("--workspace", default=2048, show_default=True, help="Builder workspace, MB.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="Reuse and update this timing cache.")
@click.option("--print-trtexec", is_flag=True, help="Only print the equivalent trtexec command lines.")
def trt(bundle: str, out: str, max_batch: int, max_seq: int | None, max_context: int | None, max_images: int,
        workspace: int, timing_cache: str | None, print_trtexec: bool) -> None:  # fmt: skip
    """Build TensorRT engines for BUNDLE (fp32, fp16 or int8-static) into OUT."""
    from runtime.bundle import BundleError, load_bundle
    from runtime.trt_plan import Limits, trtexec_commands

    from .trt_build import build_engines, check_buildable, describe

    try:
        context = load_bundle(bundle, verify=False).manifest["generation"]["max_context"]
        max_context = max_context or min(1024, context)
        limits = Limits(max_batch, max_seq or min(512, max_context), max_context, max_images)
        if print_trtexec:
            manifest = check_buildable(bundle)
            for graph, cmd in trtexec_commands(manifest, limits, workspace).items():
                click.echo(f"# {graph}\n{cmd}\n")
            return
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise click.ClickException(
                "the tensorrt Python package is not installed (pip install 'nanovlm-edge[trt]' on a machine "
                "with an NVIDIA GPU; on Jetson it comes with JetPack). --print-trtexec prints the trtexec "
                "commands instead."
            ) from None
        manifest = build_engines(bundle, out, limits, workspace, timing_cache)
        load_bundle(out)  # the result verifies
    except (ValueError, RuntimeError, FileNotFoundError, BundleError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(describe(manifest))


if __name__ == "__main__":
    main()
