"""`nanovlm serve`: the OpenAI-compatible server's options, checked, then handed to serve/."""

from __future__ import annotations

import click

from core.install import install_hint

from .options import image_tiles_option, installed, user_errors


@click.command()
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
    from runtime.engine_api import EngineConfig
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
