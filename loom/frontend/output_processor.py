"""OutputProcessor: the engine's per-sequence token ids -> per-request text deltas.

Detokenizes incrementally, applies stop strings (a match finishes the sequence here; the caller then
stops it in the engine), gathers the n sequences of a request into one RequestOutput, and keeps each
prompt position's logprobs once (a preempted request computes its prompt again).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loom.engine.io import EngineCoreOutput
from loom.frontend.input_processor import ProcessedRequest
from loom.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from loom.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class _RequestState:
    request: ProcessedRequest
    detokenizers: list[IncrementalDetokenizer]
    finished: list[bool]
    num_cached_tokens: list[int]
    num_preemptions: list[int]
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=lambda: [None])
    prompt_logprobs_sent: bool = False
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    @property
    def done(self) -> bool:
        return all(self.finished)


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    """One delta per request that changed, in the order the engine reported them."""
    stopped_seq_ids: list[str]
    """Sequences a stop string finished here that the engine still runs: stop them there."""
    failed: dict[str, str] = field(default_factory=dict)
    """request_id -> why the engine failed it; the request is over (its other sequences are in
    aborted_seq_ids)."""
    aborted_seq_ids: list[str] = field(default_factory=list)
    """Sequences of failed requests the engine still runs: abort them there."""


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, _RequestState] = {}
        self._seqs: dict[str, tuple[_RequestState, int]] = {}

    def add_request(self, request: ProcessedRequest) -> None:
        p = request.params
        n = len(request.seqs)
        state = _RequestState(
            request=request,
            detokenizers=[
                IncrementalDetokenizer(
                    self.tokenizer,
                    request.prompt_token_ids,
                    p.skip_special_tokens,
                    p.stop,
                    p.include_stop_str_in_output,
                )
                for _ in range(n)
            ],
            finished=[False] * n,
            num_cached_tokens=[0] * n,
            num_preemptions=[0] * n,
        )
        self.requests[request.request_id] = state
        for k, seq in enumerate(request.seqs):
            self._seqs[seq.request_id] = (state, k)

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a request; returns its sequences the engine may still run."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return []
        self._forget(state)
        return [s.request_id for s, done in zip(state.request.seqs, state.finished, strict=True) if not done]

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def _forget(self, state: _RequestState) -> None:
        for seq in state.request.seqs:
            self._seqs.pop(seq.request_id, None)

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        deltas: dict[str, dict[int, CompletionOutput]] = {}
        result = ProcessedOutputs([], [])
        for out in outputs:
            entry = self._seqs.get(out.request_id)
            if entry is None:
                continue  # an aborted request, or one a stop string finished while the engine ran on
            state, k = entry
            if out.error is not None:
                request_id = state.request.request_id
                result.failed[request_id] = out.error
                result.aborted_seq_ids += self.abort_request(request_id)
                deltas.pop(request_id, None)
                continue
            self._record(state, k, out)
            delta = self._delta(state, k, out)
            if delta is None:
                continue
            if delta.finish_reason is not None:
                state.finished[k] = True
                self._seqs.pop(out.request_id, None)
                if not out.finished:
                    result.stopped_seq_ids.append(out.request_id)
            deltas.setdefault(state.request.request_id, {})[k] = delta
        result.request_outputs = self._request_outputs(deltas)
        return result

    def _record(self, state: _RequestState, k: int, out: EngineCoreOutput) -> None:
        state.num_cached_tokens[k] = out.num_cached_tokens
        state.num_preemptions[k] = out.num_preemptions
        if k == 0:
            state.first_scheduled_time = out.first_scheduled_time
            state.first_token_time = out.first_token_time
            # Each position once: a preempted sequence computes its prompt (and its logprobs) again.
            lps = out.prompt_logprobs
            if lps is not None and len(state.prompt_logprobs) == out.prompt_logprobs_start:
                state.prompt_logprobs.extend(lps)

    def _delta(self, state: _RequestState, k: int, out: EngineCoreOutput) -> CompletionOutput | None:
        if not out.new_token_ids and not out.finished:
            return None
        detok = state.detokenizers[k]
        delta = CompletionOutput(index=k, token_ids=list(out.new_token_ids), logprobs=out.new_logprobs)
        text, matched = detok.step(out.new_token_ids) if out.new_token_ids else ("", None)
        if matched is not None:
            if out.finish_reason == "stop":
                delta.finish_reason, delta.stop_reason = "stop", out.stop_reason
            else:
                delta.finish_reason, delta.stop_reason = "stop", matched
        elif out.finished:
            text += detok.flush()
            delta.finish_reason, delta.stop_reason = out.finish_reason, out.stop_reason
        delta.text = text
        return delta

    def _request_outputs(self, deltas: dict[str, dict[int, CompletionOutput]]) -> list[RequestOutput]:
        outputs = []
        for request_id, by_index in deltas.items():
            state = self.requests[request_id]
            request = state.request
            finished = state.done
            out = RequestOutput(
                request_id=request_id,
                prompt=request.prompt,
                prompt_token_ids=request.prompt_token_ids,
                outputs=[by_index[k] for k in sorted(by_index)],
                finished=finished,
                num_cached_tokens=min(state.num_cached_tokens),
            )
            if request.params.prompt_logprobs is not None and not state.prompt_logprobs_sent:
                out.prompt_logprobs = state.prompt_logprobs
                state.prompt_logprobs_sent = True
            out.metrics = {
                "arrival_time": request.arrival_time,
                "first_scheduled_time": state.first_scheduled_time,
                "first_token_time": state.first_token_time,
                "num_preemptions": sum(state.num_preemptions),
            }
            if finished:
                out.metrics["finished_time"] = time.monotonic()
                del self.requests[request_id]
                self._forget(state)
            outputs.append(out)
        return outputs
