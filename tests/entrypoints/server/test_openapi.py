"""The OpenAPI document against the server it describes: what it lists, and a schemathesis run
(positive and negative data, bounded examples) that fails on any 5xx, any undocumented status or
content type, and any response body that does not match its documented schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

ERRORS_EVERYWHERE = {"400", "413", "500"}


def _doc(server) -> dict:
    resp = httpx.get(server.url + "/openapi.json", headers=server.headers, timeout=30)
    assert resp.status_code == 200
    return resp.json()


def test_document_lists_the_answers_the_server_gives(server):
    doc = _doc(server)  # the main server has an API key
    paths = doc["paths"]
    assert set(paths) == {
        "/health",
        "/ready",
        "/metrics",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/programs/{program_id}/release",
        "/v1/files",
        "/v1/files/{file_id}",
        "/v1/files/{file_id}/content",
        "/v1/batches",
        "/v1/batches/{batch_id}",
        "/v1/batches/{batch_id}/cancel",
        "/v1/agent/runs",
        "/v1/agent/runs/{run_id}",
        "/v1/agent/runs/{run_id}/cancel",
        "/v1/agent/runs/{run_id}/events",
        "/tokenize",
        "/detokenize",
        "/tokenizer_info",
        "/version",
    }
    for path, operations in paths.items():
        for operation in operations.values():
            responses = operation["responses"]
            assert "422" not in responses  # validation errors are 400s here
            expected = ERRORS_EVERYWHERE | ({"401"} if path != "/health" else set())
            assert expected <= set(responses), path
            for status, response in responses.items():
                if status != "200":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (path, status)
            assert ("security" in operation) == (path != "/health")
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = paths[path]["post"]["responses"]
        assert {"404", "429", "503"} <= set(responses)
        assert "Retry-After" in responses["429"]["headers"]
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        request = "ChatCompletionRequest" if "chat" in path else "CompletionRequest"
        model = doc["components"]["schemas"][request]["properties"]["model"]
        assert model["anyOf"][0]["enum"] == [server.model]
    assert "503" in paths["/ready"]["get"]["responses"]
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    error = doc["components"]["schemas"]["ErrorDetail"]
    assert set(error["required"]) == {"message", "type", "param", "code"}
    # The documented content type of /metrics is the one it is served with.
    metrics = httpx.get(server.url + "/metrics", headers=server.headers, timeout=30)
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == [metrics.headers["content-type"]]


def test_schemathesis_finds_no_server_error_nor_schema_mismatch(edge_server, tmp_path):
    """Coverage (boundary and negative values of every field) then fuzzing, both modes; a fixed seed
    so that a failure reproduces. max_tokens stays small: the server's context is 64 tokens."""
    checks = [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
        "unsupported_method",
    ]
    cmd = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        edge_server.url + "/openapi.json",
        "--mode=all",
        "--phases=coverage,fuzzing",
        "--max-examples=10",
        "--seed=3",
        "--workers=1",
        "--checks=" + ",".join(checks),
        "--continue-on-failure",
        "--generation-database=none",
        "--request-timeout=60",
        "--no-color",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-20000:]
    assert "passed" in output and " 0 passed" not in output
