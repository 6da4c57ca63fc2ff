"""The Serve application's wiring and the autoscaling policy, without a running cluster."""

from __future__ import annotations

import pytest
from ray.serve import Application
from ray.serve.config import AutoscalingConfig

from loom.config import EngineConfig
from loom.entrypoints.server.config import ServerConfig
from loom.errors import InvalidRequest
from loom.serving.app import app_from_env, build_app, default_engine_threads, replica_options
from loom.serving.autoscaling import QueueAndKVPolicy, desired_replicas
from loom.serving.config import ScaleOutConfig
from loom.serving.router import LoomRequestRouter


def test_replica_options_route_with_loom_and_autoscale_by_queue_and_kv():
    scale = ScaleOutConfig(replicas=2, autoscale_max_replicas=6, balance_abs_threshold=5)
    options = replica_options(scale, ServerConfig(drain_timeout=12), 2)
    router = options["request_router_config"]
    assert router.request_router_class == f"{LoomRequestRouter.__module__}.{LoomRequestRouter.__name__}"
    assert router.request_router_kwargs["abs_threshold"] == 5
    autoscaling = options["autoscaling_config"]
    assert isinstance(autoscaling, AutoscalingConfig) and "num_replicas" not in options
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (2, 6)
    assert autoscaling.policy.policy_function == "loom.serving.autoscaling:QueueAndKVPolicy"
    assert options["graceful_shutdown_timeout_s"] == 12
    plain = replica_options(ScaleOutConfig(replicas=3, routing="power_of_two"), ServerConfig(), 3)
    assert plain["num_replicas"] == 3 and "request_router_config" not in plain


def test_build_app_and_the_kuberay_builder_make_a_serve_application(tmp_path):
    scale = ScaleOutConfig(replicas=2, canary=str(tmp_path), canary_weight=20)
    assert isinstance(build_app(scale, EngineConfig(), ServerConfig()), Application)
    built = app_from_env(
        {"replicas": 2, "num_threads": 1, "enable_prefix_caching": False, "canary": str(tmp_path)}
    )
    assert isinstance(built, Application)
    with pytest.raises(InvalidRequest):
        app_from_env({"replicas": 0})


def test_replica_threads_default_to_the_cpus_ray_reserves():
    scale = ScaleOutConfig(replicas=2, replica_num_cpus=3)
    assert default_engine_threads(EngineConfig(), scale).num_threads == 3
    assert default_engine_threads(EngineConfig(num_threads=1), scale).num_threads == 1


def test_desired_replicas_follow_the_busier_of_queue_and_kv():
    assert (
        desired_replicas(2, in_flight=8, kv_usages=[0.1, 0.1], target_ongoing_requests=8, target_kv_usage=0.8)
        == 1
    )
    assert (
        desired_replicas(
            2, in_flight=30, kv_usages=[0.1, 0.1], target_ongoing_requests=8, target_kv_usage=0.8
        )
        == 4
    )
    assert (
        desired_replicas(
            2, in_flight=4, kv_usages=[0.95, 0.9], target_ongoing_requests=8, target_kv_usage=0.8
        )
        == 3
    )
    assert desired_replicas(0, in_flight=0, kv_usages=[], target_ongoing_requests=8, target_kv_usage=0.8) == 0


class Ctx:
    current_num_replicas = 2
    total_num_requests = 20
    aggregated_metrics = {"kv_usage": {"r1": 0.5, "r2": 0.7}}


def test_policy_reads_ray_serve_context():
    assert QueueAndKVPolicy(target_ongoing_requests=4, target_kv_usage=0.8)(Ctx()) == (5, {})
