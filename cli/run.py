"""`nanovlm run`: one answer from an exported bundle on ONNX Runtime or TensorRT (no torch)."""

from __future__ import annotations

import json
from typing import Any

import click

from .options import image_tiles_option, pipeline_options, sampling_config, sampling_options, user_errors


@click.command()
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
