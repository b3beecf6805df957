"""The command line: one click root behind both console scripts (`nanovlm`, `nanovlm-export`).

Commands, by what they need installed:

    run                               the runtime only (numpy, onnxruntime, tokenizers): no torch
    serve                             + the `serve` extra (starlette, uvicorn, prometheus-client)
    quantize, check, trt              + onnx (quantize, check) or TensorRT (trt): no torch
    validate                          no torch against the results stored in the bundle;
                                      the `torch` extra with --reference CHECKPOINT
    bench                             no torch for bundles; the `torch` extra with --reference
    train, demo, generate, onnx       the PyTorch reference: the `torch` extra

Modules load inside each command, so `nanovlm run` works on a torch-free install, and a torch
command there says which extra to install. Expected errors (bad input, missing files, unsupported
settings) print one line and exit 1; `-v` shows the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import click

from core.install import install_hint
from core.recipes import QUANTIZE_MODES, RECIPES

from .options import (
    image_tiles_option,
    installed,
    needs_torch,
    overwrite_option,
    pipeline_options,
    sampling_config,
    sampling_options,
    user_errors,
)
from .watch import watch

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the root
class OneLineErrors(click.Group):
    """Every error is one line on stderr: click's usage errors too (without the usage block)."""

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


@click.group(cls=OneLineErrors)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and tracebacks.")
def main(verbose: bool) -> None:
    """nanoVLM edge toolkit: train and check in PyTorch, export to ONNX/TensorRT, run without torch."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )


# ----------------------------------------------------------------------------- PyTorch reference
@main.command()
@click.option(
    "--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="TrainConfig JSON."
)
@click.option(
    "-o", "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a TrainConfig field."
)
@click.option("--resume", is_flag=True, help="Continue from OUTPUT_DIR/checkpoint.")
@click.option("--overwrite", is_flag=True, help="Start afresh over an earlier run in OUTPUT_DIR.")
@user_errors
def train(config_path: str | None, overrides: tuple[str, ...], resume: bool, overwrite: bool) -> None:
    """Train (default: the tiny model on the built-in shapes data). Works under torchrun for DDP."""
    needs_torch("train")
    from nanovlm.train import train as run
    from nanovlm.train_config import TrainConfig

    tc = TrainConfig.load(config_path) if config_path else TrainConfig()
    flags = (["resume=true"] if resume else []) + (["overwrite=true"] if overwrite else [])
    tc = tc.override(list(overrides) + flags)
    summary = run(tc)
    if summary:
        click.echo(json.dumps(summary, indent=2))


@main.command()
@click.option(
    "--output-dir", default="artifacts/tiny", show_default=True, help="Where the default model lives."
)
@click.option("--retrain", is_flag=True, help="Train again even if a finished model exists.")
@click.option(
    "--test-samples",
    type=click.IntRange(1),
    default=600,
    show_default=True,
    help="Built-in test questions to score.",
)
@click.option(
    "--steps", type=click.IntRange(1), default=None, help="Training steps (default: TrainConfig's)."
)
@click.option(
    "--full-schedule", is_flag=True, help="Train every step instead of stopping at the validation target."
)
@user_errors
def demo(output_dir: str, retrain: bool, test_samples: int, steps: int | None, full_schedule: bool) -> None:
    """Train the tiny default (or reuse it), export, quantize to INT8, validate, answer, measure."""
    needs_torch("demo")
    from cli.demo import run_demo

    run_demo(output_dir, retrain, test_samples, steps, full_schedule)


@main.command()
@click.argument("checkpoint")
@click.option("--image", "images", multiple=True, help="Image file (repeat for several; none: text only).")
@click.option("--prompt", required=True, help="The question (about the images, if any).")
@sampling_options
@click.option("--revision", default=None, help="Hub revision when CHECKPOINT is a Hub id.")
@user_errors
def generate(
    checkpoint: str,
    images: tuple[str, ...],
    prompt: str,
    max_new_tokens: int,
    revision: str | None,
    **kw: Any,
) -> None:
    """Answer PROMPT (about --image, if given) with the PyTorch model at CHECKPOINT (a directory or Hub id)."""
    needs_torch("generate")
    import torch

    from core.processors import ImageProcessor, prepare_batch
    from nanovlm.vision_language_model import VisionLanguageModel

    sampling = sampling_config(kw)
    model = VisionLanguageModel.from_pretrained(checkpoint, revision=revision)
    if model.tokenizer is None:
        raise click.ClickException(
            f"{checkpoint} has no tokenizer files and cfg.lm_tokenizer could not be loaded"
        )
    batch = prepare_batch(
        model.cfg, model.tokenizer, ImageProcessor.from_config(model.cfg), [list(images)], [prompt]
    )
    out = model.generate(
        torch.from_numpy(batch.input_ids),
        torch.from_numpy(batch.pixel_values) if images else None,
        attention_mask=torch.from_numpy(batch.attention_mask),
        max_new_tokens=max_new_tokens,
        sampling=sampling,
    )
    click.echo(model.tokenizer.decode(out[0].tolist()))


# ----------------------------------------------------------------------------- runtime (no torch)
@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--image", "images", multiple=True, help="Image file (repeat for several; none: text only).")
@click.option(
    "--video",
    type=click.Path(exists=True, dir_okay=False),
    help="A video file instead of images: frames sampled with the bundle's video settings (the video extra).",
)
@click.option("--prompt", required=True, help="The question (about the images, if any).")
@pipeline_options
@click.option("--stream", is_flag=True, help="Print text as tokens arrive.")
@sampling_options
@click.option("--json", "as_json", is_flag=True, help="Print the answer with timings as JSON.")
@click.option(
    "--json-schema",
    type=click.Path(exists=True, dir_okay=False),
    help="A JSON Schema file: the answer is JSON that matches it.",
)
@click.option("--regex", help="The answer matches this regular expression.")
@image_tiles_option("Default: the bundle's.")
@user_errors
def run(
    bundle: str,
    images: tuple[str, ...],
    video: str | None,
    prompt: str,
    provider: str,
    backend: str,
    stream: bool,
    max_new_tokens: int,
    as_json: bool,
    json_schema: str | None,
    regex: str | None,
    image_tiles: int | None,
    **kw: Any,
) -> None:
    """Answer PROMPT (about --image or --video, if given) with an exported BUNDLE on ONNX Runtime or
    TensorRT (no torch)."""
    from core.config import read_config_json
    from core.processors import check_image_tiles
    from runtime.constraint import Constraint
    from runtime.pipeline import VLMPipeline

    sampling = sampling_config(kw)
    options = {"json_schema": read_config_json(json_schema) if json_schema else None, "regex": regex}
    constraint = Constraint.given(**options)
    pipe = VLMPipeline.from_bundle(bundle, provider=provider, backend=backend)
    if image_tiles is not None:
        pipe.image_tiles = check_image_tiles(pipe.cfg, image_tiles)
    if constraint is not None:
        try:
            pipe.grammars.check(constraint)
        except ValueError as e:
            raise click.ClickException(f"{json_schema or '--regex'}: {e}") from None
    if video and images:
        raise click.UsageError("give --image or --video, not both")
    clip = pipe.load_video(video) if video else None  # a bad file fails here, before any model work
    if stream and not as_json:
        for piece in pipe.stream(
            list(images), prompt, max_new_tokens, sampling=sampling, video=clip, **options
        ):
            click.echo(piece, nl=False)
        click.echo()
    else:
        answer = pipe.generate(list(images), prompt, max_new_tokens, sampling=sampling, video=clip, **options)
        if as_json:
            finish = pipe.last_finish_reason
            report = {"answer": answer, "finish_reason": finish, "timings": pipe.last_timings.as_dict()}
            click.echo(json.dumps(report, indent=2))
        else:
            click.echo(answer)
    if constraint is not None and pipe.last_finish_reason == "length":
        raise click.ClickException(
            f"the answer ran out of --max-new-tokens ({max_new_tokens}) before its {constraint.kind} was "
            "complete: what is printed is cut; raise --max-new-tokens"
        )


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface)."
)
@click.option(
    "--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Port to listen on."
)
@click.option("--name", default=None, help="Model id clients see (default: the bundle's folder name).")
@click.option(
    "--max-batch",
    type=click.IntRange(1, 256),
    default=8,
    show_default=True,
    help="Requests that share decode steps (continuous batching).",
)
@click.option(
    "--max-queue",
    type=click.IntRange(1, 100_000),
    default=64,
    show_default=True,
    help="Requests waiting for a batch row before new ones get 429.",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(1, 1_000_000),
    default=256,
    show_default=True,
    help="New tokens for a request that names no max_tokens.",
)
@click.option(
    "--max-images", type=click.IntRange(0, 64), default=4, show_default=True, help="Images in one request."
)
@click.option(
    "--max-image-mb",
    type=click.FloatRange(0, 1024, min_open=True),
    default=8.0,
    show_default=True,
    help="Encoded size of one image.",
)
@click.option(
    "--max-image-pixels",
    type=click.IntRange(1),
    default=4096 * 4096,
    show_default=True,
    help="Pixels of one image, read from its header before decoding.",
)
@click.option(
    "--max-request-pixels",
    type=click.IntRange(1),
    default=48 * 2**20,
    show_default=True,
    help="Pixels of all of a request's images together, checked before any is decoded.",
)
@click.option(
    "--max-body-mb",
    type=click.FloatRange(0, 4096, min_open=True),
    default=16.0,
    show_default=True,
    help="Size of a request body.",
)
@click.option(
    "--max-video-mb",
    type=click.FloatRange(0, 4096, min_open=True),
    default=16.0,
    show_default=True,
    help="Encoded size of one video (a video_url part).",
)
@click.option(
    "--max-video-seconds",
    type=click.FloatRange(0, 86400, min_open=True),
    default=300.0,
    show_default=True,
    help="Duration of one video, read from its header before decoding.",
)
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    help="Require `Authorization: Bearer KEY` on /v1 and /metrics (repeat for several keys; "
    "also --api-key-file and NANOVLM_API_KEY). Each key's requests share cached work only among themselves.",
)
@click.option(
    "--api-key-file", type=click.Path(exists=True, dir_okay=False), help="API keys, one a line (# comments)."
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    help="A Host name clients may use besides IP addresses, localhost and this machine's name "
    "(repeat; '*': any, which opens the server to DNS rebinding).",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    help="An origin (scheme://host[:port]) whose pages may call the API (repeat; off by default).",
)
@click.option("--open-metrics", is_flag=True, help="Serve /metrics without an API key.")
@click.option(
    "--body-timeout",
    type=click.FloatRange(1, 3600),
    default=60.0,
    show_default=True,
    help="Seconds to receive a request body (408 after).",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(1, 3600),
    default=10.0,
    show_default=True,
    help="Seconds to receive a request's headers once connected or after a response.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(8, 1_000_000),
    default=1000,
    show_default=True,
    help="Open connections (kept below the open-files limit); past it the longest-idle one is closed.",
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(1, 3600),
    default=10.0,
    show_default=True,
    help="On SIGTERM, seconds live requests may finish in; streams still running then end with an error chunk.",
)
@click.option(
    "--image-dir",
    "--media-dir",
    "image_dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Allow file:// image and video URLs under this directory (off by default).",
)
@click.option(
    "--prefill-chunk",
    type=click.IntRange(1, 1_000_000),
    default=128,
    show_default=True,
    help="Prompt positions prefilled per engine step while other streams decode.",
)
@click.option(
    "--image-cache-mb",
    type=click.FloatRange(0, 1_000_000),
    default=256.0,
    show_default=True,
    help="Image embeddings kept for reuse (0: off).",
)
@click.option(
    "--prefix-cache-mb",
    type=click.FloatRange(0, 1_000_000),
    default=512.0,
    show_default=True,
    help="Prompt KV kept for reuse across requests and turns.",
)
@click.option("--no-prefix-cache", is_flag=True, help="Recompute every prompt (same as --prefix-cache-mb 0).")
@click.option(
    "--reuse-threshold",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    help="A view within this many 8-bit levels (mean) of the same view of its client's last frame reuses "
    "that view's work (successive camera frames); 0: identical views only.",
)
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="ONNX Runtime intra-op threads.")
@image_tiles_option("Default: the bundle's; a request's image_tiles may ask for fewer, not more.")
@click.option(
    "--ray",
    "use_ray",
    is_flag=True,
    help="Run as a Ray Serve deployment (the cluster extra): a local cluster, or RAY_ADDRESS's.",
)
@click.option(
    "--replicas", type=click.IntRange(1, 1024), default=1, show_default=True, help="Ray Serve replicas."
)
@click.option(
    "--cpus-per-replica",
    type=click.FloatRange(0.1, 1024),
    default=1.0,
    show_default=True,
    help="CPUs Ray reserves for each replica (also its ONNX Runtime threads).",
)
@click.option(
    "--gpus-per-replica",
    type=click.FloatRange(0, 64),
    default=0.0,
    show_default=True,
    help="GPUs Ray reserves for each replica.",
)
@user_errors
def serve(
    bundle: str,
    host: str,
    port: int,
    name: str | None,
    max_batch: int,
    max_queue: int,
    max_tokens: int,
    max_images: int,
    max_image_mb: float,
    max_image_pixels: int,
    max_request_pixels: int,
    max_body_mb: float,
    max_video_mb: float,
    max_video_seconds: float,
    api_keys: tuple[str, ...],
    api_key_file: str | None,
    allowed_hosts: tuple[str, ...],
    cors_origins: tuple[str, ...],
    open_metrics: bool,
    body_timeout: float,
    header_timeout: float,
    max_connections: int,
    shutdown_timeout: float,
    image_dir: str | None,
    prefill_chunk: int,
    image_cache_mb: float,
    prefix_cache_mb: float,
    no_prefix_cache: bool,
    reuse_threshold: float,
    threads: int | None,
    image_tiles: int | None,
    use_ray: bool,
    replicas: int,
    cpus_per_replica: float,
    gpus_per_replica: float,
) -> None:
    """Serve BUNDLE over an OpenAI-compatible HTTP API (/v1/chat/completions, /health, /metrics, a page at /)."""
    missing = [m for m in ("starlette", "uvicorn", "prometheus_client") if not installed(m)]
    if missing:
        raise click.ClickException(
            f"`serve` needs the serve extra ({', '.join(missing)} not installed): {install_hint('serve')}"
        )
    from core.bundle import load_bundle
    from runtime.batching import EngineConfig
    from serve.app import NetworkConfig, ServeConfig
    from serve.app import serve as run_server
    from serve.openai_api import RequestLimits
    from serve.security import SecurityPolicy

    load_bundle(bundle)  # a bad bundle fails here, in one line, before the server starts
    mb = 1024 * 1024
    limits = RequestLimits(
        max_body_bytes=int(max_body_mb * mb),
        max_image_bytes=int(max_image_mb * mb),
        max_image_pixels=max_image_pixels,
        max_request_pixels=max_request_pixels,
        max_video_bytes=int(max_video_mb * mb),
        max_video_seconds=max_video_seconds,
        max_images=max_images,
        max_tokens=max_tokens,
        image_dir=image_dir,
        image_tiles=image_tiles,
    )
    engine = EngineConfig(
        max_batch,
        max_queue,
        prefill_chunk,
        image_cache_mb,
        0.0 if no_prefix_cache else prefix_cache_mb,
        reuse_threshold=reuse_threshold,
    )
    security = SecurityPolicy.from_options(api_keys, api_key_file, allowed_hosts, cors_origins, open_metrics)
    config = ServeConfig(bundle, name, engine, threads, limits, security, body_timeout)
    if use_ray:
        if not installed("ray"):
            raise click.ClickException(
                f"`serve --ray` needs the cluster extra (ray not installed): {install_hint('cluster')}"
            )
        from serve.ray_app import run as run_ray

        run_ray(config, replicas, host, port, cpus_per_replica, gpus_per_replica)
        return
    if replicas != 1:
        raise click.UsageError("--replicas needs --ray (one process serves one engine)")
    run_server(config, NetworkConfig(host, port, header_timeout, 5.0, max_connections, shutdown_timeout))


# ----------------------------------------------------------------------------- export and quantization
@main.command()
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


@main.command()
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
    type=click.IntRange(1, 100_000),
    default=32,
    show_default=True,
    help="Calibration samples (the calibrated modes need at least 8; the others take none).",
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


@main.command()
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


@main.command()
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


# ----------------------------------------------------------------------------- evaluation
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
    "--reference",
    help="The PyTorch checkpoint the bundle came from (directory or Hub id). "
    "Without it: the PyTorch results stored in the bundle at export (no torch needed).",
)
@click.option(
    "--images",
    default="builtin",
    show_default=True,
    help="With --reference: 'builtin' (test split) or a folder of images.",
)
@click.option(
    "--prompts", type=click.Path(exists=True, dir_okay=False), help="One prompt per line, for --images DIR."
)
@click.option(
    "--samples",
    type=click.IntRange(1, 100_000),
    default=24,
    show_default=True,
    help="With --reference: cases to compare.",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(1, 100_000),
    default=None,
    help="Greedy tokens per case [16; the stored reference's own count without --reference].",
)
@pipeline_options
@click.option(
    "--threshold", "thresholds", multiple=True, help="Override a gate, e.g. kl_mean_max=0.02 (repeatable)."
)
@click.option(
    "--json", "json_out", type=click.Path(dir_okay=False), help="Write the full report (per case) here."
)
@user_errors
def validate(
    bundle: str,
    reference: str | None,
    images: str,
    prompts: str | None,
    samples: int,
    max_new_tokens: int | None,
    backend: str,
    provider: str,
    thresholds: tuple[str, ...],
    json_out: str | None,
) -> None:
    """Compare BUNDLE with PyTorch (its checkpoint, or the results stored in it); exit 1 when a gate fails."""
    from core.recipes import gates_for
    from evaluation import metrics
    from runtime.pipeline import VLMPipeline

    pipe = VLMPipeline.from_bundle(bundle, provider=provider, backend=backend)
    limits = gates_for(pipe.bundle.mode, _thresholds(thresholds))
    if reference:
        needs_torch("validate --reference")
        from evaluation import parity

        ref: metrics.Reference = parity.Reference(reference)
        cases = (
            metrics.builtin_cases(samples)
            if images == "builtin"
            else metrics.folder_cases(images, samples, prompts)
        )
        max_new_tokens = max_new_tokens or 16
    else:
        if images != "builtin":
            raise click.BadParameter("--images DIR needs --reference CHECKPOINT", param_hint="--images")
        stored = metrics.StoredReference(pipe.bundle)
        ref, cases, max_new_tokens = stored, stored.cases, max_new_tokens or stored.max_new_tokens
    summary = metrics.compare(pipe, ref, cases, max_new_tokens)
    failures = metrics.gate(summary, limits)
    click.echo(metrics.table(summary, limits))
    if json_out:
        from core.files import write_json

        write_json(
            json_out,
            {
                "bundle": bundle,
                "reference": reference or "stored",
                "thresholds": limits,
                "failures": failures,
                "summary": summary,
            },
        )
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
@click.option(
    "--prompt", default="Describe this image in detail.", show_default=True, help="The question timed."
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(2, 100_000),
    default=64,
    show_default=True,
    help="Tokens each timed answer decodes (EOS off).",
)
@click.option(
    "--repeats",
    type=click.IntRange(1, 1000),
    default=3,
    show_default=True,
    help="Timed runs per backend (median).",
)
@click.option(
    "--threads", type=click.IntRange(1, 1024), default=None, help="CPU threads (default: all cores)."
)
@click.option(
    "--growth",
    default="16,32,64",
    show_default=True,
    help="Output lengths for the PyTorch cost-growth curve ('' to skip).",
)
@click.option(
    "--plot",
    "plot_path",
    help="PNG chart (default: bench.png here, replaced only if bench wrote it; '': none; needs matplotlib).",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the results as JSON here.")
@user_errors
def bench(
    bundle: str,
    reference: str | None,
    variants: tuple[str, ...],
    image: str | None,
    prompt: str,
    max_new_tokens: int,
    repeats: int,
    threads: int | None,
    growth: str,
    plot_path: str | None,
    json_out: str | None,
) -> None:
    """Image encode, TTFT, prefill and decode speed, peak memory and size: PyTorch and bundles."""
    if reference:
        needs_torch("bench --reference")
    if image is None and not installed("skimage"):
        raise click.ClickException("pass --image FILE (the default photograph comes with scikit-image)")
    from evaluation import bench as b

    if plot_path is None:
        plot_path = "bench.png"
        if os.path.exists(plot_path) and not b.is_bench_plot(plot_path):
            raise click.ClickException(
                f"{os.path.abspath(plot_path)} exists and bench did not write it: pass --plot PATH"
            )

    try:
        lengths = tuple(int(x) for x in growth.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(
            f"{growth!r} is not a comma-separated list of lengths", param_hint="--growth"
        ) from None
    if any(n < 2 for n in lengths):
        raise click.BadParameter(f"{growth!r}: every length must be at least 2", param_hint="--growth")
    result = b.bench([bundle, *variants], reference, image, prompt, max_new_tokens, repeats, threads, lengths)
    click.echo(b.table(result))
    if json_out:  # the results first: a chart that cannot be drawn costs nothing measured
        from core.files import write_json

        write_json(json_out, result)
    if plot_path == "":  # no chart wanted
        return
    if not installed("matplotlib"):
        click.echo(f"chart skipped: it needs matplotlib ({install_hint('jetson')})", err=True)
        return
    b.plot(result, plot_path)
    click.echo(f"chart: {plot_path}")


if __name__ == "__main__":
    main()


main.add_command(watch)
