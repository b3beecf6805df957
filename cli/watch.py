"""`nanovlm watch`: answer a prompt on a camera's newest frame, one JSON line per answer."""

from __future__ import annotations

import json
from typing import Any

import click

from .options import image_tiles_option, pipeline_options, user_errors


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("source")
@click.option("--prompt", required=True, help="The question asked of every answered frame.")
@click.option(
    "--every",
    type=click.FloatRange(0, min_open=True),
    help="Answer at most once per this many seconds of stream.",
)
@click.option(
    "--on-change",
    type=click.FloatRange(0),
    help="Answer only when the frame moved by more than this many 8-bit levels (mean, on a grey thumbnail) "
    "since the last answer: a still scene costs nothing.",
)
@click.option(
    "--reuse-threshold",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    help="Reuse a view of the last frame when this one's differs from it by less than this many 8-bit levels "
    "(mean); 0: only identical views (sensor noise makes a camera's views differ a little).",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(1, 100_000),
    default=32,
    show_default=True,
    help="Most tokens an answer may have.",
)
@click.option(
    "--json-schema",
    type=click.Path(exists=True, dir_okay=False),
    help="A JSON Schema file: every answer is JSON that matches it (structured alerts).",
)
@click.option("--max-answers", type=click.IntRange(1), help="Stop after this many answers.")
@click.option(
    "--no-realtime", is_flag=True, help="Read a video file as fast as it decodes, not at its own frame rate."
)
@pipeline_options
@image_tiles_option("Default: the bundle's.")
@user_errors
def watch(
    bundle: str,
    source: str,
    prompt: str,
    every: float | None,
    on_change: float | None,
    reuse_threshold: float,
    max_new_tokens: int,
    json_schema: str | None,
    max_answers: int | None,
    no_realtime: bool,
    provider: str,
    backend: str,
    image_tiles: int | None,
    **_: Any,
) -> None:
    """Answer PROMPT on the newest frame of SOURCE (a video file, /dev/videoN or an rtsp:// or
    http:// stream) with BUNDLE, as fast as the model allows: frames that arrive while it is busy are
    dropped, never queued. One JSON line per answer: t (seconds into the stream), frame, answer,
    ttft_s, total_s, views, reused_views, lag_s."""
    from core.config import read_config_json
    from core.processors import check_image_tiles
    from runtime.constraint import Constraint
    from runtime.pipeline import VLMPipeline
    from runtime.watch import watch as watch_source

    constraint = Constraint.given(json_schema=read_config_json(json_schema) if json_schema else None)
    pipe = VLMPipeline.from_bundle(bundle, provider=provider, backend=backend)
    if image_tiles is not None:
        pipe.image_tiles = check_image_tiles(pipe.cfg, image_tiles)
    if constraint is not None:
        pipe.grammars.check(constraint)
    lines = watch_source(
        pipe,
        source,
        prompt,
        every=every,
        on_change=on_change,
        reuse_threshold=reuse_threshold,
        max_new_tokens=max_new_tokens,
        constraint=constraint,
        realtime=not no_realtime,
        max_answers=max_answers,
    )
    try:
        for line in lines:
            click.echo(json.dumps(line, ensure_ascii=False))
    except BrokenPipeError:  # the reader went away (`| head`): stop watching, quietly
        pass
