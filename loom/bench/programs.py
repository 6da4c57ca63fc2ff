"""`dag` programs in `loom bench serve`: loom's agent runtime drives each program, with the load
generator as its chat client, so each LLM call of a program is a request like any other: sent in a
concurrency slot, timed, and counted from the server's `usage`."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
from tqdm import tqdm

from loom.agent.clients import ChatResult, TokenCallback, Usage
from loom.agent.runtime import CONTINUE, Runtime
from loom.bench.metrics import RequestRecord
from loom.bench.workloads import DagProgram, Request
from loom.errors import InvalidRequest

if TYPE_CHECKING:
    from loom.bench.serve import LoadGenerator

logger = logging.getLogger(__name__)


class _CallFailed(RuntimeError):
    """A dag program's call streamed no answer (its record says why)."""


class BenchChatClient:
    """The agent runtime's chat client for `dag` programs: each call is a request of the load generator,
    measured into the next unused record of its program (a program's branch calls, then its summary)."""

    def __init__(self, gen: LoadGenerator, t0: float, slot, bar: tqdm):
        self.gen, self.t0, self.slot, self.bar = gen, t0, slot, bar
        # continue, not fail_fast: a failed branch must not cancel its siblings mid-stream (half-measured
        # records); only the summary, which needs every answer, is skipped.
        self.runtime = Runtime(self, policy=CONTINUE)
        self.programs: dict[str, tuple[DagProgram, Iterator[tuple[int, RequestRecord]]]] = {}
        """Running program id -> the program and its records not yet used, numbered from its first call."""
        self._run_tag = uuid.uuid4().hex[:8]  # program ids unique across runs against one server
        self._releases: set[asyncio.Task] = set()

    async def run(self, program: DagProgram, records: list[RequestRecord]) -> None:
        program_id = f"bench-{self._run_tag}-{program.program_index}"
        self.programs[program_id] = (program, enumerate(records))
        await self.runtime.run(program.to_workflow(), program_id=program_id)
        del self.programs[program_id]
        for record in records:
            if record.request is None:
                record.error = "not sent: an earlier call of its program failed"
                self.bar.update()

    async def chat(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        *,
        program_id: str | None = None,
        on_token: TokenCallback | None = None,
        **sampling: Any,
    ) -> ChatResult:
        """Send one call as a measured request; on_token is never called (the generator reads the stream)."""
        if tools:
            raise InvalidRequest("the bench's programs call no tools", param="tools")
        program, records = self.programs[program_id]
        call, record = next(records)
        request = Request(
            messages=messages,
            max_tokens=sampling["max_tokens"],
            session_id=program.program_index,
            turn=0 if call < len(program.questions) else 1,
            program_id=program_id,
        )
        async with self.slot:
            await self.gen.send(request, record, self.t0)
        self.bar.update()
        if not record.success:
            raise _CallFailed(record.error)
        return ChatResult(
            record.text, usage=Usage(record.prompt_tokens or 0, record.output_tokens or 0, calls=1)
        )

    def end_program(self, program_id: str) -> None:
        """Ask a loom server to unpin the program's KV now rather than at its TTL (other servers have no
        such route). Sent in the background; `released()` waits for it."""
        if self.gen.is_loom:
            task = asyncio.get_running_loop().create_task(self._release(program_id))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def _release(self, program_id: str) -> None:
        try:
            await self.gen.client.post(f"{self.gen.config.api_base}/programs/{program_id}/release")
        except httpx.HTTPError as e:  # best effort: pins expire on their own
            logger.debug("release of program %s not done: %s", program_id, e)

    async def released(self) -> None:
        await asyncio.gather(*self._releases)
