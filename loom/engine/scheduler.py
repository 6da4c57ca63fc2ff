"""The scheduler decides which tokens run in the next step, and applies what the step produced. It never
touches a tensor.

Token-budget scheduling in the style of vLLM's V1 core: running requests first (each gets what it needs
to catch up, a decode token or the next prefill chunk), then waiting requests while budget, sequence
slots and KV blocks last. When blocks run out, the most recently admitted running request (lowest
priority first under the priority policy) is preempted and will be recomputed from scratch.

`schedule()` returns a SchedulerOutput (loom/engine/step.py) that names requests by id; after the forward,
`update_from_output()` is the one writer of progress: it advances `num_computed_tokens`, appends sampled
tokens, checks stop tokens, EOS and lengths, and finishes requests.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from loom.config import EngineConfig
from loom.engine.io import EngineCoreOutput
from loom.engine.request import FINISH_REASONS, Request, RequestStatus
from loom.engine.spec_decode import make_proposer
from loom.engine.step import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput
from loom.engine.structured.engine import accept_token, grammar_error, valid_draft
from loom.engine.waiting_queue import WaitingQueue
from loom.errors import InvalidRequest
from loom.kv.manager import NO_HIT, KVCacheManager, PrefixHit

logger = logging.getLogger(__name__)

MAX_TRACKED_PROGRAMS = 65536


@dataclass
class SchedulerStats:
    """Counters since start, for metrics and tests."""

    num_steps: int = 0
    num_forward_tokens: int = 0
    num_prompt_tokens_computed: int = 0
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    num_draft_tokens: int = 0
    """Draft tokens proposed and verified (speculative decoding)."""
    num_accepted_tokens: int = 0
    """Draft tokens the target model accepted."""
    num_verifications: int = 0
    """Decode steps of a request that verified drafts."""


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        kv: KVCacheManager,
        max_model_len: int,
        stats: SchedulerStats | None = None,
    ):
        if not config.enable_chunked_prefill and max_model_len > config.max_num_batched_tokens:
            # A prompt (or a preempted request's prompt + output) longer than the budget would wait forever
            # at the head of the queue, blocking everything behind it.
            raise InvalidRequest(
                f"with chunked prefill disabled, max_num_batched_tokens ({config.max_num_batched_tokens}) "
                f"must be at least max_model_len ({max_model_len})",
                param="max_num_batched_tokens",
            )
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.stats = stats if stats is not None else SchedulerStats()
        self.by_priority = config.scheduling_policy == "priority"
        self.by_program = config.scheduling_policy == "program"
        # Tokens computed per agent program so far (program-level least attained service, as in
        # Autellix); bounded so an endless stream of programs does not grow it forever.
        self.program_service: OrderedDict[str, int] = OrderedDict()
        self.proposer = make_proposer(config.speculative)
        self.requests: dict[str, Request] = {}
        self.waiting = WaitingQueue(self.by_priority)
        self.running: list[Request] = []
        # Requests the runner holds state for that it must drop at the next step.
        self._forget: set[str] = set()

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise InvalidRequest(f"request id {req.request_id!r} is already in use", param="request_id")
        self.requests[req.request_id] = req
        self.waiting.add(req)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_preemptions(self) -> int:
        return self.stats.num_preemptions

    def has_work(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    # ---- deciding the batch ----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        scheduled: list[tuple[Request, int]] = []
        drafts: dict[str, list[int]] = {}
        preempted: list[Request] = []
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill

        # 1. Running requests, in admission order.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if num_new <= 0:  # cannot happen for a live request; guard against a stuck loop
                i += 1
                continue
            draft = (
                self._propose(req, budget - num_new) if req.num_tokens - req.num_computed_tokens == 1 else []
            )
            while not self.kv.allocate_slots(req, num_new + len(draft), num_lookahead=len(draft)):
                if draft:  # drafts are the first thing to go when memory is short
                    draft = []
                    continue
                victim = self._pick_victim()
                if self.running.index(victim) < i:  # already scheduled (priority policy only)
                    i -= 1
                budget += self._preempt(victim, scheduled, preempted)
                drafts.pop(victim.request_id, None)
                if victim is req:
                    break
            else:
                scheduled.append((req, num_new + len(draft)))
                if draft:
                    drafts[req.request_id] = draft
                budget -= num_new + len(draft)
                i += 1
                continue
            # req itself was preempted and removed from running; the same index now holds the next one.

        # 2. Waiting requests, unless this step had to preempt (then memory is the bottleneck).
        now = time.monotonic()
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req, hit = self._next_waiting()
            num_new = req.num_tokens - req.num_computed_tokens - hit.num_tokens
            if num_new > budget:
                if not chunked:
                    break
                num_new = budget
            if not self.kv.allocate_slots(req, num_new, hit):
                break
            self.waiting.remove(req)
            # A prefix hit is computed the moment it is found: the blocks hold its KV already.
            req.num_computed_tokens += hit.num_tokens
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = hit.num_tokens
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append((req, num_new))
            budget -= num_new
        if self.by_program:
            self._attain_service(scheduled)
        out = self._output(scheduled, preempted)
        out.spec_token_ids = drafts
        return out

    def _propose(self, req: Request, budget: int) -> list[int]:
        """Draft tokens for a request about to decode, within the step's budget, its max_tokens and the
        context (the verify step yields the accepted drafts and one more token)."""
        if self.proposer is None:
            return []
        spec = self.config.speculative
        if spec.disable_by_batch_size and len(self.running) > spec.disable_by_batch_size:
            return []
        limit = min(
            budget, req.max_tokens - req.num_output_tokens - 1, self.max_model_len - req.num_tokens - 1
        )
        if limit <= 0:
            return []
        draft = self.proposer.propose(req.request_id, req.all_token_ids, limit, req.program_id)
        return valid_draft(req, draft)  # a draft the grammar refuses would be rejected anyway

    def _output(self, scheduled: list[tuple[Request, int]], preempted: list[Request]) -> SchedulerOutput:
        out = SchedulerOutput(preempted_req_ids=[r.request_id for r in preempted])
        for req, num_new in scheduled:
            blocks = self.kv.block_ids(req.request_id)
            if req.num_blocks_sent < 0:
                out.new_reqs.append(
                    NewRequestData(
                        req_id=req.request_id,
                        token_ids=list(req.all_token_ids),
                        num_prompt_tokens=req.num_prompt_tokens,
                        block_ids=blocks,
                        num_computed_tokens=req.num_computed_tokens,
                        params=req.params,
                        generator=req.generator,
                        eos_token_ids=req.eos_token_ids,
                        images=req.images,
                        mrope_positions=req.mrope_positions,
                        mrope_delta=req.mrope_delta,
                    )
                )
            else:
                out.cached_reqs.append(
                    CachedRequestData(req.request_id, blocks[req.num_blocks_sent :], req.num_computed_tokens)
                )
            req.num_blocks_sent = len(blocks)
            out.num_scheduled_tokens[req.request_id] = num_new
        out.finished_req_ids, self._forget = self._forget, set()
        return out

    def _program(self, req: Request) -> str:
        return req.program_id or req.parent_id

    def _service(self, req: Request) -> int:
        return self.program_service.get(self._program(req), 0)

    def _attain_service(self, scheduled: list[tuple[Request, int]]) -> None:
        for req, num_new in scheduled:
            program = self._program(req)
            self.program_service[program] = self.program_service.get(program, 0) + num_new
            self.program_service.move_to_end(program)
        while len(self.program_service) > MAX_TRACKED_PROGRAMS:
            self.program_service.popitem(last=False)

    def _next_waiting(self) -> tuple[Request, PrefixHit]:
        """The waiting request to admit next, and its prefix hit.

        Cache-aware within a bounded window: among the first `prefix_aware_window` waiting requests of
        the head's priority, the one with the longest cached prefix goes first (its blocks are hot now
        and may be evicted if it waits; it costs the least compute). The head is passed over at most
        `prefix_aware_window` times, so nothing starves; FCFS order otherwise.
        """
        if self.by_program:
            # Least attained service of the program first; arrival order among equals.
            best = min(self.waiting, key=lambda r: (self._service(r), r.arrival_time))
            return best, self._lookup(best)
        head = self.waiting.peek()
        window = self.config.prefix_aware_window
        head_hit = self._lookup(head)
        if window <= 1 or not self.kv.enable_caching or head.num_skipped >= window:
            return head, head_hit
        best, best_hit = head, head_hit
        for req in self.waiting.first(window)[1:]:
            if req.priority != head.priority:
                break
            hit = self._lookup(req)
            if hit.num_tokens > best_hit.num_tokens:
                best, best_hit = req, hit
        if best is not head:
            head.num_skipped += 1
        return best, best_hit

    def _lookup(self, req: Request) -> PrefixHit:
        return self.kv.get_computed_blocks(req) if req.num_computed_tokens == 0 else NO_HIT

    def _pick_victim(self) -> Request:
        if self.by_priority:
            # Lowest priority (largest value) first, the latest arrival among equals.
            return max(self.running, key=lambda r: (r.priority, r.arrival_time))
        if self.by_program:
            return max(self.running, key=lambda r: (self._service(r), r.arrival_time))
        return self.running[-1]

    def _preempt(
        self, victim: Request, scheduled: list[tuple[Request, int]], preempted: list[Request]
    ) -> int:
        """Free the victim's blocks; it goes back to the waiting queue and is recomputed (its full
        blocks may still be found in the prefix cache). Returns the budget it gives back."""
        self.running.remove(victim)
        returned = 0
        for k, (req, num_new) in enumerate(scheduled):
            if req is victim:  # only possible under the priority policy
                del scheduled[k]
                returned = num_new
                break
        self.kv.free(victim)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self._release_from_runner(victim)
        self.stats.num_preemptions += 1
        self.waiting.add_front(victim)
        preempted.append(victim)
        logger.debug("preempted %s", victim.request_id)
        return returned

    def _release_from_runner(self, req: Request) -> None:
        if req.num_blocks_sent >= 0:
            self._forget.add(req.request_id)
            req.num_blocks_sent = -1

    # ---- applying the step's result ------------------------------------------------------------

    def update_from_output(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Advance every scheduled request by what the step computed; returns an output for each
        request that got tokens or prompt logprobs, or finished."""
        rows = {rid: i for i, rid in enumerate(result.req_ids)}
        now = time.monotonic()
        stats = self.stats
        outputs = []
        for req_id, num_new in sched.num_scheduled_tokens.items():
            req = self.requests.get(req_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # finished or preempted while the step ran
            start = req.num_computed_tokens
            if start < req.num_prompt_tokens:
                stats.num_prompt_tokens_computed += min(num_new, req.num_prompt_tokens - start)
            req.num_computed_tokens += num_new
            prompt_lp = result.prompt_logprobs.get(req_id)
            row = rows.get(req_id)
            draft = sched.spec_token_ids.get(req_id)
            if draft:
                # Rejected drafts were computed but are not the request's: their KV is overwritten later.
                accepted = len(result.sampled_token_ids[row]) - 1 if row is not None else 0
                req.num_computed_tokens -= len(draft) - accepted
                stats.num_draft_tokens += len(draft)
                stats.num_accepted_tokens += accepted
                stats.num_verifications += 1
                if self.proposer is not None:
                    self.proposer.observe(req_id, len(draft), accepted)
            if row is None and prompt_lp is None:
                continue
            out = self._output_of(req)
            if prompt_lp is not None:
                out.prompt_logprobs, out.prompt_logprobs_start = prompt_lp, start + 1
            if row is not None:
                logprobs = result.logprobs[row]
                for k, token in enumerate(result.sampled_token_ids[row]):
                    status = self._append(req, token, now)
                    if status is None or req.max_tokens > 0:
                        out.new_token_ids.append(token)
                        if logprobs is not None:
                            out.new_logprobs = (out.new_logprobs or []) + [logprobs[k]]
                    if status is not None:
                        self.finish(req, status)
                        out.finish_reason, out.stop_reason = FINISH_REASONS[status], req.stop_reason
                        if status == RequestStatus.FINISHED_ERROR:
                            out.error = grammar_error(req)
                        break
            out.first_token_time = req.first_token_time
            outputs.append(out)
        stats.num_steps += 1
        stats.num_forward_tokens += sched.total_num_scheduled_tokens
        return outputs

    def _output_of(self, req: Request) -> EngineCoreOutput:
        return EngineCoreOutput(
            req.request_id,
            num_cached_tokens=max(0, req.num_cached_tokens),
            first_scheduled_time=req.first_scheduled_time,
            first_token_time=req.first_token_time,
            num_preemptions=req.num_preemptions,
        )

    def _append(self, req: Request, token: int, now: float) -> RequestStatus | None:
        """Append a sampled token; the status it ends the request with, if any."""
        if req.max_tokens == 0:  # prompt logprobs only (echo): nothing is generated
            return RequestStatus.FINISHED_LENGTH
        if req.first_token_time is None:
            req.first_token_time = now
        req.append_token(token)
        self.stats.num_generated_tokens += 1
        grammar = accept_token(req, token) if req.grammar is not None else None
        if grammar == RequestStatus.FINISHED_ERROR:
            return grammar
        if token in req.params.stop_token_ids:
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if token in req.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if grammar is not None:  # the output is complete: only EOS could follow
            return grammar
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    # ---- leaving -------------------------------------------------------------------------------

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Retire a request (finished or aborted) and free its blocks. A call that ended for a reason of
        its own (not an abort) keeps its KV pinned for its agent program's next call."""
        if req.is_finished:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        if status != RequestStatus.FINISHED_ABORTED and req.program_id is not None:
            if self.config.program_pin_ttl_s > 0:
                self.kv.pin(req.program_id, req, self.config.program_pin_ttl_s)
        req.status = status
        self.kv.free(req)
        self._release_from_runner(req)
        self.requests.pop(req.request_id, None)
        if self.proposer is not None:
            done = status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)
            self.proposer.finish(req.request_id, req.all_token_ids if done else None, req.program_id)

    def uncomputed_blocks(self, req_id: str) -> set[int]:
        """Blocks of the request past its computed tokens (their KV is written by the step in flight)."""
        req = self.requests.get(req_id)
        if req is None:
            return set()
        return set(self.kv.block_ids(req_id)[req.num_computed_tokens // self.kv.block_size :])

    def rewind(self, req_id: str) -> None:
        """Send a running request back to wait and be recomputed (its blocks freed), as a preemption."""
        req = self.requests.get(req_id)
        if req is not None and req.status == RequestStatus.RUNNING:
            self._preempt(req, [], [])

    def fail(self, req_id: str, error: BaseException) -> EngineCoreOutput | None:
        """The request made a step fail: retire it alone (its blocks freed, its KV never cached)."""
        req = self.requests.get(req_id)
        if req is None:
            return None
        out = self._output_of(req)
        self.finish(req, RequestStatus.FINISHED_ERROR)
        out.finish_reason = FINISH_REASONS[RequestStatus.FINISHED_ERROR]
        out.error = f"{type(error).__name__}: {error}"
        return out

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[str]:
        """Finish requests by id (aborts, stop strings the frontend matched); returns those it knew."""
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is not None:
                self.finish(req, status)
                done.append(rid)
        return done
