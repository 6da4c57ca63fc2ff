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
from loom.frontend.chat import process_chat, render_chat
from loom.frontend.input_processor import InputProcessor, ProcessedRequest
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
        """Generate for every prompt; one output per prompt, in order.

        A prompt is a string, a list of token ids, or (for a model that takes images) a dict
        {"prompt": text or "prompt_token_ids": ids, "multi_modal_data": {"image": one or a list}} whose
        text holds the model's image placeholder once per image (`llm.input.multimodal.placeholder`);
        an image is a PIL image, bytes, or a data: URL. Every prompt is validated before any runs, so a
        bad one raises without side effects.
        """
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params(params, len(prompts))
        requests = [self._prepare(prompt, p) for prompt, p in zip(prompts, params, strict=True)]
        return self._submit(requests, use_tqdm)

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        tools: list[dict] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate. Messages
        are OpenAI's, `image_url` parts included (for a model that takes images)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        params = self._params(params, len(conversations))
        requests = []
        for conversation, p in zip(conversations, params, strict=True):
            budget = self.input.prompt_budget(p.max_tokens)
            prompt = render_chat(self.input, conversation, tools, "none", budget, "error")
            requests.append(process_chat(self.input, str(next(self._ids)), prompt, p))
        return self._submit(requests, use_tqdm)

    def _params(
        self, params: SamplingParams | Sequence[SamplingParams] | None, n: int
    ) -> list[SamplingParams]:
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise InvalidRequest(f"got {n} prompts but {len(params)} SamplingParams", param="params")
        return params

    def _prepare(self, prompt: Prompt | dict, params: SamplingParams) -> ProcessedRequest:
        rid = str(next(self._ids))
        if not isinstance(prompt, dict):
            ids = self.input.encode(prompt) if isinstance(prompt, str) else list(prompt)
            return self.input.process(rid, ids, params, prompt if isinstance(prompt, str) else None)
        text = prompt.get("prompt")
        ids = self.input.encode(text) if text is not None else list(prompt.get("prompt_token_ids") or [])
        images = (prompt.get("multi_modal_data") or {}).get("image", [])
        images = images if isinstance(images, (list, tuple)) else [images]
        mm = self.input.multimodal
        if images and mm is None:
            raise InvalidRequest("this model accepts text only", param="multi_modal_data")
        if mm is None:
            return self.input.process(rid, ids, params, text)
        processed = [mm.load(image, f"multi_modal_data.image[{k}]") for k, image in enumerate(images)]
        ids, inputs, positions, delta = mm.finalize(ids, processed)
        return self.input.process(rid, ids, params, text, images=inputs, mrope=(positions, delta))

    def _submit(self, requests: list[ProcessedRequest], use_tqdm: bool | None) -> list[RequestOutput]:
        for request in requests:
            self.output.add_request(request)
            for seq in request.seqs:
                self.engine.add_request(seq)
        return self._run([r.request_id for r in requests], use_tqdm)

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
