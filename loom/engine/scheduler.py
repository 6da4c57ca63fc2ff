"""The scheduler decides which tokens run in the next step. It never touches a tensor.

Token-budget scheduling in the style of vLLM's V1 core: running requests first (each gets what it needs
to catch up, a decode token or the next prefill chunk), then waiting requests while budget, sequence
slots and KV blocks last. When blocks run out, the most recently admitted running request (lowest
priority first under the priority policy) is preempted and will be recomputed from scratch.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from loom.config import EngineConfig
from loom.engine.request import Request, RequestStatus
from loom.errors import InvalidRequest
from loom.kv.manager import NO_HIT, KVCacheManager, PrefixHit

logger = logging.getLogger(__name__)

MAX_TRACKED_PROGRAMS = 65536


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    """Tokens computed for it this step, starting at its num_computed_tokens."""

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the request's tokens, so a new token is sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    """One step's batch, in the order its tokens are laid out in the forward pass."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class WaitingQueue:
    """Waiting requests in policy order: arrival (fcfs) or (priority, arrival) (priority)."""

    def __init__(self, by_priority: bool):
        self.by_priority = by_priority
        self._heap: list[tuple[int, float, int, Request]] = []
        self._fifo: deque[Request] = deque()
        self._tie = itertools.count()

    def _key(self, req: Request) -> tuple[int, float, int, Request]:
        return (req.priority, req.arrival_time, next(self._tie), req)

    def add(self, req: Request) -> None:
        if self.by_priority:
            heapq.heappush(self._heap, self._key(req))
        else:
            self._fifo.append(req)

    def add_front(self, req: Request) -> None:
        """Put a preempted request back where it came from: ahead of later arrivals."""
        if self.by_priority:
            heapq.heappush(self._heap, self._key(req))
        else:
            self._fifo.appendleft(req)

    def peek(self) -> Request:
        return self._heap[0][3] if self.by_priority else self._fifo[0]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3] if self.by_priority else self._fifo.popleft()

    def remove(self, req: Request) -> bool:
        if self.by_priority:
            for i, entry in enumerate(self._heap):
                if entry[3] is req:
                    self._heap.pop(i)
                    heapq.heapify(self._heap)
                    return True
            return False
        try:
            self._fifo.remove(req)
            return True
        except ValueError:
            return False

    def __len__(self) -> int:
        return len(self._heap) if self.by_priority else len(self._fifo)

    def __iter__(self):
        return iter([e[3] for e in sorted(self._heap)] if self.by_priority else list(self._fifo))

    def first(self, k: int) -> list[Request]:
        """The first k requests in policy order, without copying the whole queue."""
        if self.by_priority:
            return [e[3] for e in heapq.nsmallest(k, self._heap)]
        return list(itertools.islice(self._fifo, k))


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager, max_model_len: int):
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
        self.by_priority = config.scheduling_policy == "priority"
        self.by_program = config.scheduling_policy == "program"
        # Tokens computed per agent program so far (program-level least attained service, as in
        # Autellix); bounded so an endless stream of programs does not grow it forever.
        self.program_service: OrderedDict[str, int] = OrderedDict()
        self.waiting = WaitingQueue(self.by_priority)
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.add(req)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
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
            while not self.kv.allocate_slots(req, num_new):
                victim = self._pick_victim()
                if self.running.index(victim) < i:  # already scheduled (priority policy only)
                    i -= 1
                budget += self._preempt(victim, out)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, num_new))
                budget -= num_new
                i += 1
                continue
            # req itself was preempted and removed from running; the same index now holds the next one.

        # 2. Waiting requests, unless this step had to preempt (then memory is the bottleneck).
        now = time.monotonic()
        while (
            self.waiting and not out.preempted and budget > 0 and len(self.running) < self.config.max_num_seqs
        ):
            req, hit = self._next_waiting()
            num_new = req.num_tokens - req.num_computed_tokens - hit.num_tokens
            if num_new > budget:
                if not chunked:
                    break
                num_new = budget
            if not self.kv.allocate_slots(req, num_new, hit):
                break
            self.waiting.remove(req)
            req.num_computed_tokens += hit.num_tokens
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = hit.num_tokens
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new
        if self.by_program:
            self._attain_service(out)
        return out

    def _program(self, req: Request) -> str:
        return req.program_id or req.parent_id

    def _service(self, req: Request) -> int:
        return self.program_service.get(self._program(req), 0)

    def _attain_service(self, out: SchedulerOutput) -> None:
        for s in out.scheduled:
            program = self._program(s.request)
            self.program_service[program] = self.program_service.get(program, 0) + s.num_new_tokens
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

    def _preempt(self, victim: Request, out: SchedulerOutput) -> int:
        """Free the victim's blocks; it goes back to the waiting queue and is recomputed (its full
        blocks may still be found in the prefix cache). Returns the budget it gives back."""
        self.running.remove(victim)
        returned = 0
        for k, s in enumerate(out.scheduled):
            if s.request is victim:  # only possible under the priority policy
                returned = out.scheduled.pop(k).num_new_tokens
                break
        self.kv.free(victim)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add_front(victim)
        out.preempted.append(victim)
        logger.debug("preempted %s", victim.request_id)
        return returned

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Retire a request (finished or aborted) and free its blocks."""
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif not req.status.finished:
            self.waiting.remove(req)
        req.status = status
        self.kv.free(req)
