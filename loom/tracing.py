"""OpenTelemetry tracing: a span per HTTP request, per engine request, per agent run and node.

Off by default and free when off: nothing here imports opentelemetry until a server is started with
--otlp-traces-endpoint (or a test hands in a TracerProvider); with tracing off the server holds
`NO_TRACING`, whose hooks do nothing. The engine knows nothing of this module: the engine-request span
is built from the finished request's RequestOutput (its timestamps and counts), above the engine.

Attribute names follow vLLM's (`gen_ai.*`): request parameters, usage, and latencies from the engine's
timestamps (arrival, first scheduled, first token, finished). The spans of one agent run nest:
agent.run -> agent.node -> HTTP request (`POST /v1/chat/completions`, context from `traceparent`) ->
llm_request (the engine request).
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

TRACER_NAME = "loom"


def trace_headers() -> dict[str, str]:
    """`traceparent` (and `tracestate`) of the current span, for an outgoing request; {} when tracing
    was never set up in this process (opentelemetry not even imported: nothing to propagate)."""
    if "opentelemetry.propagate" not in sys.modules:
        return {}
    from opentelemetry.propagate import inject

    headers: dict[str, str] = {}
    inject(headers)
    return headers


def _wall_ns(monotonic: float) -> int:
    """A time.monotonic() instant as wall-clock nanoseconds (what span timestamps are)."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


class _NoRecorder:
    """The engine-request hook when tracing is off."""

    def __enter__(self) -> _NoRecorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def on_output(self, out: Any) -> None:
        pass


_NO_RECORDER = _NoRecorder()


class NoTracing:
    """Tracing off: every hook is a no-op."""

    enabled = False

    def engine_request(self, job: Any, model: str) -> _NoRecorder:
        return _NO_RECORDER

    def span(self, name: str, attributes: dict[str, Any] | None = None) -> AbstractContextManager:
        return nullcontext()

    def shutdown(self) -> None:
        pass


NO_TRACING = NoTracing()


class _EngineRequestSpan:
    """Collects one engine request's outputs; on exit, records its llm_request span with vLLM's
    attributes, started at the request's arrival."""

    def __init__(self, tracing: Tracing, job: Any, model: str):
        self.tracing, self.job, self.model = tracing, job, model
        self.completion_tokens = 0
        self.last = None
        self.parent = tracing.context_api.get_current()

    def __enter__(self) -> _EngineRequestSpan:
        return self

    def on_output(self, out: Any) -> None:
        self.completion_tokens += sum(len(c.token_ids) for c in out.outputs)
        self.last = out

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        out, params = self.last, self.job.params
        times = out.metrics if out is not None else {}
        arrival = times.get("arrival_time")
        attrs: dict[str, Any] = {
            "gen_ai.request.id": self.job.request_id,
            "gen_ai.response.model": self.model,
            "gen_ai.request.temperature": params.temperature,
            "gen_ai.request.top_p": params.top_p,
            "gen_ai.request.n": params.n,
            "gen_ai.usage.prompt_tokens": len(self.job.prompt_token_ids),
            "gen_ai.usage.completion_tokens": self.completion_tokens,
            "gen_ai.usage.num_sequences": params.n,
        }
        if params.max_tokens is not None:
            attrs["gen_ai.request.max_tokens"] = params.max_tokens
        if params.priority:
            attrs["gen_ai.request.priority"] = params.priority
        if out is not None:
            attrs["gen_ai.usage.cached_tokens"] = out.num_cached_tokens
            finish = [c.finish_reason for c in out.outputs if c.finish_reason]
            if finish:
                attrs["gen_ai.response.finish_reasons"] = finish
        scheduled, first, done = (
            times.get(k) for k in ("first_scheduled_time", "first_token_time", "finished_time")
        )
        end = done if done is not None else time.monotonic()
        if arrival is not None:
            if scheduled is not None:
                attrs["gen_ai.latency.time_in_queue"] = scheduled - arrival
            if first is not None:
                attrs["gen_ai.latency.time_to_first_token"] = first - arrival
            attrs["gen_ai.latency.e2e"] = end - arrival
        if scheduled is not None:
            attrs["gen_ai.latency.time_in_model_inference"] = end - scheduled
            if first is not None:
                attrs["gen_ai.latency.time_in_model_prefill"] = first - scheduled
                attrs["gen_ai.latency.time_in_model_decode"] = end - first
        t = self.tracing
        start = _wall_ns(arrival) if arrival is not None else None
        span = t.tracer.start_span(
            "llm_request",
            context=self.parent,
            kind=t.trace_api.SpanKind.INTERNAL,
            attributes=attrs,
            start_time=start,
        )
        if exc is not None:
            span.record_exception(exc)
            span.set_status(t.trace_api.Status(t.trace_api.StatusCode.ERROR, str(exc) or type(exc).__name__))
        span.end(end_time=_wall_ns(end))


class Tracing:
    """Tracing on, with one TracerProvider (the server's own, not the process-global one)."""

    enabled = True

    def __init__(self, provider: Any):
        from opentelemetry import context, trace
        from opentelemetry.propagate import extract

        self.provider = provider
        self.tracer = provider.get_tracer(TRACER_NAME)
        self.trace_api = trace
        self.context_api = context
        self._extract = extract

    @classmethod
    def to_endpoint(cls, endpoint: str, service_name: str = "loom") -> Tracing:
        """Export spans over OTLP/HTTP (protobuf) to `endpoint` (a collector's base URL or its
        /v1/traces URL), in batches off the request path."""
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as e:
            raise ImportError(
                "--otlp-traces-endpoint needs the tracing extra: pip install 'loom[tracing]'"
            ) from e
        url = endpoint.rstrip("/")
        if not url.endswith("/v1/traces"):
            url += "/v1/traces"
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        return cls(provider)

    def engine_request(self, job: Any, model: str) -> _EngineRequestSpan:
        return _EngineRequestSpan(self, job, model)

    @contextmanager
    def span(self, name: str, attributes: dict[str, Any] | None = None):
        with self.tracer.start_as_current_span(name, attributes=attributes or {}) as span:
            yield span

    def shutdown(self) -> None:
        self.provider.shutdown()


class HTTPSpans:
    """ASGI middleware (`app.add_middleware(HTTPSpans, tracing=...)`): a SERVER span per HTTP request,
    child of the client's `traceparent` when it sent one."""

    def __init__(self, app: ASGIApp, tracing: Tracing):
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t = self.tracing
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        parent = t._extract(carrier)
        method, path = scope["method"], scope["path"]
        attrs = {"http.request.method": method, "url.path": path}
        status: dict[str, int] = {}

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        with t.tracer.start_as_current_span(
            f"{method} {path}", context=parent, kind=t.trace_api.SpanKind.SERVER, attributes=attrs
        ) as span:
            await self.app(scope, receive, send_status)
            if "code" in status:
                span.set_attribute("http.response.status_code", status["code"])
                if status["code"] >= 500:
                    span.set_status(t.trace_api.Status(t.trace_api.StatusCode.ERROR))
