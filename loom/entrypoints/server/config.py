"""ServerConfig: the HTTP server's own settings (the engine's are EngineConfig). `loom serve` flags come
from these fields and their docstrings."""

from __future__ import annotations

from dataclasses import dataclass

from loom.errors import InvalidRequest
from loom.frontend.truncation import POLICIES

TOOL_CALL_PARSERS = ("auto", "hermes", "glm4", "none")


@dataclass
class ServerConfig:
    """How the OpenAI-compatible server listens, authenticates, and protects the engine from overload."""

    host: str = "127.0.0.1"
    """Address to bind; loopback by default so a server is never exposed by accident."""
    port: int = 8000
    """TCP port to listen on."""
    api_key: str | None = None
    """When set, every route except /health requires `Authorization: Bearer <key>`."""
    allowed_hosts: str | None = None
    """Without --api-key, Host names answered besides localhost, *.localhost, IP addresses and --host (a defence against DNS rebinding; others get 400): comma-separated, ".example.com" (or "*.example.com") allows its subdomains, "*" any host."""
    served_model_name: str | None = None
    """The model name clients send and see; defaults to --model (or "loom-tiny" for the built-in model)."""
    max_waiting: int = 256
    """Most sequences in flight (waiting + running) before new requests get 429; a request counts n x its prompts, and one larger than this alone gets 400."""
    max_waiting_tokens: int | None = None
    """Most prompt tokens in flight before new requests get 429; None disables the check."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Largest request body accepted, in bytes; larger ones get 413."""
    max_prompt_chars: int = 1_000_000
    """Most characters of prompt text (a completion's prompt, or a conversation's text) a request may carry; longer ones get 400 before any tokenizing is done."""
    max_n: int = 16
    """Largest `n` (completions per prompt) a request may ask for."""
    drain_timeout: float = 30.0
    """On SIGTERM, seconds to let running requests finish (new ones get 503); when it expires, streams still running end with an error event and [DONE], other requests get 503, and the exit status is 3."""
    retry_after: int = 1
    """Seconds sent in the Retry-After header of 429 and 503 answers."""
    tool_call_parser: str = "auto"
    """How tool calls are read from model output: auto (hermes <tool_call> tags, else GLM-4 "name\\n{json}"), hermes, glm4, none."""
    truncation: str = "error"
    """A prompt longer than the context minus max_tokens: error (400), left (keep its last tokens; a chat keeps its system prompt), drop_turns (chat: drop the oldest turns; completions cut from the left). A request's `truncation` field overrides it."""
    response_cache: bool = True
    """Answer a repeated deterministic request (temperature 0 or a fixed seed) from memory, without running the model."""
    response_cache_max_bytes: int = 64 * 2**20
    """Most bytes of answers the response cache holds; the least recently used go first."""
    response_cache_ttl_s: float = 600.0
    """Seconds a cached answer may be served."""
    state_dir: str | None = None
    """Directory of the durable job state (SQLite in WAL mode, uploaded and output files); default <user cache>/loom/state/<host>_<port>. Batches and agent runs in it resume when a server starts on it again."""
    state_max_bytes: int | None = None
    """Most bytes the state directory may hold (files and database); past it, writes get 507. None: as much as the disk holds."""
    max_file_bytes: int = 200 * 2**20
    """Largest file upload (POST /v1/files) accepted, in bytes; larger ones get 413 before their body is read."""
    job_queue: str | None = None
    """Where batch lines queue: None (the SQLite database under --state-dir) or a redis:// URL, for several servers sharing batch work through Redis Streams."""
    job_consumer: str | None = None
    """This server's consumer name in the Redis queue (stable across restarts, so it takes back the lines it held); default <hostname>:<port>."""
    batch_max_concurrency: int = 4
    """Most batch lines running at once, when no interactive request is in flight (none start while one is)."""
    batch_idle_s: float = 1.0
    """Seconds without interactive requests before batch lines start again."""
    batch_preempt: bool = True
    """Abort running batch lines when an interactive request arrives; they go back to the queue (their prompt KV stays cached) and run again when the server is idle."""
    batch_priority: int = 10
    """Scheduling priority of batch lines that set none (larger runs later; the engine orders by it under --scheduling-policy priority)."""
    otlp_traces_endpoint: str | None = None
    """Export OpenTelemetry traces over OTLP/HTTP to this collector URL (e.g. http://localhost:4318); off when unset (needs the `tracing` extra)."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> InvalidRequest:
            return InvalidRequest(f"{name} {why}", param=name)

        if not 0 <= self.port <= 65535:
            raise bad("port", f"must be in [0, 65535], got {self.port}")
        for name in (
            "max_waiting",
            "max_body_bytes",
            "max_prompt_chars",
            "max_n",
            "max_file_bytes",
            "batch_max_concurrency",
        ):
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_waiting_tokens is not None and self.max_waiting_tokens < 1:
            raise bad("max_waiting_tokens", f"must be >= 1, got {self.max_waiting_tokens}")
        if self.drain_timeout < 0:
            raise bad("drain_timeout", f"must be >= 0, got {self.drain_timeout}")
        if self.retry_after < 0:
            raise bad("retry_after", f"must be >= 0, got {self.retry_after}")
        if self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise bad(
                "tool_call_parser", f"must be one of {TOOL_CALL_PARSERS}, got {self.tool_call_parser!r}"
            )
        if self.truncation not in POLICIES:
            raise bad("truncation", f"must be one of {POLICIES}, got {self.truncation!r}")
        if self.response_cache_max_bytes < 1:
            raise bad("response_cache_max_bytes", f"must be >= 1, got {self.response_cache_max_bytes}")
        if self.response_cache_ttl_s <= 0:
            raise bad("response_cache_ttl_s", f"must be > 0, got {self.response_cache_ttl_s}")
        if self.state_max_bytes is not None and self.state_max_bytes < 1:
            raise bad("state_max_bytes", f"must be >= 1, got {self.state_max_bytes}")
        if self.batch_idle_s < 0:
            raise bad("batch_idle_s", f"must be >= 0, got {self.batch_idle_s}")
        if self.job_queue is not None and not self.job_queue.startswith(("redis://", "rediss://", "unix://")):
            raise bad("job_queue", f"must be a redis:// URL (or unset for SQLite), got {self.job_queue!r}")
        if self.api_key == "":
            raise bad("api_key", "must not be empty (leave it unset to disable authentication)")
        for name in self.host_allow_list() or ():
            if not name or ":" in name or "/" in name or "*" in name:
                raise bad(
                    "allowed_hosts",
                    f"must be host names without ports, or '*' alone, got {self.allowed_hosts!r}",
                )

    def host_allow_list(self) -> tuple[str, ...] | None:
        """The extra allowed Host names; None when any host is allowed ("*")."""
        names = tuple(n.strip() for n in (self.allowed_hosts or "").split(",") if n.strip())
        if names == ("*",):
            return None
        return tuple(n[1:] if n.startswith("*.") else n for n in names)  # "*.x.com" means ".x.com"
