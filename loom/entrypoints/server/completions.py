"""POST /v1/completions: raw prompts (text or token ids, one or many), echo and prompt logprobs."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from loom.entrypoints.llm import merge_delta
from loom.entrypoints.server import protocol as p
from loom.entrypoints.server.fields import (
    finite_logprob,
    new_id,
    sampling_params,
    stream_usage,
    top_items,
    usage,
)
from loom.entrypoints.server.response_caching import (
    CacheSlot,
    lookup,
    refreshed,
    replay_completion,
    reply_headers,
)
from loom.entrypoints.server.serving import ServerState
from loom.entrypoints.server.sse import SSEResponse, sse_events
from loom.entrypoints.server.structured import check_prompt_logprobs, compile_grammar, prompt_logprobs_json
from loom.errors import InvalidRequest
from loom.frontend.input_processor import InputProcessor, ProcessedRequest
from loom.frontend.truncation import fit_prompt
from loom.outputs import RequestOutput, TokenLogprobs
from loom.tokenizer import Tokenizer

Prompt = tuple[str | None, list[int]]


def parse_prompts(body: p.CompletionRequest, ip: InputProcessor) -> list[Prompt]:
    """(text if given as text, token ids) of each prompt in the request, as sent."""
    prompt = body.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    prompts: list[Prompt] = []
    for item in prompt:
        if not item:
            raise InvalidRequest("prompt must not be empty (nor hold an empty prompt)", param="prompt")
        prompts.append((item, ip.encode(item)) if isinstance(item, str) else (None, list(item)))
    return prompts


def fit_prompts(
    prompts: list[Prompt], budget: int, max_model_len: int, truncation: str
) -> tuple[list[Prompt], int]:
    """Each prompt fitted to the budget, and the tokens cut from all. A cut prompt loses its text, so
    echo shows what ran."""
    fitted, cut = [], 0
    for text, ids in prompts:
        f = fit_prompt(ids, budget, max_model_len, truncation)
        fitted.append((None if f.truncated else text, f.prompt_token_ids))
        cut += f.truncated_tokens
    return fitted, cut


class _Logprobs:
    """Builds OpenAI's completions logprobs (parallel lists) token by token."""

    def __init__(self, state: ServerState, tokenizer: Tokenizer, k: int, offset: int = 0):
        self.state, self.tokenizer, self.k = state, tokenizer, k
        self.offset = offset
        self.out = p.CompletionLogprobs()

    def add(self, token_ids: list[int], entries: list[TokenLogprobs | None]) -> p.CompletionLogprobs:
        # The logprob lists are never longer than the tokens: the first prompt token has None, and an
        # echo-only request (max_tokens=0) reports an entry for a token it never generated.
        for i, token_id in enumerate(token_ids):
            entry = entries[i] if i < len(entries) else None
            text = self.state.token_text(self.tokenizer, token_id)
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
                    self.state.token_text(self.tokenizer, t): finite_logprob(lp)
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
        ip = state.require_input()
        if body.suffix:
            raise InvalidRequest("suffix is not supported by this server", param="suffix")
        if body.max_tokens is not None and body.max_tokens < (0 if body.echo else 1):
            raise InvalidRequest(
                f"max_tokens must be at least 1 (0 only with echo), got {body.max_tokens}", param="max_tokens"
            )
        check_prompt_logprobs(body, ip.max_logprobs)
        # echo with logprobs scores the prompt too; both may ask, and the wider one is computed.
        asked = [k for k in (body.logprobs if body.echo else None, body.prompt_logprobs) if k is not None]
        params = sampling_params(
            body,
            state.config.max_n,
            body.max_tokens,
            logprobs=body.logprobs,
            prompt_logprobs=max(asked) if asked else None,
        )
        truncation = state.truncation_policy(body, chat=False)
        slot = lookup(
            state.response_cache, "completions", body, params, state.model_name, truncation, request.headers
        )
        if slot.hit is not None:
            cached, headers = refreshed(slot.hit, "cmpl")
            if body.stream:
                return SSEResponse(sse_events(replay_completion(cached, stream_usage(body))), None, headers)
            return JSONResponse(cached, headers=headers)
        request_id = new_id("cmpl")
        grammar = await compile_grammar(state, ip, body, chat=False)

        def prepare() -> tuple[list[Prompt], int, list[ProcessedRequest]]:
            budget = ip.prompt_budget(body.max_tokens)
            prompts, cut = fit_prompts(parse_prompts(body, ip), budget, ip.max_model_len, truncation)
            jobs = [
                ip.process(f"{request_id}-{i}", ids, params, prompt=text, grammar=grammar)
                for i, (text, ids) in enumerate(prompts)
            ]
            return prompts, cut, jobs

        prompts, cut, jobs = await state.in_thread(prepare)
        lease = state.admit([len(ids) for _, ids in prompts], params.n)
        state.metrics.on_truncated(truncation, cut)
        headers = reply_headers(False, cut)
        if body.stream:
            events = self._stream(body, request, request_id, prompts, jobs, ip.tokenizer, cut, slot)
            return SSEResponse(sse_events(events), lease, headers)
        finals: list[RequestOutput | None] = [None] * len(jobs)
        try:
            async for i, delta in state.run(request, jobs):
                finals[i] = merge_delta(finals[i], delta)
        finally:
            lease.release()
        response = self._response(body, request_id, prompts, finals, ip.tokenizer, cut).model_dump()
        slot.store(response)
        return JSONResponse(response, headers=headers)

    def _echo(self, body: p.CompletionRequest, prompt: Prompt, tokenizer: Tokenizer) -> str:
        text, ids = prompt
        return text if text is not None else tokenizer.decode(ids, body.skip_special_tokens)

    def _response(
        self,
        body: p.CompletionRequest,
        request_id: str,
        prompts: list[Prompt],
        finals: list[RequestOutput],
        tokenizer: Tokenizer,
        truncated_tokens: int,
    ) -> p.CompletionResponse:
        choices = []
        n = body.n or 1
        for i, (prompt, final) in enumerate(zip(prompts, finals, strict=True)):
            echo = self._echo(body, prompt, tokenizer) if body.echo else ""
            prompt_logprobs = None
            if body.prompt_logprobs is not None:
                prompt_logprobs = prompt_logprobs_json(
                    self.state, tokenizer, prompt[1], final.prompt_logprobs or [], body.prompt_logprobs
                )
            for c in final.outputs:
                logprobs = None
                if body.logprobs is not None:
                    builder = _Logprobs(self.state, tokenizer, body.logprobs)
                    if body.echo:
                        builder.add(prompt[1], (final.prompt_logprobs or [])[: len(prompt[1])])
                    logprobs = builder.add(c.token_ids, c.logprobs or [])
                choices.append(
                    p.CompletionChoice(
                        index=i * n + c.index,
                        text=echo + c.text,
                        logprobs=logprobs,
                        finish_reason=c.finish_reason,
                        prompt_logprobs=prompt_logprobs,
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
                truncated_tokens,
            ),
        )

    async def _stream(
        self,
        body: p.CompletionRequest,
        request: Request,
        request_id: str,
        prompts: list[Prompt],
        jobs: list[ProcessedRequest],
        tokenizer: Tokenizer,
        truncated_tokens: int = 0,
        slot: CacheSlot | None = None,
    ) -> AsyncIterator[p.CompletionResponse]:
        state = self.state
        slot = slot or CacheSlot()
        created = int(time.time())
        n = jobs[0].params.n
        builders: dict[int, _Logprobs] = {}
        prompt_logprobs: dict[int, list] = {}
        completion_tokens = 0
        cached_tokens = [0] * len(jobs)
        finals: list[RequestOutput | None] = [None] * len(jobs)  # the whole answer, for the response cache
        async for i, out in state.run(request, jobs):
            cached_tokens[i] = out.num_cached_tokens
            if slot.active:
                finals[i] = merge_delta(finals[i], out)
            if out.prompt_logprobs is not None:
                prompt_logprobs[i] = out.prompt_logprobs[: len(prompts[i][1])]
            for c in out.outputs:
                index = i * n + c.index
                completion_tokens += len(c.token_ids)
                text, logprobs = c.text, None
                first = index not in builders
                if first:
                    builders[index] = _Logprobs(state, tokenizer, body.logprobs or 0)
                    if body.echo:
                        text = self._echo(body, prompts[i], tokenizer) + text
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
        # Reached only when every job finished: a disconnect or an error raised out of the loop.
        if slot.active:
            slot.store(
                self._response(body, request_id, prompts, finals, tokenizer, truncated_tokens).model_dump()
            )
        if stream_usage(body):
            yield p.CompletionResponse(
                id=request_id,
                created=created,
                model=state.model_name,
                choices=[],
                usage=usage(
                    sum(len(ids) for _, ids in prompts),
                    completion_tokens,
                    sum(cached_tokens),
                    truncated_tokens,
                ),
            )
