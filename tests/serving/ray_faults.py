"""A test-only fault: a replica whose engine fails every request (the broken canary of the rollback
test). It lives here, not in loom: Ray workers import it through PYTHONPATH set by the test module."""

from __future__ import annotations

from loom.serving.replica import LoomReplica


class BrokenEngineReplica(LoomReplica):
    async def __init__(self, *args, **kwargs):
        await super().__init__(*args, **kwargs)
        engine = self.app.state.loom.engine

        async def broken_generate(*_args, **_kwargs):
            raise RuntimeError("injected engine fault")
            yield  # an async generator, like the real one

        engine.generate = broken_generate
