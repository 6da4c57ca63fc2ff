"""`loom serve` plus test-only routes that fail on purpose; the fault lives here, never in the library.

Run as `python tests/entrypoints/server/server_faults.py [loom flags] serve [serve flags]`: the real CLI and
app, with `create_app` wrapped to add the routes below (hidden from the OpenAPI document).
"""

from __future__ import annotations

from pathlib import Path

import loom.entrypoints.server.app as app_module
from loom.entrypoints.cli import main

ENTRY = (str(Path(__file__).resolve()),)
"""What `launch_server(..., entry=ENTRY)` runs."""
FAULT_PATH = "/test/fault"
"""GET: raises an exception no handler knows (an unexpected bug: 500)."""

_create_app = app_module.create_app


def create_app_with_faults(*args, **kwargs):
    app = _create_app(*args, **kwargs)

    @app.get(FAULT_PATH, include_in_schema=False)
    async def fault() -> dict:
        raise RuntimeError("injected fault")

    return app


if __name__ == "__main__":
    app_module.create_app = create_app_with_faults
    main()
