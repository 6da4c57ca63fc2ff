"""ServerConfig validation, `loom serve` flags, and the app's behaviour when the model cannot load."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from loom.config import EngineConfig
from loom.entrypoints.cli import build_parser, engine_config_from_args
from loom.entrypoints.server import ServerConfig, create_app
from loom.entrypoints.server.cli import server_config_from_args
from loom.errors import InvalidRequest


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"port": 70000}, "port"),
        ({"max_n": 0}, "max_n"),
        ({"max_waiting": 0}, "max_waiting"),
        ({"max_waiting_tokens": 0}, "max_waiting_tokens"),
        ({"drain_timeout": -1}, "drain_timeout"),
        ({"tool_call_parser": "xml"}, "tool_call_parser"),
        ({"api_key": ""}, "api_key"),
    ],
)
def test_server_config_rejects_bad_values(fields, param):
    with pytest.raises(InvalidRequest) as e:
        ServerConfig(**fields)
    assert e.value.param == param


def test_serve_flags_build_both_configs():
    args = build_parser().parse_args(
        ["serve", "--port", "9001", "--api-key", "k", "--max-waiting", "5", "--max-waiting-tokens", "900",
         "--drain-timeout", "2.5", "--served-model-name", "m", "--max-num-seqs", "8", "--no-enable-prefix-caching"]
    )  # fmt: skip
    server = server_config_from_args(args)
    assert (server.host, server.port, server.api_key, server.max_waiting) == ("127.0.0.1", 9001, "k", 5)
    assert (server.max_waiting_tokens, server.drain_timeout, server.served_model_name, server.max_n) == (
        900,
        2.5,
        "m",
        16,
    )
    engine = engine_config_from_args(args)
    assert engine.max_num_seqs == 8 and engine.enable_prefix_caching is False and engine.model is None
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    assert "--max-body-bytes" in help_text and "413" in help_text  # help comes from the field docstrings


def test_failed_model_load_keeps_health_up_and_ready_503(tmp_path):
    app = create_app(EngineConfig(model=str(tmp_path / "missing")), ServerConfig())
    # TestClient's default Host, "testserver", is not one a keyless server answers.
    with TestClient(app, base_url="http://localhost") as client:
        app.state.loom.engine.ready.wait(30)
        assert client.get("/health").status_code == 200
        ready = client.get("/ready")
        assert ready.status_code == 503 and "failed to load" in ready.json()["error"]["message"]
        resp = client.post("/v1/completions", json={"prompt": "hi"})
        assert resp.status_code == 503 and resp.json()["error"]["type"] == "service_unavailable_error"
        assert client.get("/v1/models").json()["data"][0]["id"] == str(tmp_path / "missing")


def test_request_fields_become_sampling_params():
    from loom.entrypoints.server.fields import sampling_params
    from loom.entrypoints.server.protocol import CompletionRequest

    body = CompletionRequest(
        prompt="x", temperature=None, top_k=5, stop="END", seed=3, program_id="run-1", priority=2
    )
    params = sampling_params(body, max_n=16, max_tokens=4, logprobs=2)
    assert (params.temperature, params.top_k, params.stop, params.seed, params.priority) == (
        1.0,
        5,
        ["END"],
        3,
        2,
    )
    assert params.logprobs == 2 and params.max_tokens == 4
    assert params.extra == {"program_id": "run-1"}  # the engine pins KV per agent program
    with pytest.raises(InvalidRequest) as e:
        sampling_params(CompletionRequest(prompt="x", n=3), max_n=2, max_tokens=4)
    assert e.value.param == "n"
