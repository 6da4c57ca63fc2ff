"""The offline API: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from dataclasses import fields

from tqdm import tqdm

from loom.config import EngineConfig
from loom.engine.core import EngineCore
from loom.engine.request import RequestStatus
from loom.errors import InvalidRequest, RequestFailed
from loom.frontend.input_processor import InputProcessor
from loom.frontend.output_processor import OutputProcessor
from loom.outputs import CompletionOutput, RequestOutput
from loom.sampling_params import SamplingParams
from loom.tokenizer import Tokenizer

Prompt = str | list[int]


def merge_delta(acc: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Fold one step's delta output into the accumulated output of a request."""
    if acc is None:
        acc = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids, [])
    by_index = {c.index: c for c in acc.outputs}
    for d in delta.outputs:
        c = by_index.get(d.index)
        if c is None:
            c = by_index[d.index] = CompletionOutput(d.index, logprobs=[] if d.logprobs is not None else None)
        c.text += d.text
        c.token_ids.extend(d.token_ids)
        if d.logprobs is not None:
            c.logprobs = (c.logprobs or []) + d.logprobs
        c.finish_reason, c.stop_reason = d.finish_reason or c.finish_reason, d.stop_reason or c.stop_reason
    acc.outputs = [by_index[k] for k in sorted(by_index)]
    acc.finished = delta.finished
    acc.num_cached_tokens = delta.num_cached_tokens
    acc.metrics = delta.metrics
    if delta.prompt_logprobs is not None:
        acc.prompt_logprobs = delta.prompt_logprobs
    return acc


class LLM:
    """Runs a model in this process. Keyword arguments are EngineConfig fields, e.g.
    `LLM(model="path/to/dir", dtype="bfloat16", max_num_seqs=64, enable_prefix_caching=True)`."""

    def __init__(self, model: str | None = None, **kwargs):
        known = {f.name for f in fields(EngineConfig)}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"unknown LLM arguments {sorted(unknown)}; see loom.EngineConfig")
        self.config = EngineConfig(model=model, **kwargs)
        self.engine = EngineCore(self.config)
        self.tokenizer = Tokenizer(self.config.tokenizer or self.engine.model_path)
        self.input = InputProcessor.for_engine(self.engine, self.tokenizer)
        self.output = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (a string or a list of token ids); one output per prompt, in order.

        Every prompt is validated before any runs, so a bad one raises without side effects.
        """
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise InvalidRequest(
                f"got {len(prompts)} prompts but {len(params)} SamplingParams", param="params"
            )
        encoded = [self.input.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        requests = [
            self.input.process(str(next(self._ids)), ids, p, prompt if isinstance(prompt, str) else None)
            for prompt, ids, p in zip(prompts, encoded, params, strict=True)
        ]
        for request in requests:
            self.output.add_request(request)
            for seq in request.seqs:
                self.engine.add_request(seq)
        return self._run([r.request_id for r in requests], use_tqdm)

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        tools: list[dict] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [
            self.input.encode(self.tokenizer.apply_chat_template(c, tools=tools), add_special_tokens=False)
            for c in conversations
        ]
        return self.generate(prompts, params, use_tqdm=use_tqdm)

    def reset_prefix_cache(self) -> int:
        """Forget the cached prefixes of earlier calls (e.g. between timed rounds that repeat prompts);
        returns how many KV blocks were dropped."""
        return self.engine.reset_prefix_cache()

    def _run(self, order: list[str], use_tqdm: bool | None) -> list[RequestOutput]:
        if use_tqdm is None:
            use_tqdm = len(order) > 1 and sys.stderr.isatty()
        results: dict[str, RequestOutput] = {}
        done = 0
        with tqdm(total=len(order), desc="generate", disable=not use_tqdm, unit="req") as bar:
            try:
                while done < len(order):
                    processed = self.output.process_outputs(self.engine.step())
                    if processed.failed:
                        request_id, why = next(iter(processed.failed.items()))
                        raise RequestFailed(f"request {request_id} failed inside the engine: {why}")
                    if processed.stopped_seq_ids:
                        self.engine.abort_requests(processed.stopped_seq_ids, RequestStatus.FINISHED_STOPPED)
                    for delta in processed.request_outputs:
                        results[delta.request_id] = merge_delta(results.get(delta.request_id), delta)
                        if delta.finished:
                            done += 1
                            bar.update(1)
            except BaseException:
                for rid in order:
                    self.engine.abort_requests(self.output.abort_request(rid))
                raise
        return [results[rid] for rid in order]
