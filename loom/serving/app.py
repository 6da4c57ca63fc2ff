"""The Ray Serve application of `loom serve --replicas N`: one deployment of LoomReplica per model
version, each routed by LoomRequestRouter, behind one LoomIngress that serves HTTP.

`build_app` is also the import target of the KubeRay RayService in deploy/ (through `app_from_env`).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import replace
from types import FrameType

from loom.config import EngineConfig
from loom.entrypoints.server.config import ServerConfig
from loom.errors import InvalidRequest
from loom.serving.config import ScaleOutConfig

logger = logging.getLogger(__name__)

APP_NAME = "loom"
# Ray's default health-check period is 10 s and it acts after 3 misses; a replica whose engine died
# answers 503 on /health at once, so checking more often only shortens how long it stays in rotation.
HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 10.0


def replica_options(scale: ScaleOutConfig, server: ServerConfig, num_replicas: int) -> dict:
    """Ray Serve deployment options of one version's replicas."""
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

    from loom.serving.router import LoomRequestRouter

    options: dict = {
        "max_ongoing_requests": scale.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": scale.replica_num_cpus},
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        # Scale-down and redeploys wait for in-flight requests as long as a SIGTERM drain would.
        "graceful_shutdown_timeout_s": server.drain_timeout,
        "graceful_shutdown_wait_loop_s": 1.0,
    }
    if scale.routing != "power_of_two":  # power_of_two is Ray Serve's own default router
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=LoomRequestRouter,
            request_router_kwargs={
                "policy": scale.routing,
                "abs_threshold": scale.balance_abs_threshold,
                "rel_threshold": scale.balance_rel_threshold,
                "cache_threshold": scale.cache_threshold,
                "blocks_per_replica": scale.prefix_blocks_per_replica,
            },
        )
    if scale.autoscale_max_replicas is not None:
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=num_replicas,
            initial_replicas=num_replicas,
            max_replicas=max(num_replicas, scale.autoscale_max_replicas),
            target_ongoing_requests=scale.target_ongoing_requests,
            policy=AutoscalingPolicy(
                policy_function="loom.serving.autoscaling:QueueAndKVPolicy",
                policy_kwargs={
                    "target_ongoing_requests": scale.target_ongoing_requests,
                    "target_kv_usage": scale.target_kv_usage,
                },
            ),
        )
    else:
        options["num_replicas"] = num_replicas
    return options


def build_app(
    scale: ScaleOutConfig,
    engine: EngineConfig,
    server: ServerConfig,
    replica_classes: dict[str, type] | None = None,
):
    """The Serve application (not yet running): `serve.run(build_app(...))`. `replica_classes` maps a
    version to a LoomReplica subclass to deploy instead (tests inject faults this way)."""
    from ray import serve

    from loom.serving.ingress import LoomIngress
    from loom.serving.replica import LoomReplica

    if scale.replicas is None:
        raise InvalidRequest("replicas must be set to serve on Ray", param="replicas")
    # Both versions answer to the same model name: clients must not notice which one served them.
    name = server.served_model_name or engine.model or "loom-tiny"
    replica_server = replace(server, served_model_name=name)
    versions = {scale.model_version: (engine, scale.replicas)}
    if scale.canary is not None:
        versions[scale.canary_version] = (replace(engine, model=scale.canary), scale.canary_replicas)
    handles = {}
    for version, (engine_config, num_replicas) in versions.items():
        cls = (replica_classes or {}).get(version, LoomReplica)
        deployment = serve.deployment(
            cls, name=f"replica-{version}", **replica_options(scale, server, num_replicas)
        )
        handles[version] = deployment.bind(engine_config, replica_server, version)
    ingress = serve.deployment(
        LoomIngress,
        name="ingress",
        num_replicas=1,
        # The ingress waits on replicas; it needs no CPU reservation of its own, and requests beyond
        # the replicas' limits queue in its router rather than being refused here.
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=100_000,
    )
    return ingress.bind(scale, server.api_key, **handles)


def default_engine_threads(engine: EngineConfig, scale: ScaleOutConfig) -> EngineConfig:
    """Each replica's torch threads default to the CPUs Ray reserves for it (not the whole machine)."""
    if engine.num_threads is None:
        return replace(engine, num_threads=max(1, int(scale.replica_num_cpus)))
    return engine


def run_scale_out(scale: ScaleOutConfig, engine: EngineConfig, server: ServerConfig) -> None:
    """`loom serve --replicas N`: start (or join) Ray, run the app on --host/--port until SIGINT or
    SIGTERM (also while the replicas load), then delete the app (replicas drain) and leave Ray."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise SystemExit("loom serve --replicas needs Ray Serve: pip install 'loom[ray]'") from None

    engine = default_engine_threads(engine, scale)

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    try:
        # A SIGTERM during ray.init meets Ray's own handler (SystemExit); the finally still cleans up.
        ray.init(address=scale.ray_address, include_dashboard=False, log_to_driver=True)
        # Ours from here on, before anything that blocks: a SIGTERM while the replicas load must
        # shut Ray down too, not leave its processes behind.
        signal.signal(signal.SIGTERM, stop)
        serve.start(http_options={"host": server.host, "port": server.port})
        serve.run(build_app(scale, engine, server), name=APP_NAME, route_prefix="/")
        logger.info("serving on http://%s:%d with %d replica(s)", server.host, server.port, scale.replicas)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt as e:
        logger.info("%s: shutting down (replicas drain)", e or "SIGINT")
    finally:
        # Ignore further signals while Serve drains: a second one must not cut the shutdown short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if ray.is_initialized():
                # Only this app: on a cluster we joined (--ray-address), other Serve apps keep running.
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()  # stops the local cluster if this process started it


def app_from_env(args: dict[str, str] | None = None):
    """Builder for `serve run loom.serving.app:app_from_env` and KubeRay: the same flags as `loom serve`,
    given as Serve application args (or LOOM_SERVE_ARGS, a command line)."""
    import shlex

    from loom.entrypoints.cli import build_parser, engine_config_from_args
    from loom.entrypoints.server.cli import scale_out_config_from_args, server_config_from_args

    argv = shlex.split(os.environ.get("LOOM_SERVE_ARGS", ""))
    for key, value in (args or {}).items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            argv += [f"--{flag}", str(value)]
    parsed = build_parser().parse_args(["serve", *argv])
    scale = scale_out_config_from_args(parsed)
    engine = default_engine_threads(engine_config_from_args(parsed), scale)
    return build_app(scale, engine, server_config_from_args(parsed))
