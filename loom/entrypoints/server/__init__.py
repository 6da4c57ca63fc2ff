"""The OpenAI-compatible HTTP server: `create_app(engine_config, server_config)` and `loom serve`."""

from loom.entrypoints.server.app import create_app
from loom.entrypoints.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
