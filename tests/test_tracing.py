"""OpenTelemetry tracing: one agent run over HTTP is one trace (run -> node -> HTTP request -> engine
request) with vLLM's gen_ai.* attributes, in the SDK's in-memory exporter; a real `loom serve` exports
OTLP/HTTP to a receiver this test runs; and with tracing off, loom loads no OpenTelemetry SDK."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from loom.config import EngineConfig
from loom.entrypoints.server.app import create_app
from loom.entrypoints.server.config import ServerConfig
from tests.conftest import REPO, free_port

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"

WORKFLOW = {
    "name": "traced",
    "sampling": {"max_tokens": 4, "temperature": 0, "ignore_eos": True},
    "nodes": [
        {"name": "ask", "prompt": "Name a colour."},
        {"name": "again", "prompt": "Another colour than {ask}?"},
    ],
}


@pytest.fixture(scope="module")
def traced(tiny_llama_dir: Path, tmp_path_factory):
    """(base URL, exporter) of an in-process `loom serve` app whose spans go to an in-memory exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    port = free_port()
    app = create_app(
        EngineConfig(model=str(tiny_llama_dir), num_blocks=512, num_threads=1),
        ServerConfig(
            port=port, served_model_name="loom-test", state_dir=str(tmp_path_factory.mktemp("traced"))
        ),
        tracer_provider=provider,
    )
    # A short graceful shutdown: a client's idle keep-alive connection would otherwise hold it up.
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    yield url, exporter
    server.should_exit = True
    thread.join(30)


def finished_spans(exporter, *names: str, timeout: float = 30.0) -> list:
    """The exporter's spans once one of each name has ended (a server span ends just after its
    response went out, so the client can be a moment ahead of it)."""
    deadline = time.monotonic() + timeout
    while True:
        spans = exporter.get_finished_spans()
        if all(any(s.name == n for s in spans) for n in names) or time.monotonic() > deadline:
            return list(spans)
        time.sleep(0.05)


def test_agent_run_is_one_trace_nesting_run_node_http_engine(traced):
    url, exporter = traced
    exporter.clear()
    with httpx.Client(base_url=url, timeout=60) as http:
        run = http.post("/v1/agent/runs", json={"workflow": WORKFLOW}).json()
        deadline = time.monotonic() + 120
        while http.get(f"/v1/agent/runs/{run['id']}").json()["status"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    spans = finished_spans(exporter, "agent.run traced")  # it ends just after the status is stored
    by_id = {s.context.span_id: s for s in spans}
    (run_span,) = [s for s in spans if s.name == "agent.run traced"]
    trace_id = run_span.context.trace_id

    def parent(span):
        return by_id.get(span.parent.span_id) if span.parent is not None else None

    nodes = {s.attributes["loom.node.name"]: s for s in spans if s.name.startswith("agent.node")}
    assert set(nodes) == {"ask", "again"}
    assert all(parent(n) is run_span for n in nodes.values())
    calls = [s for s in spans if s.name == "POST /v1/chat/completions" and s.context.trace_id == trace_id]
    assert sorted(parent(c).attributes["loom.node.name"] for c in calls) == ["again", "ask"]
    engine = [s for s in spans if s.name == "llm_request" and s.context.trace_id == trace_id]
    assert len(engine) == 2 and all(parent(e) in calls for e in engine)
    for e in engine:
        a = e.attributes
        assert a["gen_ai.response.model"] == "loom-test"
        assert a["gen_ai.request.max_tokens"] == 4 and a["gen_ai.request.temperature"] == 0
        assert a["gen_ai.usage.prompt_tokens"] > 0 and a["gen_ai.usage.completion_tokens"] == 4
        assert a["gen_ai.usage.cached_tokens"] >= 0
        for key in (
            "time_in_queue",
            "time_to_first_token",
            "time_in_model_prefill",
            "time_in_model_decode",
            "e2e",
        ):
            assert a[f"gen_ai.latency.{key}"] >= 0, key
        assert a["gen_ai.latency.time_to_first_token"] <= a["gen_ai.latency.e2e"]
        assert e.start_time <= e.end_time


def test_client_traceparent_becomes_the_parent(traced):
    url, exporter = traced
    exporter.clear()
    body = {"model": "loom-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    r = httpx.post(url + "/v1/chat/completions", json=body, headers={"traceparent": TRACEPARENT}, timeout=60)
    assert r.status_code == 200
    spans = finished_spans(exporter, "POST /v1/chat/completions", "llm_request")
    (http_span,) = [s for s in spans if s.name == "POST /v1/chat/completions"]
    assert format(http_span.context.trace_id, "032x") == TRACE_ID
    assert format(http_span.parent.span_id, "016x") == PARENT_ID
    assert http_span.attributes["http.response.status_code"] == 200
    (engine,) = [s for s in spans if s.name == "llm_request"]
    assert engine.parent.span_id == http_span.context.span_id


class _Receiver(http.server.BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def do_POST(self):  # noqa: N802 - the http.server API
        self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_otlp_http_export_to_a_receiver(launch_server):
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        server = launch_server(
            "otlp", "--otlp-traces-endpoint", f"http://127.0.0.1:{receiver.server_port}"
        ).wait_ready()
        body = {"model": "loom-test", "prompt": "Once", "max_tokens": 3}
        r = httpx.post(
            server.url + "/v1/completions", json=body, headers={"traceparent": TRACEPARENT}, timeout=60
        )
        assert r.status_code == 200
        server.stop()  # shutting down flushes the batched spans
        spans = []
        for raw in _Receiver.bodies:
            request = ExportTraceServiceRequest.FromString(raw)
            spans += [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
        engine = [s for s in spans if s.name == "llm_request"]
        assert len(engine) == 1 and engine[0].trace_id.hex() == TRACE_ID
        attrs = {a.key: a.value for a in engine[0].attributes}
        assert attrs["gen_ai.usage.prompt_tokens"].int_value > 0
        assert attrs["gen_ai.usage.completion_tokens"].int_value == 3
        assert attrs["gen_ai.latency.time_to_first_token"].double_value > 0
    finally:
        receiver.shutdown()


def test_tracing_off_loads_no_opentelemetry_sdk(tiny_llama_dir, tmp_path):
    script = f"""
import asyncio, sys, httpx
from loom.config import EngineConfig
from loom.entrypoints.server.app import create_app
from loom.entrypoints.server.config import ServerConfig
from loom.tracing import NO_TRACING

async def main():
    app = create_app(EngineConfig(model={str(tiny_llama_dir)!r}, num_blocks=64, num_threads=1),
                     ServerConfig(state_dir={str(tmp_path / "state")!r}))
    assert app.state.loom.tracing is NO_TRACING
    async with app.router.lifespan_context(app):
        await asyncio.to_thread(app.state.loom.engine.wait_ready)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as c:
            r = await c.post("/v1/completions", json={{"prompt": "a", "max_tokens": 2}},
                             headers={{"traceparent": {TRACEPARENT!r}}})
            assert r.status_code == 200, r.text
    print(sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))))

asyncio.run(main())
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
