"""Structured output inside the engine (vLLM V1's shape): the core fills one bitmask per step for the
requests under a grammar, the runner masks their logits rows with it, and the scheduler advances each
request's matcher with every token it appends.

- `StructuredOutputManager.bitmask_for(sched, requests)`, after `schedule()`: a row per grammar request
  that samples this step, and d + 1 rows for one verifying d drafts (the matcher walks through the drafts,
  filling a row before each, and is rolled back: drafts are not the request's until verified). None when
  no grammar request samples, so requests without a grammar pay nothing. The rows are filled on a worker
  thread while the model's forward runs (llguidance and torch both release the GIL), so a step pays
  only for the part of the fill that outlasts the forward.
- `StepBitmask.apply(logits, placements)`, in the runner: waits for the fill, then masks those rows
  before penalties and sampling. `StepBitmask.wait()`: the core calls it after every forward, so no
  matcher is advanced (update_from_output) or reused while a fill still walks it.
- `valid_draft(req, draft)`, when drafts are proposed: the longest prefix the grammar allows.
- `accept_token(req, token)`, as update_from_output appends: advances the matcher; the request ends
  ("stop") once the grammar is complete, and fails with the grammar's error if the matcher failed.

The matcher lives on the Request (`req.grammar`), so it goes wherever the request goes (preemption keeps
it: the recomputed tokens are the ones it already accepted) and is dropped with it.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from loom.engine.structured.bitmask import allocate_bitmask, apply_bitmask
from loom.engine.structured.matcher import GrammarMatcher, MaskFiller

if TYPE_CHECKING:
    from loom.engine.request import Request, RequestStatus
    from loom.engine.step import SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepBitmask:
    """One step's token masks: `rows[req_id]` is the first of that request's rows of `bitmask` (one row,
    or d + 1 rows for a request verifying d drafts, in position order)."""

    bitmask: torch.Tensor
    """int32 [num_rows, ceil(vocab / 32)] on CPU."""
    rows: dict[str, int]
    filled: Future | None = None
    """The fill running on the manager's worker thread (None: filled already)."""

    def wait(self) -> None:
        """Block until the rows are filled (the fill never raises: a request whose mask failed is marked
        failed on its matcher, and its row allows everything)."""
        if self.filled is not None:
            self.filled.result()
            self.filled = None

    def apply(self, logits: torch.Tensor, placements: list[tuple[str, int, int]]) -> None:
        """Mask logits in place. placements: (request id, its first logits row, rows) for every request
        that samples in this forward; those without a grammar are left alone."""
        self.wait()
        logit_rows: list[int] = []
        mask_rows: list[int] = []
        for req_id, first, count in placements:
            start = self.rows.get(req_id)
            if start is not None:
                logit_rows.extend(range(first, first + count))
                mask_rows.extend(range(start, start + count))
        if not logit_rows:
            return
        if logit_rows == mask_rows:  # the usual case: the rows are already where apply_bitmask wants them
            apply_bitmask(logits, self.bitmask, logit_rows)
            return
        # apply_bitmask pairs bitmask row r with logits row r: lay the request's rows out that way.
        aligned = torch.full((logits.shape[0], self.bitmask.shape[1]), -1, dtype=torch.int32)
        aligned[logit_rows] = self.bitmask[mask_rows]
        apply_bitmask(logits, aligned, logit_rows)


