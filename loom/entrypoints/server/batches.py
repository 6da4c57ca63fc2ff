"""The OpenAI Batch API: create a batch from an uploaded file, poll it, list, cancel. Its lines run in
the background below interactive traffic (loom/jobs/batch_runner.py); results land in output files."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict

from loom.entrypoints.server.openapi import errors

if TYPE_CHECKING:  # the jobs package imports the agent runtime, which imports the server's parsers
    from loom.jobs.service import JobService


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is a 400 naming it, never ignored

    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


def batches_router(jobs: JobService) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/batches", responses=errors(404, 503, 507))
    async def create(body: CreateBatchRequest) -> dict:
        return jobs.batches.create(body.input_file_id, body.endpoint, body.completion_window, body.metadata)

    @router.get("/v1/batches", responses=errors(404))
    async def list_batches(after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict:
        data = jobs.batches.list(after, limit + 1)
        page = data[:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(data) > limit,
        }

    @router.get("/v1/batches/{batch_id}", responses=errors(404))
    async def get(batch_id: str) -> dict:
        return jobs.batches.get(batch_id)

    @router.post("/v1/batches/{batch_id}/cancel", responses=errors(404, 507))
    async def cancel(batch_id: str) -> dict:
        return jobs.batches.cancel(batch_id)

    return router
