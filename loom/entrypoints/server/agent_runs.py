"""Agent runs as durable jobs: POST a workflow (YAML text or JSON) and inputs, get a run id at once;
poll its status and node results, follow its events as server-sent events, cancel it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict
from starlette.responses import StreamingResponse

from loom.entrypoints.server.openapi import errors, non_json

if TYPE_CHECKING:  # the jobs package imports the agent runtime, which imports the server's parsers
    from loom.jobs.service import JobService


class CreateRunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workflow: str | dict[str, Any]
    """The workflow: YAML text (as `loom run` reads) or its JSON object form."""
    inputs: dict[str, Any] | None = None
    policy: str | None = None
    """fail_fast (default) or continue."""
    deadline: float | None = None
    """Seconds the whole run may take (counted again from each resume)."""


def agent_runs_router(jobs: JobService) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/agent/runs", responses=errors(503, 507))
    async def create(body: CreateRunRequest) -> dict:
        jobs.require_ready()
        return jobs.agent_runs.create(body.workflow, body.inputs, body.policy, body.deadline)

    @router.get("/v1/agent/runs", responses=errors())
    async def list_runs(limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> dict:
        return {"object": "list", "data": jobs.agent_runs.list(limit)}

    @router.get("/v1/agent/runs/{run_id}", responses=errors(404))
    async def get(run_id: str) -> dict:
        return jobs.agent_runs.get(run_id)

    @router.post("/v1/agent/runs/{run_id}/cancel", responses=errors(404, 507))
    async def cancel(run_id: str) -> dict:
        return jobs.agent_runs.cancel(run_id)

    @router.get(
        "/v1/agent/runs/{run_id}/events",
        responses=non_json("text/event-stream", "The run's node events, then the end of the run.", 404),
    )
    async def events(run_id: str) -> StreamingResponse:
        jobs.agent_runs.get(run_id)  # 404 now, before the stream's headers go out

        async def frames() -> AsyncIterator[str]:
            async for event in jobs.agent_runs.events(run_id):
                yield f"event: {event['kind']}\ndata: {json.dumps(event, default=str)}\n\n"

        return StreamingResponse(
            frames(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    return router
