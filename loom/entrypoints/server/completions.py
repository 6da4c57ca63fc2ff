"""POST /v1/completions: raw prompts (text or token ids, one or many), echo and prompt logprobs."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from loom.engine.core import EngineCore
from loom.entrypoints.llm import merge_delta
from loom.entrypoints.server import protocol as p
from loom.entrypoints.server.serving import (
    Job,
    ServerState,
    SSEResponse,
    finite_logprob,
    new_id,
    sampling_params,
    sse_events,
    stream_usage,
    top_items,
    usage,
)
from loom.errors import InvalidRequest
from loom.outputs import RequestOutput, TokenLogprobs

Prompt = tuple[str | None, list[int]]


def parse_prompts(body: p.CompletionRequest, core: EngineCore) -> list[Prompt]:
    """(text if given as text, token ids) of each prompt in the request."""
    prompt = body.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    prompts: list[Prompt] = []
    for item in prompt:
        if not item:
            raise InvalidRequest("prompt must not be empty (nor hold an empty prompt)", param="prompt")
        prompts.append((item, core.tokenizer.encode(item)) if isinstance(item, str) else (None, list(item)))
    return prompts


class _Logprobs:
    """Builds OpenAI's completions logprobs (parallel lists) token by token."""

    def __init__(self, state: ServerState, core: EngineCore, k: int, offset: int = 0):
        self.state, self.core, self.k = state, core, k
        self.offset = offset
        self.out = p.CompletionLogprobs()

    def add(self, token_ids: list[int], entries: list[TokenLogprobs | None]) -> p.CompletionLogprobs:
        # The logprob lists are never longer than the tokens: the first prompt token has None, and an
        # echo-only request (max_tokens=0) reports an entry for a token it never generated.
        for i, token_id in enumerate(token_ids):
            entry = entries[i] if i < len(entries) else None
            text = self.state.token_text(self.core.tokenizer, token_id)
            self.out.tokens.append(text)
            self.out.text_offset.append(self.offset)
            self.offset += len(text)
            if entry is None:
                self.out.token_logprobs.append(None)
                self.out.top_logprobs.append(None)
                continue
            self.out.token_logprobs.append(finite_logprob(entry[token_id]))
            self.out.top_logprobs.append(
                {
                    self.state.token_text(self.core.tokenizer, t): finite_logprob(lp)
                    for t, lp in top_items(entry, self.k)
                }
            )
        return self.out


class Completions:
    """Turns a validated completions request into engine work and the outputs into OpenAI responses."""

    def __init__(self, state: ServerState):
        self.state = state

    async def create(self, body: p.CompletionRequest, request: Request) -> Response:
        state = self.state
        state.check_model(body.model)
        core = state.require_core()
        if body.suffix:
            raise InvalidRequest("suffix is not supported by this server", param="suffix")
        if body.max_tokens is not None and body.max_tokens < (0 if body.echo else 1):
            raise InvalidRequest(
                f"max_tokens must be at least 1 (0 only with echo), got {body.max_tokens}", param="max_tokens"
            )
        params = sampling_params(
            body,
            state.config.max_n,
            body.max_tokens,
            logprobs=body.logprobs,
            prompt_logprobs=body.logprobs if body.echo else None,
        )
        prompts = parse_prompts(body, core)
        for _, ids in prompts:
            core.validate_prompt(ids, params)
        lease = state.admit([len(ids) for _, ids in prompts])
        request_id = new_id("cmpl")
        jobs = [Job(f"{request_id}-{i}", ids, params) for i, (_, ids) in enumerate(prompts)]
        if body.stream:
            return SSEResponse(
                sse_events(self._stream(body, request, request_id, prompts, jobs, core)), lease
            )
        finals: list[RequestOutput | None] = [None] * len(jobs)
        try:
            async for i, delta in state.run(request, jobs):
                finals[i] = merge_delta(finals[i], delta)
        finally:
            lease.release()
        return JSONResponse(self._response(body, request_id, prompts, finals, core).model_dump())

    def _echo(self, body: p.CompletionRequest, prompt: Prompt, core: EngineCore) -> str:
        text, ids = prompt
        return text if text is not None else core.tokenizer.decode(ids, body.skip_special_tokens)

    def _response(
        self,
        body: p.CompletionRequest,
        request_id: str,
        prompts: list[Prompt],
        finals: list[RequestOutput],
        core: EngineCore,
    ) -> p.CompletionResponse:
        choices = []
        n = body.n or 1
        for i, (prompt, final) in enumerate(zip(prompts, finals, strict=True)):
            echo = self._echo(body, prompt, core) if body.echo else ""
            for c in final.outputs:
                logprobs = None
                if body.logprobs is not None:
                    builder = _Logprobs(self.state, core, body.logprobs)
                    if body.echo:
                        builder.add(prompt[1], (final.prompt_logprobs or [])[: len(prompt[1])])
                    logprobs = builder.add(c.token_ids, c.logprobs or [])
                choices.append(
                    p.CompletionChoice(
                        index=i * n + c.index,
                        text=echo + c.text,
                        logprobs=logprobs,
                        finish_reason=c.finish_reason,
                    )
                )
        return p.CompletionResponse(
            id=request_id,
            created=int(time.time()),
            model=self.state.model_name,
            choices=choices,
            usage=usage(
                sum(len(ids) for _, ids in prompts),
                sum(len(c.token_ids) for f in finals for c in f.outputs),
                sum(f.num_cached_tokens for f in finals),
            ),
        )

    async def _stream(
        self,
        body: p.CompletionRequest,
        request: Request,
        request_id: str,
        prompts: list[Prompt],
        jobs: list[Job],
        core: EngineCore,
    ) -> AsyncIterator[p.CompletionResponse]:
        state = self.state
        created = int(time.time())
        n = jobs[0].params.n
        builders: dict[int, _Logprobs] = {}
        prompt_logprobs: dict[int, list] = {}
        completion_tokens = 0
        cached_tokens = [0] * len(jobs)
        async for i, out in state.run(request, jobs):
            cached_tokens[i] = out.num_cached_tokens
            if out.prompt_logprobs is not None:
                prompt_logprobs[i] = out.prompt_logprobs[: len(prompts[i][1])]
            for c in out.outputs:
                index = i * n + c.index
                completion_tokens += len(c.token_ids)
                text, logprobs = c.text, None
                first = index not in builders
                if first:
                    builders[index] = _Logprobs(state, core, body.logprobs or 0)
                    if body.echo:
                        text = self._echo(body, prompts[i], core) + text
                if body.logprobs is not None:
                    builder = builders[index]
                    builder.out = p.CompletionLogprobs()  # each chunk carries its own tokens only
                    if first and body.echo:
                        builder.add(prompts[i][1], prompt_logprobs.get(i, []))
                    logprobs = builder.add(c.token_ids, c.logprobs or [])
                    if not logprobs.tokens:
                        logprobs = None
                if text or logprobs is not None or c.finished:
                    choice = p.CompletionChoice(
                        index=index, text=text, logprobs=logprobs, finish_reason=c.finish_reason
                    )
                    yield p.CompletionResponse(
                        id=request_id, created=created, model=state.model_name, choices=[choice]
                    )
        if stream_usage(body):
            yield p.CompletionResponse(
                id=request_id,
                created=created,
                model=state.model_name,
                choices=[],
                usage=usage(sum(len(ids) for _, ids in prompts), completion_tokens, sum(cached_tokens)),
            )