class StructuredOutputManager:
    """Builds each step's bitmask for an EngineCore. Owns the mask-filling threads (made on first use)."""

    def __init__(self, vocab_size: int, num_threads: int | None = 1):
        self.vocab_size = vocab_size
        """Width of the model's logits: one bit per logit."""
        self.num_threads = num_threads
        """llguidance's mask threads; 1 keeps them off the cores the model runs on (CPU hosts)."""
        self._filler: MaskFiller | None = None
        self._buffer: torch.Tensor | None = None
        self._worker: ThreadPoolExecutor | None = None
        """Fills a step's rows while its forward runs (made on first use)."""

    def _rows(self, num_rows: int) -> torch.Tensor:
        # Grown by doubling and kept: a step allocates nothing once the largest batch has been seen.
        have = 0 if self._buffer is None else self._buffer.shape[0]
        if have < num_rows:
            self._buffer = allocate_bitmask(max(num_rows, 2 * have), self.vocab_size)
        return self._buffer

    def bitmask_for(self, sched: SchedulerOutput, requests: dict[str, Request]) -> StepBitmask | None:
        """The masks of the grammar requests that sample in this step, or None when there are none."""
        plain: list[tuple[GrammarMatcher, int]] = []
        drafted: list[tuple[GrammarMatcher, int, list[int]]] = []
        rows: dict[str, int] = {}
        num_rows = 0
        for req_id, num_new in sched.num_scheduled_tokens.items():
            req = requests.get(req_id)
            if req is None or req.grammar is None:
                continue
            draft = sched.spec_token_ids.get(req_id) or []
            if req.num_computed_tokens + num_new - len(draft) < req.num_tokens:
                continue  # a prefill chunk short of the prompt's end samples nothing
            rows[req_id] = num_rows
            if draft:
                drafted.append((req.grammar, num_rows, draft))
            else:
                plain.append((req.grammar, num_rows))
            num_rows += len(draft) + 1
        if not rows:
            return None
        bitmask = self._rows(num_rows)[:num_rows]
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="loom-masks")
        # One fill in flight at a time: the core waits for a step's fill before the next step begins.
        filled = self._worker.submit(self._fill_step, bitmask, plain, drafted)
        return StepBitmask(bitmask, rows, filled)

    def _fill_step(
        self,
        bitmask: torch.Tensor,
        plain: list[tuple[GrammarMatcher, int]],
        drafted: list[tuple[GrammarMatcher, int, list[int]]],
    ) -> None:
        try:
            for matcher, row, draft in drafted:
                self._fill_through(matcher, bitmask, row, draft)
            if plain:
                self._fill(plain, bitmask)
        except Exception as e:  # noqa: BLE001 - _fill and _fill_one isolate per request; this is a last resort
            logger.exception("filling the step's token masks failed")
            for matcher, row in plain + [(m, r) for m, r, _ in drafted]:
                matcher.fail(f"computing the token mask failed: {e}")
                bitmask[row] = -1

    def _fill(self, rows: list[tuple[GrammarMatcher, int]], bitmask: torch.Tensor) -> None:
        if self._filler is None:
            self._filler = MaskFiller(self.num_threads)
        try:
            self._filler.fill(rows, bitmask)
        except Exception:  # noqa: BLE001 - find the matcher at fault; the others get their masks
            logger.warning("batch mask fill failed; filling row by row", exc_info=True)
            for matcher, row in rows:
                _fill_one(matcher, bitmask, row)

    @staticmethod
    def _fill_through(matcher: GrammarMatcher, bitmask: torch.Tensor, row: int, draft: list[int]) -> None:
        """Rows for position 0..d of a draft: each filled with the drafts before it accepted, then undone."""
        accepted = 0
        for j in range(len(draft) + 1):
            _fill_one(matcher, bitmask, row + j)
            if j < len(draft) and accepted == j and matcher.accept_token(draft[j]):
                accepted += 1
        # A draft token the grammar refused (it cannot be: drafts are cut to their valid prefix) keeps
        # the rows after it on the last state, which forbids it, so verification rejects it.
        matcher.rollback(accepted)


def _fill_one(matcher: GrammarMatcher, bitmask: torch.Tensor, row: int) -> None:
    try:
        matcher.fill_bitmask(bitmask, row)
    except Exception as e:  # noqa: BLE001 - this request's failure, not the step's
        matcher.fail(f"computing the token mask failed: {e}")
        bitmask[row] = -1  # anything: the request fails when its token is appended


def valid_draft(req: Request, draft: list[int]) -> list[int]:
    """The longest prefix of a speculative draft that the request's grammar allows."""
    if req.grammar is None or not draft:
        return draft
    return draft[: req.grammar.validate_tokens(draft)]


def accept_token(req: Request, token: int) -> RequestStatus | None:
    """Advance the request's matcher by a token just appended. Returns FINISHED_ERROR if the grammar
    failed (the reason is `grammar_error(req)`), FINISHED_STOPPED once the output is complete (nothing but
    EOS may follow: the grammar wins over min_tokens and ignore_eos), else None."""
    from loom.engine.request import RequestStatus

    matcher = req.grammar
    if matcher.failure is None and not matcher.accept_token(token):
        matcher.fail(f"the grammar does not allow token {token} after {matcher.num_tokens} tokens")
    if matcher.failure is not None or matcher.error is not None:
        return RequestStatus.FINISHED_ERROR
    if matcher.is_terminated:
        return RequestStatus.FINISHED_STOPPED
    return None


def grammar_error(req: Request) -> str:
    matcher = req.grammar
    why = (matcher.failure or matcher.error or "unknown error") if matcher is not None else "no grammar"
    return f"structured output failed: {why}"
