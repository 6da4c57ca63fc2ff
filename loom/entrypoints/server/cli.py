"""`loom serve`: flags from ServerConfig and EngineConfig, uvicorn with a draining SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

import uvicorn

from loom.config import add_config_args, config_from_args
from loom.entrypoints.server.config import ServerConfig
from loom.entrypoints.server.serving import ServerState
from loom.errors import InvalidRequest
from loom.serving.config import ScaleOutConfig

logger = logging.getLogger(__name__)

# After a drain, only idle keep-alive connections remain; this bounds how long uvicorn waits for them.
_SHUTDOWN_GRACE_S = 2
DRAIN_CUT_EXIT = 3
"""Exit status of `loom serve` when the drain timeout cut requests short (0 when all finished)."""
EXIT_ENGINE_DEAD = 4
"""Exit status when the engine died (its loop raised, or a step hung past --step-timeout-s)."""
EXIT_BAD_MODEL = 2
"""Exit status when the model cannot be served: no such directory, or it failed to load."""


def add_server_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, ServerConfig, "server")


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    return config_from_args(args, ServerConfig)


def scale_out_config_from_args(args: argparse.Namespace) -> ScaleOutConfig:
    return config_from_args(args, ScaleOutConfig)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `loom serve` on the `loom` command's subparsers."""
    from loom.entrypoints.cli import add_engine_args

    parser = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API (the built-in tiny model without --model).",
    )
    parser.add_argument(
        "model_tag",
        nargs="?",
        metavar="MODEL",
        help="model directory (the same as --model; none: the built-in tiny model)",
    )
    add_server_args(parser)
    add_engine_args(parser)
    add_config_args(parser, ScaleOutConfig, "scale-out (Ray Serve)")
    parser.set_defaults(func=run_server)


def model_problem(model: str | None) -> str | None:
    """Why `model` cannot be served (checked before the server starts), or None."""
    if model is None:
        return None
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            return f"{model} is not a model directory: it has no config.json (an HF-format checkpoint)"
        return None
    why = f"model directory {model} does not exist"
    if not path.is_absolute() and model.count("/") == 1 and not model.startswith("."):
        why += (
            f" ({model!r} looks like a Hugging Face hub id: loom never downloads models; download it first, "
            f"e.g. `huggingface-cli download {model} --local-dir DIR`, and serve DIR)"
        )
    return why


class DrainingServer(uvicorn.Server):
    """uvicorn, except that SIGTERM drains first: /ready and new requests answer 503 (the socket stays
    open, so clients and load balancers get an answer rather than a refused connection) while running
    requests finish, up to the drain timeout; then the usual shutdown, and exit status 0. If the timeout
    cut requests short, each got an answer first (a stream an in-band error event and [DONE], a plain
    request a 503), and the exit status is DRAIN_CUT_EXIT.

    A second SIGTERM, or SIGINT, shuts down at once as plain uvicorn does.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float):
        super().__init__(config)
        self.state = state
        self.drain_timeout = drain_timeout
        self.exit_code = 0
        state.on_fatal = self.fail
        self.load_error: BaseException | None = None

    def fail(self) -> None:
        """The engine died: shut down now and exit non-zero, so a supervisor restarts the server."""
        self.exit_code = EXIT_ENGINE_DEAD
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self.state.draining:
            logger.info("SIGTERM: no new requests; draining for up to %.1f s", self.drain_timeout)
            # Not recorded in _captured_signals: uvicorn re-raises those after shutdown, and a drained
            # shutdown is a clean exit, not death by signal.
            self.state.begin_drain(self.drain_timeout)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        error = self.state.engine.error
        if error is not None and not self.should_exit:
            # Answering 503 forever would hide it from the operator: a server that cannot load its model
            # is not a server.
            self.load_error, self.exit_code, self.should_exit = error, EXIT_BAD_MODEL, True
        if self.state.draining and not self.should_exit and self.state.drain_done():
            self.should_exit = True
        return await super().on_tick(counter)


def run_server(args: argparse.Namespace) -> None:
    """Run `loom serve` until SIGTERM (drained) or SIGINT."""
    from loom.entrypoints.cli import engine_config_from_args
    from loom.entrypoints.server.app import create_app

    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise SystemExit(
                f"loom serve: give the model once (got {args.model_tag} and --model {args.model})"
            )
        args.model = args.model_tag
    problem = model_problem(args.model)
    if problem is not None:
        print(f"loom serve: {problem}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_MODEL)
    try:
        scale = scale_out_config_from_args(args)
        engine_config = engine_config_from_args(args)
        server_config = server_config_from_args(args)
    except InvalidRequest as e:
        raise SystemExit(f"loom serve: error: {e}") from None
    if scale.replicas is not None:
        from loom.serving.app import run_scale_out

        run_scale_out(scale, engine_config, server_config)
        return
    if engine_config.num_threads is None:
        # On CPU the HTTP event loop and the detokenizer need a core of their own: torch's worker
        # threads spin, and sharing every core with them slowed serving ~10x in benchmarks/serving.py.
        engine_config.num_threads = max(1, (os.cpu_count() or 2) - 1)
    app = create_app(engine_config, server_config)
    config = uvicorn.Config(
        app,
        host=server_config.host,
        port=server_config.port,
        log_level=getattr(args, "log_level", "info").lower(),
        timeout_graceful_shutdown=_SHUTDOWN_GRACE_S,
    )
    state = app.state.loom
    server = DrainingServer(config, state, server_config.drain_timeout)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises SIGINT after its shutdown; that is the expected way out
        pass
    if server.load_error is not None:
        print(f"loom serve: the model failed to load: {server.load_error}", file=sys.stderr)
        raise SystemExit(server.exit_code)
    if server.exit_code:
        logger.critical("exiting with status %d: the engine died", server.exit_code)
        raise SystemExit(server.exit_code)
    if state.drain_cut is not None:
        # A supervisor (systemd, Kubernetes) should see that work was lost, not a clean stop.
        logger.error("the drain timed out and cut requests short: exiting with status %d", DRAIN_CUT_EXIT)
        raise SystemExit(DRAIN_CUT_EXIT)
