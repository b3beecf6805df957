"""The same server as a Ray Serve deployment: N replicas behind Ray's HTTP proxy (`cluster` extra).

    nanovlm serve BUNDLE --ray --replicas 2            # a local Ray cluster, or the one RAY_ADDRESS names
    serve run serve.ray_app:build bundle=DIR replicas=2  # Ray's own CLI, with an application builder

Each replica runs create_app() unchanged (its own engine, continuous batching inside it); Ray's
proxy spreads requests over replicas, restarts one whose process dies or whose health check
fails, and places replicas on the cluster's machines by the resources they ask for
(docs/serving.md). Every replica loads the bundle from the same path, so on several machines the
bundle must be at that path on each (a shared mount or a copy).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from runtime.engine_api import EngineConfig

from .app import ServeConfig, create_app
from .security import SecurityPolicy

log = logging.getLogger(__name__)


def application(
    config: ServeConfig, replicas: int = 1, cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0
) -> Any:
    """A Ray Serve application of `replicas` copies of the server (ray.serve.Application)."""
    from ray import serve

    if replicas < 1:
        raise ValueError(f"replicas={replicas} must be at least 1")
    # ONNX Runtime's intra-op threads: the CPUs Ray reserves for the replica, not the whole machine
    config = replace(config, threads=config.threads or max(1, int(cpus_per_replica)))

    def build_asgi() -> Any:  # evaluated on each replica; keys, Host and Origin checks as `serve`
        return create_app(config, load_in_background=False)

    @serve.deployment(
        name="nanovlm",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        max_ongoing_requests=config.engine.max_batch + config.engine.max_queue,
        health_check_period_s=5,
        health_check_timeout_s=30,
    )
    @serve.ingress(build_asgi)
    class NanoVLM:
        """A replica: the ASGI app loads the bundle at startup and fails the start if it cannot."""

    return NanoVLM.bind()


def build(args: dict[str, str]) -> Any:
    """Application builder for `serve run serve.ray_app:build bundle=DIR [replicas=N] [cpus=C]
    [api_key_file=F] [allowed_hosts=A,B] [cors_origins=O,P]` (keys also from NANOVLM_API_KEY)."""
    if "bundle" not in args:
        raise ValueError("serve run serve.ray_app:build needs bundle=DIR")
    engine = EngineConfig(int(args.get("max_batch", 8)), int(args.get("max_queue", 64)))
    listed = lambda name: [v for v in args.get(name, "").split(",") if v]  # noqa: E731
    security = SecurityPolicy.from_options(
        key_file=args.get("api_key_file"),
        allowed_hosts=listed("allowed_hosts"),
        cors_origins=listed("cors_origins"),
        open_metrics=args.get("open_metrics", "") in ("1", "true"),
    )
    config = ServeConfig(args["bundle"], args.get("name"), engine, security=security)
    return application(
        config, int(args.get("replicas", 1)), float(args.get("cpus", 1)), float(args.get("gpus", 0))
    )


def run(
    config: ServeConfig, replicas: int, host: str, port: int, cpus_per_replica: float, gpus_per_replica: float
) -> None:
    """Start (or join, with RAY_ADDRESS) a Ray cluster, deploy, and block until interrupted."""
    import signal
    import sys

    import ray
    from ray import serve

    # SIGTERM ends the process through the finally below, so the local cluster is shut down too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ray.init(ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(
        application(config, replicas, cpus_per_replica, gpus_per_replica), name="nanovlm", route_prefix="/"
    )
    log.info("serving %s on http://%s:%d with %d Ray Serve replicas", config.model_name, host, port, replicas)
    try:
        import time

        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
