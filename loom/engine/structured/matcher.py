"""Per-sequence grammar state: which tokens may come next, advanced by each accepted token.

A matcher lives on the engine thread with its sequence. Each step the engine fills the sequence's row
of a preallocated bitmask (one bit per vocabulary entry, set = allowed; all rows of a batch at once with
`MaskFiller`), masks the logits with it (see bitmask.py) and feeds the sampled token back with
`accept_token`. `rollback` undoes accepted tokens (for rejected speculative drafts), `fork` copies the
state for the other completions of an n > 1 request.
"""

from __future__ import annotations

import llguidance
import torch


class GrammarMatcher:
    """The grammar state of one sequence (a thin wrapper over llguidance.LLMatcher)."""

    __slots__ = ("_m", "_num_tokens", "failure")

    def __init__(self, matcher: llguidance.LLMatcher, num_tokens: int = 0):
        self._m = matcher
        self._num_tokens = num_tokens
        self.failure: str | None = None
        """Why the engine gave up on this matcher (a refused token, a failed mask), besides `error`."""

    def accept_token(self, token_id: int) -> bool:
        """Advance by one token. False if the grammar forbids it here; the state is then unchanged.

        EOS tokens are accepted where the grammar is complete, after which the matcher is terminated.
        """
        if self._m.try_consume_tokens([token_id]) != 1:
            return False
        self._num_tokens += 1
        return True

    def accept_tokens(self, token_ids: list[int]) -> int:
        """Advance by the longest allowed prefix of token_ids; returns how many were accepted."""
        n = self._m.try_consume_tokens(token_ids)
        self._num_tokens += n
        return n

    def validate_tokens(self, token_ids: list[int]) -> int:
        """How many of token_ids (e.g. a speculative draft) the grammar would accept, without advancing."""
        return self._m.validate_tokens(token_ids)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last num_tokens accepted tokens."""
        if not 0 <= num_tokens <= self._num_tokens:
            raise ValueError(f"cannot roll back {num_tokens} tokens; {self._num_tokens} were accepted")
        if num_tokens and not self._m.rollback(num_tokens):
            raise RuntimeError(f"grammar rollback failed: {self._m.get_error()}")
        self._num_tokens -= num_tokens

    @property
    def num_tokens(self) -> int:
        """Tokens accepted so far (net of rollbacks)."""
        return self._num_tokens

    @property
    def is_terminated(self) -> bool:
        """Nothing but EOS may follow (the output is complete, or EOS was accepted, or the matcher failed)."""
        return self._m.is_stopped()

    @property
    def is_accepting(self) -> bool:
        """The output so far is a complete match (EOS is allowed)."""
        return self._m.is_accepting()

    @property
    def error(self) -> str | None:
        """Why the matcher failed (a lexer or parser resource limit hit while computing a mask), or None.

        A failed matcher allows only EOS, so its sequence ends; the caller should report the error.
        """
        return self._m.get_error() or None

    def fail(self, why: str) -> None:
        """Mark the matcher failed: its sequence ends with an error saying why."""
        self.failure = self.failure or why

    def fork(self) -> GrammarMatcher:
        """An independent copy of this state (the other completions of an n > 1 request)."""
        return GrammarMatcher(self._m.deep_copy(), self._num_tokens)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (int32 [rows, ceil(vocab / 32)], on CPU)."""
        v = _check_bitmask(bitmask)[row]
        self._m.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())


class MaskFiller:
    """Fills the bitmask rows of a whole batch in one call, on llguidance's own native threads.

    One per engine: it owns the thread pool. num_threads None lets llguidance choose (80% of the CPUs, up
    to 32); on a CPU-only host that also runs the model, 1 or 2 keeps masks off the model's cores.
    """

    def __init__(self, num_threads: int | None = None):
        self._executor = llguidance.LLExecutor(num_threads)

    def fill(self, rows: list[tuple[GrammarMatcher, int]], bitmask: torch.Tensor) -> None:
        """Fill bitmask[row] for each (matcher, row); rows without a matcher are left as they were."""
        if rows:
            words = _check_bitmask(bitmask).shape[1]
            self._executor.unsafe_compute_mask_ptr(
                [(m._m, row) for m, row in rows], bitmask.data_ptr(), words * 4, bitmask.shape[0]
            )


def _check_bitmask(bitmask: torch.Tensor) -> torch.Tensor:
    # llguidance writes through the raw pointer: the tensor must be what it assumes. (Its own
    # llguidance.torch wrappers check the same, but importing that module pulls in torch.compile's
    # stack, ~5 s of every process start.)
    if not (
        bitmask.dtype == torch.int32 and bitmask.is_cpu and bitmask.dim() == 2 and bitmask.is_contiguous()
    ):
        raise ValueError("a token bitmask must be a contiguous 2-D int32 CPU tensor")
    return bitmask
