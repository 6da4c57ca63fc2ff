"""The OpenAI Files API (purpose `batch`): upload, list, get, download, delete.

Uploads are limited by --max-file-bytes at the edge (EdgeGuard answers 413 from Content-Length before
reading the body); a file that is not batch JSONL is refused whole with a 400 naming `file`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response

from loom.entrypoints.server.openapi import errors, non_json
from loom.errors import InvalidRequest

FILES_PATH = "/v1/files"

if TYPE_CHECKING:  # the jobs package imports the agent runtime, which imports the server's parsers
    from loom.jobs.service import JobService


def files_router(jobs: JobService) -> APIRouter:
    router = APIRouter()

    @router.post(FILES_PATH, responses=errors(507))
    async def upload(file: UploadFile = File(...), purpose: str = Form(...)) -> dict:
        data = await file.read()
        return jobs.files.create(file.filename or "upload.jsonl", purpose, data)

    @router.get(FILES_PATH, responses=errors())
    async def list_files(
        purpose: str | None = None, limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000
    ) -> dict:
        return {"object": "list", "data": jobs.files.list(purpose, limit), "has_more": False}

    @router.get(FILES_PATH + "/{file_id}", responses=errors(404))
    async def get_file(file_id: str) -> dict:
        return jobs.files.get(file_id)

    @router.get(
        FILES_PATH + "/{file_id}/content", responses=non_json("application/jsonl", "The file's bytes.", 404)
    )
    async def content(file_id: str) -> Response:
        return Response(jobs.files.content(file_id), media_type="application/jsonl")

    @router.delete(FILES_PATH + "/{file_id}", responses=errors(404, 507))
    async def delete(file_id: str) -> dict:
        batch = jobs.batches.uses_file(file_id)
        if batch is not None:
            raise InvalidRequest(
                f"file {file_id!r} is the input of batch {batch}, which has not ended", "file_id"
            )
        return jobs.files.delete(file_id)

    return router
